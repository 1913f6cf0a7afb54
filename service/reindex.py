"""`trainctl reindex`: rebuild lost job records from the storage root's job directories.

Each job directory holds the spec (spec.json), the service's last record of the job (record.json: owner,
state, attempts and their Ray submissions, written at every transition), and what the trainer wrote
(metrics.jsonl, summary.json). A record is recreated from those; a job whose id is still in the database
is left alone, so reindexing a database that lost only some rows is safe, and so is running it twice.

A job that was still STARTING/RUNNING comes back in that state with its Ray submission id: the reconciler
then asks Ray, exactly as after a service restart (still running: it goes on; gone: the usual retry rules).
A QUEUED job has no directory until it is submitted, so it cannot come back; it is reported by nobody.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import objstore
from service import jobdir
from service.states import JobState
from service.store import Job, Store
from trainer import contract
from trainer.contract import RunState, Summary

log = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already in the database
    skipped: dict[str, str] = field(default_factory=dict)  # not a job directory: why


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


def rebuild_job(storage_root: str, job_id: str, default_owner: str) -> Job | str:
    """The record of one job directory, or why there is none."""
    job_dir = jobdir.job_uri(storage_root, job_id)
    spec = jobdir.read_spec(job_dir)
    if spec is None:
        return f"no {contract.SPEC}"
    record = jobdir.read_record(job_dir) or {}
    summary = jobdir.read_summary(job_dir)
    metrics = jobdir.read_metrics(job_dir)
    raw_log = record.get("attempt_log")
    attempt_log: list[dict[str, Any]] = [e for e in raw_log if isinstance(e, dict)] if isinstance(raw_log, list) else []
    attempts = int(record.get("attempts") or len(attempt_log) or 1)
    state = _state(record or None, summary, attempts)
    best = (
        summary.best_val_acc
        if summary is not None and summary.best_val_acc is not None
        else (contract.best_so_far(metrics) if metrics else record.get("best_val_acc"))
    )
    last_epoch = metrics[-1].epoch if metrics else record.get("last_epoch")
    now = time.time()
    message = record.get("message")
    if not record:
        message = "restored by `trainctl reindex` without record.json: owner and history unknown"
    elif state is JobState.SUCCEEDED and record.get("state") != "SUCCEEDED":
        message = None
    return Job(
        seq=0,
        id=job_id,
        owner=str(record.get("owner") or default_owner),
        created_at=float(record.get("created_at") or now),
        updated_at=now,
        state=state,
        spec=spec,
        ray_submission_id=record.get("ray_submission_id") or (f"{job_id}-{attempts}" if attempts else None),
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


def reindex(store: Store, storage_root: str, default_owner: str = "admin") -> ReindexReport:
    report = ReindexReport()
    jobs: list[Job] = []
    for job_id in objstore.list_dir(objstore.join(storage_root, "jobs")):
        if store.get(job_id) is not None:
            report.kept.append(job_id)
            continue
        rebuilt = rebuild_job(storage_root, job_id, default_owner)
        if isinstance(rebuilt, str):
            report.skipped[job_id] = rebuilt
        else:
            jobs.append(rebuilt)
    # Oldest first, so the queue order (the database's sequence) follows the original submissions.
    for job in sorted(jobs, key=lambda j: j.created_at):
        if store.import_job(job):
            report.restored.append(job.id)
        else:
            report.kept.append(job.id)
    return report
