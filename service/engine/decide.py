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
   f. the cluster or the service ended the run (Ray forgot it — the head restarted —, stopped it without
      our cancel, or its driver never exited by itself) → `Resubmit` without using the job's restart
      budget (up to MAX_FREE_RESTARTS such restarts); else restarts left (charged restarts <
      checkpoint.max_restarts) → `Resubmit`; else `Fail`.

A failure's message is one line, the reason first (`DataError: /d/x: file not found (...; not retried)`):
tracebacks stay in the job's log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.engine.rayjobs import RayJobStatus
from service.engine.states import JobState
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
    charged_restarts: int = 0  # resubmissions so far that counted against max_restarts
    free_restarts: int = 0  # resubmissions so far that the cluster or service caused
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
    charged: bool = True  # counts against checkpoint.max_restarts (False: the cluster or service caused it)


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
    """A run ended without success and without our cancel: retry infrastructure failures (free when the
    cluster or service caused them, else within max_restarts), never a user error; a storage outage fails
    the job."""
    if f.ray_status is None:
        reason = f"Ray has no record of {f.submission_id} (head restarted?)"
    else:
        reason = f"Ray job {f.submission_id} {f.ray_status}: {(f.ray_message or '').strip()[:500]}"
    failed = f.summary if f.summary is not None and not f.summary.succeeded() else None
    kind = failed.error_kind if failed else None
    error = reason_line((f.summary.error if f.summary else None) or reason)
    if kind is ErrorKind.USER or f.exit_code == ExitCode.USER:
        return Fail(f"{error} (the job's spec or data is wrong; not retried)")
    if kind is ErrorKind.STORAGE or f.exit_code == ExitCode.STORAGE:
        return Fail(f"storage was unreachable ({f.storage_name}): {error}")
    if cluster_caused(f.ray_status, f.exit_code):
        if f.free_restarts < MAX_FREE_RESTARTS:
            return Resubmit(reason=f"attempt {f.attempts} failed: {error}", log_reason=reason, charged=False)
    elif f.charged_restarts < f.max_restarts:
        return Resubmit(reason=f"attempt {f.attempts} failed: {error}", log_reason=reason)
    return Fail(
        f"{error} (failed after {f.attempts} attempt(s); {f.charged_restarts} restart(s) of "
        f"checkpoint.max_restarts={f.max_restarts} used)"
    )


# Resubmissions after failures the cluster or the service caused do not count against checkpoint.max_restarts;
# this caps them so a cluster that keeps killing a job cannot resubmit it forever.
MAX_FREE_RESTARTS = 10


def cluster_caused(status: RayJobStatus | None, exit_code: int | None) -> bool:
    """Whether a run that ended without success was ended by the cluster or the service, not by the job's
    own code: Ray forgot it (the head restarted), stopped it without our cancel, or its driver never exited
    by itself (no exit code: it never started or its supervisor died; a signal: killed from outside)."""
    if status is None or status is RayJobStatus.STOPPED:
        return True
    return exit_code is None or exit_code < 0 or exit_code in (128 + 9, 128 + 15)


# `trainer.data.DataError: ...` inside the worker traceback Ray wraps an error in: our own error types first.
_OWN_ERROR = re.compile(r"^(?:[\w.]+\.)?((?:DataError|UserError|StorageUnavailable)\b.*)$")
_ANY_ERROR = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)\b:.*)$")


def reason_line(text: str, limit: int = 500) -> str:
    """One line of reason from an error text that may hold tracebacks (Ray wraps a worker's error with its
    traceback): the last line naming one of our own error types, else the last `SomethingError: ...`
    line, else the first line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for pattern in (_OWN_ERROR, _ANY_ERROR):
        found = [m.group(1) for ln in lines if (m := pattern.match(ln))]
        if found:
            line = found[-1]
            break
    else:
        line = lines[0] if lines else str(text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def restarts_used(attempt_log: list[dict[str, object]]) -> tuple[int, int]:
    """(resubmissions charged to checkpoint.max_restarts, free ones the cluster or service caused), from a
    job's attempt log (an entry without `charged` predates the distinction and counts as charged)."""
    later = [e for e in attempt_log if int(str(e.get("attempt", 1))) > 1]
    free = sum(1 for e in later if e.get("charged") is False)
    return len(later) - free, free
