"""Job states and the one table of allowed transitions.

Like Ray's own `JobStatus`, a state knows whether it is terminal; `service.engine.store.Store.transition` is the
only code that changes a job's state, and it consults `can_transition` so a terminal job is never revived.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "QUEUED"  # accepted, waiting for a free slot (max concurrent jobs)
    STARTING = "STARTING"  # spec written, Ray job submitted, driver not running yet
    RUNNING = "RUNNING"  # the Ray job's driver is running
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING})  # these hold a concurrency slot

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    # STARTING -> STARTING / RUNNING -> STARTING: a resubmission after an infrastructure failure.
    # STARTING -> SUCCEEDED: a short job can finish between two reconciler polls.
    JobState.STARTING: frozenset(
        {JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(old: JobState, new: JobState) -> bool:
    return new in _ALLOWED[old]


class InvalidTransition(RuntimeError):
    def __init__(self, job_id: str, old: JobState, new: JobState) -> None:
        super().__init__(f"job {job_id}: cannot go from {old} to {new}")
        self.job_id, self.old, self.new = job_id, old, new


class JobNotFound(LookupError):
    """No job with this id (never created, or deleted)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id
