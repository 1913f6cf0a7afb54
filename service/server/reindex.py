"""`trainctl reindex`: rebuild lost job records from the storage root's job directories.

Each job directory holds the spec (spec.json), the service's last record of the job (record.json: owner,
state, attempts and their Ray submissions, written at every transition), and what the trainer wrote
(metrics.jsonl, summary.json). A record is recreated from those; a job whose id is still in the database
is left alone, so reindexing a database that lost only some rows is safe, and so is running it twice.

Nothing in storage is trusted for being there (docs/security.md): whoever can write the bucket could plant
a job directory. So every spec is validated again against the current limits (the spec's own ceilings and
this service's TRAINCTL_MAX_* and data roots), a record is believed only when its signature verifies under
the service's record key (service/engine/records.py), and a job's Ray submission id is always re-derived from its
id and attempt count (`<id>-<attempt>`, as the runner names them), never read from a file. A directory
without a verified record is skipped, or with `unsigned_owner` restored as a finished job of that owner (never
the admin's, never running, no Ray submission). The report says what was skipped and why.

A job that was still STARTING/RUNNING comes back in that state with its Ray submission id: the reconciler
then asks Ray, exactly as after a service restart (still running: it goes on; gone: the usual retry rules).
A QUEUED job has no directory until it is submitted, so it cannot come back; it is reported by nobody.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

import objstore
from service.api import policy
from service.api.auth import ADMIN
from service.engine import jobdir, records
from service.engine.states import JobState
from service.engine.store import Job, Store, parse_stored_spec
from trainer import contract
from trainer.contract import RunState, Summary
from trainer.spec import JobSpec, error_list

if TYPE_CHECKING:
    from service.common.settings import Settings

log = logging.getLogger(__name__)


UNSIGNED_MESSAGE = "restored by `trainctl reindex` from unsigned files: owner, history and results unverified"

# The shape of the ids the store makes (secrets.token_urlsafe(16)), with room for older or longer ones.
JOB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


@dataclass
class ReindexReport:
    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already in the database
    skipped: dict[str, str] = field(default_factory=dict)  # not restored: why
    unsigned: list[str] = field(default_factory=list)  # restored from unsigned files (as finished jobs)


def _state(record: dict[str, Any] | None, summary: Summary | None, attempts: int) -> JobState:
    recorded = None
    if record and record.get("state") in JobState.__members__:
        recorded = JobState(record["state"])
    if recorded is not None and recorded.is_terminal():
        return recorded
    if summary is not None and summary.state is RunState.SUCCEEDED:
        return JobState.SUCCEEDED  # the trainer finished after the last record was written
    if recorded is not None:
        return recorded
    return JobState.STARTING if attempts else JobState.QUEUED


def spec_problem(spec: dict[str, Any], settings: Settings | None) -> str | None:
    """Why a stored spec may not become a job under the current limits, or None."""
    try:
        parsed = JobSpec.model_validate(spec)
    except ValidationError as exc:
        first = error_list(exc)[0]
        return f"{contract.SPEC} is not a valid spec under the current limits: {first['field']}: {first['message']}"
    if settings is None:
        return None
    problems = policy.limit_problems(parsed, settings)
    for field_name, uri in (("data.train", parsed.data.train), ("data.test", parsed.data.test)):
        if uri is not None and not objstore.within_any(uri, settings.allowed_data_roots):
            problems.append({"field": field_name, "message": "outside this service's data roots"})
    if problems:
        return f"{contract.SPEC} exceeds this service's limits: {problems[0]['field']}: {problems[0]['message']}"
    return None


def rebuild_job(
    storage_root: str,
    job_id: str,
    key: bytes | None,
    settings: Settings | None = None,
    unsigned_owner: str | None = None,
) -> Job | str:
    """The record of one job directory, or why there is none."""
    if not JOB_ID.match(job_id):
        return "not a job id"
    job_dir = jobdir.job_uri(storage_root, job_id)
    spec = jobdir.read_spec(job_dir)
    if spec is None:
        return f"no {contract.SPEC}"
    problem = spec_problem(spec, settings)
    if problem:
        return problem
    record = jobdir.read_record(job_dir)
    if record is not None and records.verified(key, job_id, record, spec):
        return _from_record(storage_root, job_id, spec, record)
    why = (
        f"no {jobdir.RECORD}"
        if record is None
        else f"{jobdir.RECORD} is not signed"
        if records.SIGNATURE not in record
        else f"{jobdir.RECORD}'s signature does not verify (another service's key, or the record or spec changed)"
    )
    if key is None:
        why += " (and there is no record key to verify with)"
    if unsigned_owner is None:
        return f"{why}: not trusted; restore it as a finished job with --unsigned-owner NAME"
    return _from_unsigned(storage_root, job_id, spec, unsigned_owner)


def _from_unsigned(storage_root: str, job_id: str, spec: dict[str, Any], owner: str) -> Job:
    """A finished job of `owner`, from files nobody vouches for: no history, no Ray submission, never active
    (only a terminal state: the reconciler leaves it alone)."""
    job_dir = jobdir.job_uri(storage_root, job_id)
    summary = jobdir.read_summary(job_dir)
    metrics = jobdir.read_metrics(job_dir)
    succeeded = summary is not None and summary.state is RunState.SUCCEEDED
    now = time.time()
    return Job(
        seq=0,
        id=job_id,
        owner=owner,
        created_at=now,
        updated_at=now,
        state=JobState.SUCCEEDED if succeeded else JobState.FAILED,
        spec=parse_stored_spec(spec)[0],  # validated above (spec_problem): no fields reset
        ray_submission_id=None,
        attempts=0,
        attempt_log=[],
        message=UNSIGNED_MESSAGE,
        best_val_acc=summary.best_val_acc
        if summary is not None and summary.best_val_acc is not None
        else (contract.best_so_far(metrics) if metrics else None),
        last_epoch=metrics[-1].epoch if metrics else None,
        cancel_requested=False,
    )


def _from_record(storage_root: str, job_id: str, spec: dict[str, Any], record: dict[str, Any]) -> Job:
    """The job as the service's own (signed) record describes it."""
    job_dir = jobdir.job_uri(storage_root, job_id)
    summary = jobdir.read_summary(job_dir)
    metrics = jobdir.read_metrics(job_dir)
    raw_log = record.get("attempt_log")
    attempt_log: list[dict[str, Any]] = [e for e in raw_log if isinstance(e, dict)] if isinstance(raw_log, list) else []
    attempts = int(record.get("attempts") or len(attempt_log) or 1)
    state = _state(record, summary, attempts)
    best = (
        summary.best_val_acc
        if summary is not None and summary.best_val_acc is not None
        else (contract.best_so_far(metrics) if metrics else record.get("best_val_acc"))
    )
    last_epoch = metrics[-1].epoch if metrics else record.get("last_epoch")
    message = record.get("message")
    if state is JobState.SUCCEEDED and record.get("state") != "SUCCEEDED":
        message = None
    return Job(
        seq=0,
        id=job_id,
        owner=str(record.get("owner")),
        created_at=float(record.get("created_at") or time.time()),
        updated_at=time.time(),
        state=state,
        spec=parse_stored_spec(spec)[0],  # validated above (spec_problem): no fields reset
        # Re-derived, never read: the runner names attempt N of job J `J-N`, so this is J's own Ray job.
        ray_submission_id=f"{job_id}-{attempts}" if record.get("ray_submission_id") else None,
        attempts=attempts,
        attempt_log=attempt_log,
        message=message,
        best_val_acc=best,
        last_epoch=last_epoch,
        cancel_requested=bool(record.get("cancel_requested")),
        idempotency_key=record.get("idempotency_key"),
        request_hash=record.get("request_hash"),
        name=record.get("name"),
        project=record.get("project"),
        tags=[str(t) for t in record.get("tags") or [] if isinstance(t, str)][:32],
        parent=record.get("parent"),
    )


def reindex(
    store: Store,
    storage_root: str,
    key: bytes | None,
    settings: Settings | None = None,
    unsigned_owner: str | None = None,
) -> ReindexReport:
    """Restore every job directory missing from the database that passes the checks above. `key`: the record
    key (service/engine/records.py); `settings`: this service's limits and data roots (None: the spec's own ceilings
    only); `unsigned_owner`: who gets jobs whose record does not verify (None: they are skipped)."""
    if unsigned_owner is not None and unsigned_owner == ADMIN:
        raise ValueError(f"unsigned job directories may not become {ADMIN!r}'s jobs: name an ordinary owner")
    report = ReindexReport()
    jobs: list[Job] = []
    for job_id in objstore.list_dir(objstore.join(storage_root, "jobs")):
        if store.get(job_id) is not None:
            report.kept.append(job_id)
            continue
        rebuilt = rebuild_job(storage_root, job_id, key, settings, unsigned_owner)
        if isinstance(rebuilt, str):
            report.skipped[job_id] = rebuilt
        else:
            jobs.append(rebuilt)
            if rebuilt.message == UNSIGNED_MESSAGE:
                report.unsigned.append(job_id)
    # Oldest first, so the queue order (the database's sequence) follows the original submissions.
    for job in sorted(jobs, key=lambda j: j.created_at):
        if store.import_job(job):
            report.restored.append(job.id)
        else:
            report.kept.append(job.id)
    return report
