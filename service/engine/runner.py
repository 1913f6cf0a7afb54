"""Runs jobs on Ray: the queue, submission, cancellation, and reconciling the store with what Ray and the
job directory say.

Blocking code (Ray's SDK and storage are synchronous): the reconciler calls `reconcile_once` from a worker
thread, routes call `cancel` etc. from FastAPI's threadpool. One lock serialises everything that submits or
stops Ray jobs, so a cancel never interleaves with a submission of the same job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import objstore
from service.common.keyfile import load_or_create_secret
from service.common.settings import Settings
from service.engine import jobdir, records
from service.engine.decide import Cancel, Facts, Fail, Progress, Resubmit, Stop, Succeed, decide, restarts_used
from service.engine.notify import Notifier
from service.engine.rayjobs import RayJobInfo, RayJobs, RayUnavailable
from service.engine.states import InvalidTransition, JobNotFound, JobState
from service.engine.store import Job, Store
from trainer import contract

log = logging.getLogger(__name__)

# Non-secret settings forwarded to the trainer (contract.FORWARDED_ENV); credentials (AWS_ACCESS_KEY_ID, ...)
# must be configured on the cluster itself, because a job's runtime_env is visible to anyone who can read the
# Ray dashboard. The data roots are this service's setting, not whatever this process's environment says.
FORWARDED_ENV = tuple(k for k in contract.FORWARDED_ENV if k != contract.DATA_ROOTS_ENV)
DATA_ROOTS_ENV = contract.DATA_ROOTS_ENV


def fair_queue(queued: list[Job], active: list[Job], max_active_per_owner: int) -> list[Job]:
    """The order in which to try starting queued jobs: round-robin over owners (each owner's jobs oldest
    first; owners in the order of their oldest queued job), leaving out what would take an owner past
    `max_active_per_owner` active jobs. One user's burst then delays another user's job by at most one
    job per round, not by the whole burst."""
    running: dict[str, int] = {}
    for job in active:
        running[_owner_key(job)] = running.get(_owner_key(job), 0) + 1
    per_owner: dict[str, list[Job]] = {}
    for job in queued:  # submission order
        allowance = max_active_per_owner - running.get(_owner_key(job), 0)
        mine = per_owner.setdefault(_owner_key(job), [])
        if len(mine) < allowance:
            mine.append(job)
    order: list[Job] = []
    rounds = max((len(v) for v in per_owner.values()), default=0)
    for i in range(rounds):
        order.extend(jobs[i] for jobs in per_owner.values() if i < len(jobs))
    return order


def _owner_key(job: Job) -> str:
    return job.owner_id or job.owner  # the owner id (a re-created token name is another owner)


def over_time_limit(job: Job, max_job_hours: float, now: float) -> float | None:
    """The job's wall-clock limit in hours when it has run past it (counted from its first submission to
    Ray, so time spent queued is free), else None."""
    if not job.attempt_log:
        return None
    limit_h = min(job.spec.limits.max_hours, max_job_hours)
    started = float(job.attempt_log[0].get("submitted_at") or job.created_at)
    return limit_h if now - started > limit_h * 3600 else None


# A running attempt's driver log is copied into the job dir at most this often (and once more at its end).
LOG_COPY_INTERVAL_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """Ray's driver log colours its lines; a saved log, and one served over HTTP, is plain text."""
    return _ANSI.sub("", text)


class NoLog(Exception):
    """There is no log to show; the message says why."""


class StillStopping(Exception):
    """A finished job's Ray driver has not exited yet: deleting its folder now would let it write again."""

    def __init__(self, submission_id: str) -> None:
        super().__init__(submission_id)
        self.submission_id = submission_id


class LostLeadership(Exception):
    """This replica no longer holds the reconciler lock: another one decides now, so this pass stops here."""


# How long a delete waits for a stopped job's Ray driver to exit (Ray stops a driver with SIGTERM, then
# SIGKILL after a few seconds) before answering 409 with Retry-After.
DELETE_FENCE_S = 10.0


def _is_wait_message(message: str | None) -> bool:
    return bool(message) and message.startswith(("waiting for resources", "starting:"))  # type: ignore[union-attr]


class Runner:
    def __init__(self, settings: Settings, store: Store, ray: RayJobs, notifier: Notifier | None = None) -> None:
        self.settings, self.store, self.ray = settings, store, ray
        self._lock = threading.RLock()
        self._log_copies: dict[str, tuple[float, int]] = {}  # submission id -> (when copied, length)
        self.notifier = notifier  # webhook alerts (service/engine/notify.py); None: none sent (admin tools)
        # During a reconciler pass: whether this replica still holds the leader lock (checked before every
        # job, and again right before a Ray job is stopped or started). None outside a pass.
        self._still_leader: Callable[[], bool] | None = None
        self.delete_fence_s = DELETE_FENCE_S
        store.on_transition = self._transitioned
        # Observability (service/server/metrics.py): the latest training throughput of each active job, and how
        # often Ray refused a submission. Kept by whichever replica reconciles.
        self.images_per_s: dict[str, float] = {}
        self.submission_errors = 0
        # Signs record.json so `trainctl reindex` believes only what this service wrote (service/engine/records.py).
        self._record_key = load_or_create_secret(settings.record_key_path)

    def _transitioned(self, job: Job) -> None:
        self.save_record(job)
        if self.notifier is not None:
            self.notifier.transitioned(job)  # only queues the call: never blocks nor raises

    def save_record(self, job: Job) -> None:
        """Mirror a job's record into its directory (record.json) for `trainctl reindex`. Best effort: the
        database stays the truth, and the next transition writes it again."""
        # Everything but the spec (spec.json holds it); not dataclasses.asdict, which would deep-copy the spec.
        record = {
            f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in ("seq", "spec", "spec_error")
        }
        record["state"] = job.state.value
        try:
            jobdir.write_record(
                self.job_dir(job.id), records.sign(self._record_key, job.id, record, job.spec.model_dump(mode="json"))
            )
        except Exception as exc:  # noqa: BLE001 - never fail a transition over its mirror
            log.warning("job %s: could not write %s: %s", job.id, jobdir.RECORD, exc)
        if job.state.is_terminal():
            self.images_per_s.pop(job.id, None)

    # --- paths and the job directory ---------------------------------------------------------------------

    def job_dir(self, job_id: str) -> str:
        return jobdir.job_uri(self.settings.storage_root, job_id)

    def entrypoint(self, job_id: str) -> str:
        return f"{shlex.quote(self.settings.python)} -m trainer.run --job-dir {shlex.quote(self.job_dir(job_id))}"

    # --- the queue ------------------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start QUEUED jobs, oldest first, while fewer than max_concurrent_jobs hold a slot."""
        with self._lock:
            active = self.store.active()
            free = self.settings.max_concurrent_jobs - len(active)
            for job in fair_queue(self.store.queued_in_order(), active, self.settings.max_active_jobs_per_owner):
                if free <= 0:
                    return
                try:
                    if job.spec_error is not None:  # never run a spec other than the one the user submitted
                        self._fail(job.id, job.spec_error)
                        continue
                    self._submit(job, attempt=1, reason="submitted")
                except (RayUnavailable, objstore.StorageUnavailable) as exc:
                    if isinstance(exc, RayUnavailable):
                        self.submission_errors += 1
                    log.warning("job %s stays queued: %s", job.id, exc)
                    # Say why on the job itself, so a user polling a job stuck in QUEUED sees the reason.
                    self.store.update(job.id, message=f"waiting to submit, will retry: {str(exc)[:300]}")
                    return  # the next round tries again, in the same order
                except InvalidTransition:
                    continue  # cancelled meanwhile
                except Exception as exc:  # a broken submission must not block the queue
                    self.submission_errors += 1
                    log.exception("submitting job %s failed", job.id)
                    self._fail(job.id, f"could not submit the job to Ray: {exc}")
                    continue
                free -= 1

    def _submit(self, job: Job, attempt: int, reason: str, charged: bool = True) -> Job:
        """Write spec.json, submit `<id>-<attempt>` to Ray, then record it (STARTING). The record is written
        after Ray accepted the job, so attempts only count real submissions; if the job was cancelled in the
        meantime the new Ray job is stopped again."""
        job_dir = self.job_dir(job.id)
        jobdir.write_spec(job_dir, job.spec.model_dump(mode="json"))
        submission_id = f"{job.id}-{attempt}"
        env = self.forwarded_env()
        self.ray.submit(
            submission_id,
            self.entrypoint(job.id),
            num_cpus=self.settings.entrypoint_num_cpus,
            env_vars=env,
            metadata={"trainctl_job_id": job.id, "attempt": str(attempt)},
            resources=self.settings.entrypoint_resources or None,
        )
        entry = {"attempt": attempt, "submission_id": submission_id, "reason": reason, "submitted_at": time.time()}
        if attempt > 1:
            entry["charged"] = charged  # counts against checkpoint.max_restarts
        try:
            return self.store.transition(
                job.id,
                JobState.STARTING,
                expect={job.state},
                ray_submission_id=submission_id,
                attempts=attempt,
                attempt_log=[*job.attempt_log, entry],
                message=None if attempt == 1 else f"restarted: {reason}",
            )
        except (InvalidTransition, JobNotFound):
            self._stop_quietly(submission_id)
            raise InvalidTransition(job.id, job.state, JobState.STARTING) from None

    def forwarded_env(self) -> dict[str, str]:
        """The job's runtime env: the allow-listed settings of this process plus the data roots the driver
        checks the spec against again. Nothing else: Ray shows a job's runtime env on its dashboard."""
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        env[DATA_ROOTS_ENV] = ",".join(self.settings.allowed_data_roots)
        return env

    def _stop_quietly(self, submission_id: str) -> None:
        try:
            self.ray.stop(submission_id)
        except Exception:
            log.warning("could not stop orphaned Ray job %s", submission_id, exc_info=True)

    # --- cancel ----------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; idempotent. QUEUED: cancelled at once. STARTING/RUNNING: the Ray job is stopped,
        then the job is CANCELLED. Raises RayUnavailable when Ray cannot be told (the request is kept, and
        the reconciler stops the job once Ray answers), JobNotFound when there is no such job."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state.is_terminal():
                return job
            if job.state is JobState.QUEUED:
                return self.store.transition(
                    job_id, JobState.CANCELLED, expect={JobState.QUEUED}, message="cancelled while queued"
                )
            self.store.update(job_id, cancel_requested=True)
            assert job.ray_submission_id
            if self.ray.stop(job.ray_submission_id):
                return self.store.transition(job_id, JobState.CANCELLED, message="cancelled by user")
            # The Ray job had already ended (or never existed): its outcome decides (service/engine/decide.py: a
            # failure or stop counts as our cancel, a success stands).
            job = self.store.get(job_id)
            assert job is not None
            self._reconcile(job, self.ray.info(job.ray_submission_id or ""))
            return self.store.get(job_id) or job

    def _fence(self, job: Job, fence_s: float) -> None:
        submissions = {e.get("submission_id") for e in job.attempt_log} | {job.ray_submission_id}
        deadline = time.monotonic() + fence_s
        for submission_id in sorted(s for s in submissions if s):
            while True:
                info = self.ray.info(submission_id)
                if info is None or info.status.is_terminal():
                    break
                self.ray.stop(submission_id)  # again: a stop asked of a replica that died meanwhile is lost
                if time.monotonic() >= deadline:
                    raise StillStopping(submission_id)
                time.sleep(0.2)

    # --- reconciling -------------------------------------------------------------------------------------------

    def reconcile_once(self, still_leader: Callable[[], bool] | None = None) -> None:
        """One pass: bring every active job up to date with Ray and its job directory, then fill free slots.
        With `still_leader` (the reconciler's leader lock), the pass ends as soon as it returns False: a
        replica that lost leadership mid-pass acts on nothing more (the new leader has the facts)."""
        with self._lock:
            self._still_leader = still_leader
            try:
                self._reconcile_all()
            except LostLeadership:
                log.warning("lost the reconciler lock during a pass: stopping and starting nothing more")
            finally:
                self._still_leader = None

    def _check_leader(self) -> None:
        if self._still_leader is not None and not self._still_leader():
            raise LostLeadership()

    def _reconcile_all(self) -> None:
        for job in self.store.active():
            self._check_leader()
            try:
                if self._enforce_time_limit(job):
                    continue
                info = self.ray.info(job.ray_submission_id or "")
                self._reconcile(job, info)
            except RayUnavailable as exc:
                log.warning("reconcile: %s", exc)
                return  # nothing to learn this round; do not start jobs on a cluster we cannot see
            except objstore.StorageUnavailable as exc:
                log.warning("reconcile job %s: %s", job.id, exc)
            except InvalidTransition as exc:
                log.info("reconcile job %s: %s (changed meanwhile)", job.id, exc)
            except LostLeadership:
                raise
            except Exception:  # one broken job must not stop the others
                log.exception("reconcile job %s failed", job.id)
        self._check_leader()
        self.schedule()

    def _enforce_time_limit(self, job: Job) -> bool:
        """Stop a job that ran past its time limit and fail it; True when it did."""
        limit_h = over_time_limit(job, self.settings.max_job_hours, time.time())
        if limit_h is None:
            return False
        if job.ray_submission_id:
            self._check_leader()
            self.ray.stop(job.ray_submission_id)
        self._fail(job.id, f"time limit: the job ran longer than limits.max_hours={limit_h:g} h")
        return True

    def _reconcile(self, job: Job, info: RayJobInfo | None) -> None:
        """Gather the facts about one active job, let service/engine/decide.py decide, and carry it out."""
        job_dir = self.job_dir(job.id)
        facts = self._facts(job, info, job_dir)
        if facts.run_over and info is not None:  # (a run Ray forgot has no log left there to copy)
            self._copy_log(job, job_dir, final=True)
        action = decide(facts)
        if isinstance(action, Progress):
            self._copy_log(job, job_dir)
            self._record_progress(job, job_dir)
            if action.start and info is not None:
                self._start_running(job, info)
        elif isinstance(action, Stop):
            self._check_leader()
            if self.ray.stop(job.ray_submission_id or ""):
                self.store.transition(job.id, JobState.CANCELLED, message="cancelled by user")
        elif isinstance(action, Cancel):
            self.store.transition(job.id, JobState.CANCELLED, message=action.message)
        elif isinstance(action, Succeed):
            self.store.transition(
                job.id,
                JobState.SUCCEEDED,
                message=None,
                best_val_acc=action.best_val_acc,
                last_epoch=action.last_epoch or job.last_epoch,
            )
        elif isinstance(action, Fail):
            self._fail(job.id, action.message)
        elif isinstance(action, Resubmit) and job.spec_error is not None:
            self._fail(job.id, f"{action.reason}; not restarted: {job.spec_error}")
        elif isinstance(action, Resubmit):
            log.warning("job %s attempt %d failed (%s); resubmitting", job.id, job.attempts, action.log_reason)
            # This attempt's summary (its error is in the attempt log now) must not be mistaken for the next
            # attempt's if that one dies before writing its own.
            jobdir.delete_summary(job_dir)
            self._submit(job, attempt=job.attempts + 1, reason=action.reason, charged=action.charged)

    def _facts(self, job: Job, info: RayJobInfo | None, job_dir: str) -> Facts:
        charged, free = restarts_used(job.attempt_log)
        facts = Facts(
            state=job.state,
            cancel_requested=job.cancel_requested,
            ray_status=info.status if info else None,
            submission_id=job.ray_submission_id or "",
            exit_code=info.exit_code if info else None,
            ray_message=info.message if info else None,
            attempts=job.attempts,
            max_restarts=job.spec.checkpoint.max_restarts,
            charged_restarts=charged,
            free_restarts=free,
            storage_name=objstore.redact(self.settings.storage_root),
        )
        if not facts.run_over:
            return facts
        # The run is over. Storage may be down (that may be why it ended): the job's fate must not wait for
        # it, so what cannot be read now counts as missing and the exit code decides.
        try:
            self._record_progress(job, job_dir)
            return replace(facts, summary=jobdir.read_summary(job_dir))
        except objstore.StorageUnavailable as exc:
            log.warning("job %s ended while storage is unreachable: %s", job.id, exc)
            return replace(facts, storage_up=False)

    def _start_running(self, job: Job, info: RayJobInfo) -> None:
        """STARTING → RUNNING once the driver's workers are placed (or Ray cannot tell); until then the job
        stays STARTING and its message says what it waits for ("waiting for resources: needs 8 CPU, 1.5
        free"), so a job queued behind others on the cluster is never shown as training."""
        placement = self.ray.placement(info)
        waiting = placement.waiting_text() if placement is not None else None
        if waiting is None:
            self.store.transition(
                job.id,
                JobState.RUNNING,
                expect={JobState.STARTING},
                **({"message": None} if _is_wait_message(job.message) else {}),
            )
        elif waiting != job.message:
            self.store.update(job.id, message=waiting)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.transition(job_id, JobState.FAILED, message=message)

    def _record_progress(self, job: Job, job_dir: str) -> None:
        metrics = jobdir.read_metrics(job_dir)
        if not metrics:
            return
        best = contract.best_so_far(metrics)
        last = metrics[-1].epoch
        if not job.state.is_terminal():
            self.images_per_s[job.id] = metrics[-1].images_per_s
        if (best, last) != (job.best_val_acc, job.last_epoch):
            self.store.update(job.id, best_val_acc=best, last_epoch=last)

    # --- logs and deletion -----------------------------------------------------------------------------------

    def _copy_log(self, job: Job, job_dir: str, final: bool = False) -> None:
        """Copy the current attempt's driver log (ANSI colours stripped) to logs/attempt-N.log, at most every
        LOG_COPY_INTERVAL_S while it runs and once at its end, so it survives the Ray head. Best effort: a log
        that cannot be copied now must never hold up reconciling the job."""
        sid = job.ray_submission_id
        if not sid:
            return
        when, length = self._log_copies.get(sid, (0.0, -1))
        if not final and time.monotonic() - when < LOG_COPY_INTERVAL_S:
            return
        try:
            text = strip_ansi(self.ray.logs(sid))
            if length < 0:  # first look in this process (the service restarted): never replace a longer copy
                saved = jobdir.read_attempt_log(job_dir, job.attempts)
                length = len(saved) if saved is not None else -1
            if text and len(text) > length:
                objstore.write_text(jobdir.attempt_log_uri(job_dir, job.attempts), text)
            self._log_copies[sid] = (time.monotonic(), max(len(text), length))
        except Exception as exc:  # noqa: BLE001 - best effort, see above
            log.info("could not copy the log of %s: %s", sid, exc)
        if final:
            self._log_copies.pop(sid, None)

    def logs(self, job: Job, tail: int | None = None, attempt: int | None = None) -> str:
        """The driver log of one attempt, or of every attempt (each under a header) when there were several:
        the running attempt's live from Ray, the others from the copies in the job dir. Raises NoLog saying
        why when there is none."""
        if job.attempts == 0:
            raise NoLog(f"job {job.id} is {job.state} and has not started, so it has no log yet")
        if attempt is not None and not 1 <= attempt <= job.attempts:
            raise NoLog(f"job {job.id} has no attempt {attempt}; it had {job.attempts}")
        job_dir = self.job_dir(job.id)
        numbers = [attempt] if attempt is not None else list(range(1, job.attempts + 1))
        parts, missing = [], []
        for n in numbers:
            text = self._attempt_log(job, job_dir, n)
            if text is None:
                missing.append(n)
                continue
            if len(numbers) > 1:
                entry = next((e for e in job.attempt_log if e.get("attempt") == n), {})
                text = f"=== attempt {n} ({entry.get('submission_id', '?')}): {entry.get('reason', '')} ===\n" + text
            parts.append(text)
        if not parts:
            raise NoLog(
                f"no log was kept for attempt(s) {', '.join(map(str, missing))} of job {job.id}: the Ray "
                "head that ran it no longer knows it and no copy reached the job dir (logs/attempt-N.log)"
            )
        text = "".join(parts)
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        return text

    def _attempt_log(self, job: Job, job_dir: str, attempt: int) -> str | None:
        current = attempt == job.attempts and not job.state.is_terminal()
        if current and job.ray_submission_id:
            try:
                if self.ray.info(job.ray_submission_id) is not None:
                    return strip_ansi(self.ray.logs(job.ray_submission_id))
            except RayUnavailable:
                saved = jobdir.read_attempt_log(job_dir, attempt)
                if saved is None:
                    raise  # 503: the live log is there, just not reachable right now
                return saved
        saved = jobdir.read_attempt_log(job_dir, attempt)
        if saved is not None:
            return saved
        entry = next((e for e in job.attempt_log if e.get("attempt") == attempt), None)
        if entry and entry.get("submission_id"):  # finished before logs were copied: Ray may still have it
            try:
                if self.ray.info(entry["submission_id"]) is not None:
                    return strip_ansi(self.ray.logs(entry["submission_id"]))
            except RayUnavailable:
                pass
        return None

    def delete(self, job: Job, fence_s: float | None = None) -> bool:
        """Delete a terminal job: its storage prefix, its Ray job records (best effort), then its record.

        First the fence: a job CANCELLED a moment ago may still have a driver running (Ray's stop is a
        signal, not a wait), which would write checkpoints into the folder after it was removed. So every
        attempt's Ray job must have ended; each one still live is stopped again and waited for up to
        `fence_s` seconds (default delete_fence_s), else StillStopping (the API answers 409 with
        Retry-After). Ray unreachable: RayUnavailable (503), nothing deleted."""
        if not job.state.is_terminal():
            return False
        self._fence(job, self.delete_fence_s if fence_s is None else fence_s)
        objstore.delete_tree(self.job_dir(job.id))
        for entry in job.attempt_log:
            try:
                self.ray.delete(entry["submission_id"])
            except Exception:  # Ray's records are a convenience, the store is the truth
                log.info("could not delete Ray job %s", entry.get("submission_id"), exc_info=True)
        return self.store.delete(job.id)
