"""Building what the API shows of a job: the stored row merged with what the trainer wrote (jobdir), as the
response models of service/api/schemas.py, and rendered to JSON once.

A status poll is the service's most frequent request, so what it re-reads is cached:
- a job directory file's parsed content, keyed by the file's (size, mtime): an unchanged metrics.jsonl is
  neither read nor parsed again (`FileCache`);
- a job's rendered JSON and its ETag, keyed by the row's version (`updated_at` and the fields shown, which
  every write on any replica changes) and the files' keys (`ViewCache`).
Both are keyed on what changes, so no replica can serve a state another one changed; see `FileCache` for
the one bound (a rewrite that keeps a file's size within its storage's mtime resolution).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs
from pydantic import ValidationError

import objstore
from service.api.reference import reference_view
from service.api.schemas import EstimateVsActual, JobView, Progress, SearchProgress, WorkerSpan
from service.common.estimate import Estimate
from service.common.lru import Lru
from service.engine import jobdir
from service.engine.notify import shown_spec
from service.engine.states import JobState
from service.engine.store import Job
from trainer import contract
from trainer.contract import EpochMetrics, Summary, TrialRow, TrialState
from trainer.spec import SearchSpec

T = TypeVar("T")

# A file changed less than this long before it was stat'ed may change again without changing its (size,
# mtime) key: such a file is re-read until it has been still this long. S3's LastModified has 1 s resolution;
# a local file's mtime comes from the kernel's coarse clock (a few ms).
RACY_S = 2.0
RACY_LOCAL_S = 0.1
# A cached file is re-read at least this often whatever its key says: the bound on a missed change when the
# storage's clock runs behind ours.
MAX_AGE_S = 30.0

Stamp = tuple[int, int]  # (size, mtime in ns)


def stamp(uri: str) -> Stamp | None:
    """(size, mtime_ns) of a file; None when it does not exist. Raises objstore.StorageUnavailable."""
    fs, path = objstore.resolve(uri)
    info = objstore.retrying(lambda: fs.get_file_info(path), f"stat {objstore.redact(uri)}")
    if info.type != pafs.FileType.File:
        return None
    return int(info.size), int(info.mtime_ns or 0)


@dataclass(frozen=True)
class _Cached:
    stamp: Stamp
    read_at: float  # time.time() when it was stat'ed
    value: Any


class FileCache:
    """Parsed job-directory files, keyed by URI and re-used while the file's (size, mtime) stays the same.
    The stat comes before the read, so a write between the two is seen at the next look. A file whose
    mtime was under RACY_S (local: RACY_LOCAL_S) before the read, or an entry older than MAX_AGE_S, is read
    again."""

    def __init__(self, size: int = 512, max_bytes: int = 32 << 20, clock: Callable[[], float] = time.time) -> None:
        # Bounded by count and by the files' total size (parsed, an entry takes a few times its file's size).
        self._entries: Lru[_Cached] = Lru(size, max_weight=max_bytes)
        self._clock = clock  # wall time, as the files' mtimes are

    def read(self, uri: str, parse: Callable[[str], T]) -> tuple[T, Stamp | None]:
        """(parse(uri), the file's key); `parse` reads the file itself (missing: its own empty value)."""
        now = self._clock()
        key = stamp(uri)
        hit = self._entries.get(uri)
        if (
            key is not None
            and hit is not None
            and hit.stamp == key
            and hit.read_at - key[1] / 1e9 >= (RACY_S if objstore.is_s3(uri) else RACY_LOCAL_S)
            and now - hit.read_at < MAX_AGE_S
        ):
            return hit.value, key
        value = parse(uri)
        if key is not None:
            self._entries.put(uri, _Cached(key, now, value), weight=key[0])
        return value, key

    def clear(self) -> None:
        self._entries.clear()


FILES = FileCache()


@dataclass(frozen=True)
class JobFiles:
    """What a view shows of a job directory; None: not read (a list, a queued job) or storage unreachable."""

    metrics: list[EpochMetrics] | None = None
    trials: list[TrialRow] | None = None
    summary: Summary | None = None
    key: Hashable = None  # the files' stamps: equal keys, equal content


def read_files(job: Job, job_dir: str) -> JobFiles:
    """metrics.jsonl, trials.json (searches) and summary.json (ended jobs), through FILES."""
    if job.state is JobState.QUEUED:
        return JobFiles()
    try:
        metrics, m_key = FILES.read(objstore.join(job_dir, contract.METRICS), _parse_metrics)
        trials = t_key = None
        if job.spec.search is not None:
            rows, t_key = FILES.read(objstore.join(job_dir, contract.TRIALS), _parse_trials)
            trials = jobdir.settle_trials(rows, job.state.value)
        summary = s_key = None
        if job.state.is_terminal():
            summary, s_key = FILES.read(objstore.join(job_dir, contract.SUMMARY), _parse_summary)
    except objstore.StorageUnavailable:
        return JobFiles()
    if m_key is None or (trials is not None and t_key is None) or (job.state.is_terminal() and s_key is None):
        key: Hashable = None  # a missing file has no key: never cache a view built without it
    else:
        key = (m_key, t_key, s_key)
    return JobFiles(metrics=metrics, trials=trials, summary=summary, key=key)


# What FILES calls: jobdir's readers, given the file's URI instead of the job dir.
def _parse_metrics(uri: str) -> list[EpochMetrics]:
    return contract.parse_metrics(_read_text(uri))


def _parse_trials(uri: str) -> list[TrialRow]:
    return contract.parse_trials(_read_text(uri))


def _parse_summary(uri: str) -> Summary | None:
    return contract.parse_summary(_read_text(uri))


def _read_text(uri: str) -> str | None:
    try:
        return objstore.read_text(uri)
    except FileNotFoundError:
        return None


def progress(metrics: list[EpochMetrics], epochs: int | None, finished: bool) -> Progress:
    """The ETA is the mean `epoch_seconds` of the last (up to 3) epochs times the epochs left (recent epochs
    track the current cluster); None until one epoch finished."""
    epoch = metrics[-1].epoch if metrics else 0
    eta: float | None = None
    if finished:
        eta = 0.0 if metrics else None
    elif metrics and epochs:
        times = [m.epoch_seconds for m in metrics[-3:] if m.epoch_seconds > 0]
        if times:
            eta = round(sum(times) / len(times) * max(epochs - epoch, 0), 1)
    return Progress(epoch=epoch, epochs=epochs, eta_seconds=eta)


def search_progress(spec: SearchSpec, trials: list[TrialRow]) -> SearchProgress:
    best = contract.best_trial(trials, spec.mode)
    return SearchProgress(
        trials_total=spec.total_trials(),
        trials_finished=sum(t.state.is_finished() for t in trials),
        trials_running=sum(t.state is TrialState.RUNNING for t in trials),
        stopped_early=sum(t.stopped_early for t in trials),
        best_trial=best.trial_id if best else None,
        best_metric=best.best_metric if best else None,
        best_config=best.config if best else None,
        metric=spec.metric,
    )


def _error(estimated: float | None, actual: float | None) -> float | None:
    if estimated is None or not actual:
        return None
    return round((estimated - actual) / actual, 4)


def estimate_vs_actual(job: Job, metrics: list[EpochMetrics] | None, detail: bool) -> EstimateVsActual | None:
    """The estimate stored at submission beside what the job took: the wall time from its first submission
    to Ray until it ended (a job that never started has none) and the median images/s of its epochs."""
    if job.estimate is None:
        return None
    try:
        est = Estimate.model_validate_json(job.estimate)
    except ValidationError:
        return None  # written by another version: shown as no estimate rather than failing the view
    actual_wall: float | None = None
    if job.state.is_terminal() and job.attempt_log:
        submitted = job.attempt_log[0].get("submitted_at")
        if isinstance(submitted, int | float):
            actual_wall = round(job.updated_at - float(submitted), 1)
    rates = [m.images_per_s for m in metrics or [] if m.images_per_s > 0]
    actual_ips = round(float(statistics.median(rates)), 1) if rates else None
    return EstimateVsActual(
        estimated_wall_seconds=est.wall_seconds.value,
        wall_basis=est.wall_seconds.basis,
        estimated_images_per_s=est.images_per_s.value,
        images_per_s_basis=est.images_per_s.basis,
        estimated_cost=est.cost.value,
        cost_basis=est.cost.basis,
        actual_wall_seconds=actual_wall,
        actual_images_per_s=actual_ips,
        wall_error=_error(est.wall_seconds.value, actual_wall),
        images_per_s_error=_error(est.images_per_s.value, actual_ips),
        checks=est.checks if detail else [],  # lists stay small: the checks are in each job's own view
        detail=est if detail else None,
    )


def time_limit_warning(job: Job, shown: Progress, now: float) -> str | None:
    """For a RUNNING job: when its pace so far (the ETA of its last epochs) takes it past limits.max_hours,
    counted as the runner does (from the first submission to Ray: service/engine/runner.py over_time_limit), say at
    which epoch the limit will stop it — well before it does. None while it will finish in time."""
    if job.state is not JobState.RUNNING or shown.eta_seconds is None or not job.attempt_log or not shown.epochs:
        return None
    limit_s = job.spec.limits.max_hours * 3600
    started = float(job.attempt_log[0].get("submitted_at") or job.created_at)
    elapsed = now - started
    if elapsed + shown.eta_seconds <= limit_s:
        return None
    per_epoch = shown.eta_seconds / max(shown.epochs - shown.epoch, 1)
    stop_epoch = min(shown.epoch + max(int((limit_s - elapsed) // per_epoch), 0), shown.epochs)
    total_h = (elapsed + shown.eta_seconds) / 3600
    return (
        f"at its current pace ({per_epoch:.0f} s an epoch) the job needs about {total_h:.2f} h "
        f"in all, over limits.max_hours={job.spec.limits.max_hours:g} h: the limit will stop it around epoch "
        f"{stop_epoch} of {shown.epochs} (resubmit with a larger limits.max_hours, or fewer optim.epochs)"
    )


def worker_spans(metrics: list[EpochMetrics]) -> list[WorkerSpan] | None:
    """The worker count over time: consecutive epochs with the same count as one span (metrics written before
    the trainer recorded `workers` count by their ranks' node ids). None without epochs."""
    spans: list[WorkerSpan] = []
    for m in metrics:
        count = m.workers if m.workers is not None else len(m.node_ids)
        if not count:
            continue
        if spans and spans[-1].workers == count and spans[-1].last_epoch < m.epoch:
            spans[-1].last_epoch = m.epoch
        else:
            spans.append(WorkerSpan(first_epoch=m.epoch, last_epoch=m.epoch, workers=count))
    return spans or None


def _time(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


def job_view(job: Job, files: JobFiles | None = None, with_spec: bool = False) -> JobView:
    """With `files` read, progress and latest metrics come fresh from metrics.jsonl; without them (lists),
    or while storage is unreachable, from the values the reconciler last stored — a job's state stays
    readable during a storage outage."""
    epochs = job.spec.optim.epochs
    files = files or JobFiles()
    metrics, trials, summary = files.metrics, files.trials, files.summary
    latest: EpochMetrics | None = None
    if metrics is not None:
        latest = metrics[-1] if metrics else None
        shown = progress(metrics, epochs, finished=job.state.is_terminal())
        best = job.best_val_acc
        so_far = contract.best_so_far(metrics)
        if so_far is not None and (best is None or so_far > best):
            best = so_far
    else:
        shown = Progress(epoch=job.last_epoch or 0, epochs=epochs, eta_seconds=None)
        best = job.best_val_acc
    if job.state in (JobState.QUEUED, JobState.STARTING):
        shown.eta_seconds = None  # no ETA until this attempt's workers train (not a dead attempt's)
    search = None
    if trials is not None and job.spec.search is not None:
        search = search_progress(job.spec.search, trials)
    has_val = job.spec.data.val_fraction > 0
    return JobView(
        id=job.id,
        owner=job.owner,
        name=job.name,
        project=job.project,
        tags=job.tags,
        parent=job.parent,
        state=job.state,
        progress=shown,
        metrics=latest,
        best_val_acc=best if has_val else None,
        final_test_acc=summary.final_test_acc if summary else None,
        best_checkpoint_test_acc=summary.best_checkpoint_test_acc if summary else None,
        best_checkpoint_rule="val_acc" if has_val else "final_epoch",
        attempts=job.attempts,
        attempt_log=job.attempt_log,
        message="; ".join(m for m in (job.message, job.spec_error) if m) or None,
        ray_submission_id=job.ray_submission_id,
        created_at=_time(job.created_at),
        updated_at=_time(job.updated_at),
        spec=shown_spec(job.spec) if with_spec else None,  # its webhook masked
        search=search,
        devices=latest.devices or None if latest else None,
        numerics=latest.numerics if latest else None,
        reference=reference_view(job.spec, metrics) if metrics is not None else None,
        estimate=estimate_vs_actual(job, metrics, detail=with_spec),
        time_limit_warning=time_limit_warning(job, shown, time.time()),
        workers=worker_spans(metrics) if metrics else None,
        infra_losses=infra_losses(metrics),
    )


def infra_losses(metrics: list[EpochMetrics] | None) -> list[str] | None:
    """One line per lost worker node/host the run recovered from (each restarted run's first epoch carries
    them: trainer/infra.py); None when there was none or the metrics were not read."""
    lines = [loss.describe() for m in metrics or [] for loss in m.infra_losses]
    return lines or None


@dataclass(frozen=True)
class Rendered:
    """A view's JSON body, rendered once, and its strong ETag."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes) -> Rendered:
        return cls(body, '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"')

    def matches(self, if_none_match: str | None) -> bool:
        """Does an If-None-Match header name this ETag (or `*`)? Weak tags compare by their opaque part
        (RFC 9110: If-None-Match uses the weak comparison)."""
        if not if_none_match:
            return False
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


def _row_key(job: Job) -> Hashable:
    """What identifies this version of the row: every store write sets `updated_at` (on any replica); the
    fields the view shows are in the key too, so two writes within one clock tick still differ."""
    return (
        job.id,
        job.updated_at,
        job.state,
        job.attempts,
        job.message,
        job.best_val_acc,
        job.last_epoch,
        job.ray_submission_id,
        len(job.attempt_log),
    )


class ViewCache:
    """Rendered views by (row version, files' key, with_spec): a poll of an unchanged job renders nothing."""

    def __init__(self, size: int = 2048, max_bytes: int = 32 << 20) -> None:
        self._entries: Lru[Rendered] = Lru(size, max_weight=max_bytes)

    def render(self, job: Job, files: JobFiles | None = None, with_spec: bool = False) -> Rendered:
        files = files or JobFiles()
        cacheable = files.metrics is None or files.key is not None
        key = (_row_key(job), files.key, files.metrics is None, with_spec)
        if cacheable and (hit := self._entries.get(key)) is not None:
            return hit
        rendered = Rendered.of(job_view(job, files, with_spec).model_dump_json().encode())
        if cacheable:
            self._entries.put(key, rendered, weight=len(rendered.body))
        return rendered

    def clear(self) -> None:
        self._entries.clear()


VIEWS = ViewCache()


def render_job(job: Job, job_dir: str | None = None, with_spec: bool = False) -> Rendered:
    """GET /v1/jobs/{id}'s body (with `job_dir`: fresh from the job directory) and ETag."""
    return VIEWS.render(job, read_files(job, job_dir) if job_dir is not None else None, with_spec)


# Rendered list pages by the ETags of their items (content hashes) and the page's numbers: the same key is
# the same body, whoever asks, so a poll of an unchanged page neither joins nor hashes it again.
LISTS: Lru[Rendered] = Lru(256, max_weight=16 << 20)


def render_list(jobs: list[Job], total: int, limit: int, offset: int) -> Rendered:
    """GET /v1/jobs's body — schemas.JobList, spliced from the jobs' cached renderings — and ETag."""
    items = [VIEWS.render(j) for j in jobs]
    key = (tuple(r.etag for r in items), total, limit, offset)
    if (hit := LISTS.get(key)) is not None:
        return hit
    joined = b",".join(r.body for r in items)
    rendered = Rendered.of(b'{"jobs":[%s],"total":%d,"limit":%d,"offset":%d}' % (joined, total, limit, offset))
    LISTS.put(key, rendered, weight=len(rendered.body))
    return rendered


def fresh_view(job: Job, job_dir: str, with_spec: bool = False) -> JobView:
    """The view with progress and metrics fresh from the job directory (see `job_view`)."""
    return job_view(job, read_files(job, job_dir), with_spec)
