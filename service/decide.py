"""What to do with an active job, given what Ray and its job directory say: one pure function.

The runner gathers the facts (the Ray job's status and exit code, the run's summary.json, whether storage
answered, the restart budget) and acts on the `Action` this module returns; nothing here does I/O, so every
combination is tested as a table (tests/service/test_decide.py). The precedence, first match wins:

1. The Ray job is still PENDING/RUNNING:
   a cancel was requested (and could not reach Ray before) → `Stop`; RUNNING → `Progress` (and
   STARTING → RUNNING); PENDING → `Wait`.
2. The run is over (a terminal status, or Ray has no record of it — the head restarted):
   a. a cancel was requested and the run did not succeed → `Cancel` (the user asked; a failure or a stop
      after the request is that cancel);
   b. storage did not answer and the exit code does not say storage → `Wait` (summary.json may say more
      than the exit code once storage is back);
   c. SUCCEEDED → `Succeed` with the summary's figures, or `Fail` if there is no successful summary;
   d. the summary's error kind or the exit code says the spec/data is wrong → `Fail`, never retried;
   e. ... says storage was unreachable → `Fail` (retrying into a dead store cannot help);
   f. restarts left (attempts - 1 < checkpoint.max_restarts) → `Resubmit`; else `Fail`.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.rayjobs import RayJobStatus
from service.states import JobState
from trainer.contract import ErrorKind, ExitCode, Summary


@dataclass(frozen=True)
class Facts:
    """Everything the decision depends on."""

    state: JobState  # the job's state in the store (STARTING or RUNNING)
    cancel_requested: bool
    ray_status: RayJobStatus | None  # None: Ray has no record of the submission
    submission_id: str
    exit_code: int | None = None  # the driver's, once it ended
    ray_message: str | None = None
    summary: Summary | None = None  # summary.json (None: missing, unreadable, or storage down)
    storage_up: bool = True
    attempts: int = 1
    max_restarts: int = 0
    storage_name: str = "storage"  # how to name the storage in a message (redacted)

    @property
    def run_over(self) -> bool:
        return self.ray_status is None or self.ray_status.is_terminal()


@dataclass(frozen=True)
class Wait:
    """Nothing to do this round."""


@dataclass(frozen=True)
class Progress:
    """Record the epochs so far; `start` moves a STARTING job to RUNNING."""

    start: bool


@dataclass(frozen=True)
class Stop:
    """Stop the Ray job (a cancel requested earlier could not reach Ray); CANCELLED once Ray agrees."""


@dataclass(frozen=True)
class Cancel:
    message: str = "cancelled by user"


@dataclass(frozen=True)
class Succeed:
    best_val_acc: float | None
    last_epoch: int | None


@dataclass(frozen=True)
class Fail:
    message: str


@dataclass(frozen=True)
class Resubmit:
    reason: str  # for the attempt log and the job's message
    log_reason: str  # what ended this attempt, for the service log


Action = Wait | Progress | Stop | Cancel | Succeed | Fail | Resubmit


def decide(f: Facts) -> Action:
    if not f.run_over:
        if f.cancel_requested:
            return Stop()
        if f.ray_status is RayJobStatus.RUNNING:
            return Progress(start=f.state is JobState.STARTING)
        return Wait()
    succeeded = f.ray_status is RayJobStatus.SUCCEEDED
    if f.cancel_requested and not succeeded:
        return Cancel()
    if not f.storage_up and f.exit_code != ExitCode.STORAGE:
        return Wait()
    if succeeded:
        if f.summary is not None and f.summary.succeeded():
            return Succeed(best_val_acc=f.summary.best_val_acc, last_epoch=f.summary.epochs_completed or None)
        return Fail("the trainer exited 0 but wrote no successful summary.json")
    return _after_failure(f)


def _after_failure(f: Facts) -> Action:
    """A run ended without success and without our cancel: retry infrastructure failures up to
    max_restarts times, never a user error; a storage outage fails the job."""
    if f.ray_status is None:
        reason = f"Ray has no record of {f.submission_id} (head restarted?)"
    else:
        reason = f"Ray job {f.submission_id} {f.ray_status}: {(f.ray_message or '').strip()[:500]}"
    failed = f.summary if f.summary is not None and not f.summary.succeeded() else None
    kind = failed.error_kind if failed else None
    error = (f.summary.error if f.summary else None) or reason
    if kind is ErrorKind.USER or f.exit_code == ExitCode.USER:
        return Fail(f"the job's spec or data is wrong (not retried): {error}")
    if kind is ErrorKind.STORAGE or f.exit_code == ExitCode.STORAGE:
        return Fail(f"storage was unreachable ({f.storage_name}): {error}")
    if f.attempts - 1 < f.max_restarts:
        return Resubmit(reason=f"attempt {f.attempts} failed: {error}", log_reason=reason)
    return Fail(f"failed after {f.attempts} attempt(s): {error}")
