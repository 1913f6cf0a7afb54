"""Fencing: after a network partition, a writer of the run's old worker group must not overwrite the new one's.

A partitioned host keeps running its rank (Ray cannot stop a process it cannot reach) while the controller
restarts the worker group elsewhere from the last checkpoint. When the link returns, the old rank 0 may
still try to write metrics.jsonl, a checkpoint or manifest.json, and would overwrite the epochs the new
group has written since. So every start of a worker group is an attempt with a monotonically increasing
number, recorded in the run's `attempts.json` (trainer/contract.py `Attempts`) beside its metrics, in the
same storage (local dir or S3) the writes go to:

- `claim()`: rank 0 of a starting worker group appends attempt N+1 (the only writer of that file: Ray Train
  starts one worker group of a run at a time, and the old group never claims);
- `check()`: before every metrics, checkpoint and manifest write, rank 0 reads the file and raises
  `StaleAttempt` (writing nothing) when a newer attempt exists;
- readers (`contract.parse_metrics(text, attempts)`) count an epoch's line only from the attempt that owns
  that epoch, so a stale line that slips through the check-then-write window (plain S3 has no conditional
  write for pyarrow to use) is ignored, and the new attempt's next write replaces the whole file again.
"""

from __future__ import annotations

import socket
import time

import objstore
from trainer import contract
from trainer.contract import AttemptRecord, Attempts


class StaleAttempt(RuntimeError):
    """A write by a worker group that a newer attempt of the same run has replaced: nothing was written."""


def attempts_uri(run_root: str) -> str:
    return objstore.join(run_root, contract.ATTEMPTS)


def read(run_root: str) -> Attempts:
    """The run's attempts (none before the first worker group started)."""
    uri = attempts_uri(run_root)
    return contract.parse_attempts(objstore.read_text(uri)) if objstore.exists(uri) else Attempts()


def claim(run_root: str, start_epoch: int, host: str | None = None) -> int:
    """Record a new attempt starting at `start_epoch`; returns its number (1 for a run's first)."""
    attempts = read(run_root)
    number = (attempts.current.attempt if attempts.current else 0) + 1
    record = AttemptRecord(
        attempt=number, start_epoch=start_epoch, started=round(time.time(), 3), host=host or _address()
    )
    objstore.write_text(attempts_uri(run_root), Attempts(attempts=[*attempts.attempts, record]).to_json())
    return number


def check(run_root: str, attempt: int, what: str) -> None:
    """Raise StaleAttempt unless `attempt` is still the run's current one; call it before writing `what`."""
    current = read(run_root).current
    if current is not None and current.attempt != attempt:
        raise StaleAttempt(
            f"refused to write {what}: this worker group is attempt {attempt} of the run in "
            f"{objstore.redact(run_root)}, but attempt {current.attempt} (started at epoch {current.start_epoch} "
            f"on {current.host or 'an unknown host'}) has replaced it, typically after a network partition cut "
            "this host off; this process should exit"
        )


def write_metrics(run_root: str, metrics_uri: str, attempt: int, history: list[contract.EpochMetrics]) -> None:
    """metrics.jsonl as `attempt` (raises StaleAttempt, writing nothing, if it has been replaced)."""
    check(run_root, attempt, objstore.redact(metrics_uri))
    objstore.write_text(metrics_uri, contract.metrics_jsonl(history))


def _address() -> str:
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside Ray (tests, a hand-run writer): the host name says enough
        return socket.gethostname()
