"""What this service's finished jobs measured, as service/common/estimate.py's HistoryRow: the I/O half of estimates.

Read only when an estimate is made (a submission, POST /v1/estimates), never on a status poll. A finished
job's record and metrics.jsonl are final, so each job's row is read from storage once and then kept, keyed
by (job id, row version): an estimate costs one store query for the newest succeeded jobs plus a read of
each job that finished since the last estimate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import objstore
from service.common.estimate import HistoryRow, device_model, spec_key
from service.common.lru import Lru
from service.engine import jobdir
from service.engine.states import JobState
from service.engine.store import Job, Store
from trainer.contract import EpochMetrics

# The newest succeeded jobs an estimate looks at: recent jobs track the current cluster and software.
HISTORY_JOBS = 200
# At most this many metrics.jsonl reads per estimate (the first estimate after a start-up must not read 200
# files from a bucket): the rest are read by the next estimates.
MAX_READS = 25
_ROWS: Lru[tuple[HistoryRow | None]] = Lru(4 * HISTORY_JOBS)  # (row,): None is a job with no usable row


def history_row(job: Job, metrics: list[EpochMetrics]) -> HistoryRow | None:
    """A finished single run's measurements; None for a search, or when its epochs did not record the
    devices and speeds an estimate needs."""
    if job.spec.search is not None:
        return None
    usable = [m for m in metrics if m.images_per_s > 0 and m.epoch_seconds > 0 and m.devices]
    if not usable:
        return None
    devices = usable[-1].devices
    key = spec_key(job.spec).model_copy(update={"device": device_model(devices[0]), "device_count": len(devices)})
    first = metrics[0]
    startup: float | None = None
    if job.attempt_log and not first.resumed and first.epoch == 1:
        submitted = job.attempt_log[0].get("submitted_at")
        if isinstance(submitted, int | float):
            started_training = first.time - first.epoch_seconds
            startup = round(max(0.0, started_training - float(submitted)), 1)
    # What follows the last epoch (final test pass, exports, summary, the service seeing the end), when the
    # last epoch is the run's last (not a job that ended early).
    last = metrics[-1]
    finish = round(job.updated_at - last.time, 1) if last.epoch == job.spec.optim.epochs else None
    return HistoryRow(
        job_id=job.id,
        key=key,
        images_per_s=float(statistics.median(m.images_per_s for m in usable)),
        epoch_seconds=float(statistics.median(m.epoch_seconds for m in usable)),
        startup_seconds=startup,
        finished_at=job.updated_at,
        finish_seconds=finish if finish is not None and finish >= 0 else None,
    )


def collect(store: Store, job_dir: Callable[[str], str], limit: int = HISTORY_JOBS) -> list[HistoryRow]:
    """The HistoryRows of the newest `limit` succeeded jobs (every owner's: the cluster is shared)."""
    jobs, _ = store.list(states=[JobState.SUCCEEDED], limit=limit)
    rows, reads = [], 0
    for job in jobs:
        cache_key = (job.id, job.updated_at)
        hit = _ROWS.get(cache_key)
        if hit is not None:
            row = hit[0]
        else:
            if reads >= MAX_READS:
                continue
            reads += 1
            try:
                metrics = jobdir.read_metrics(job_dir(job.id))
            except objstore.StorageUnavailable:
                continue  # not cached: read again next time
            row = history_row(job, metrics)
            _ROWS.put(cache_key, (row,))
        if row is not None:
            rows.append(row)
    return rows


def clear() -> None:
    _ROWS.clear()
