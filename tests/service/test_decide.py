"""service/engine/decide.py: the runner's decision, row by row (job state x Ray status x what the run left behind)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from service.engine.decide import (
    MAX_FREE_RESTARTS,
    Action,
    Cancel,
    Facts,
    Fail,
    Progress,
    Resubmit,
    Stop,
    Succeed,
    Wait,
    cluster_caused,
    decide,
)
from service.engine.rayjobs import RayJobInfo, RayJobStatus
from service.engine.states import JobState
from trainer.contract import ErrorKind, RunState, Summary

S, R = JobState.STARTING, JobState.RUNNING
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = (
    RayJobStatus.PENDING,
    RayJobStatus.RUNNING,
    RayJobStatus.STOPPED,
    RayJobStatus.SUCCEEDED,
    RayJobStatus.FAILED,
)
GONE = None  # Ray has no record of the submission

OK = Summary(state=RunState.SUCCEEDED, best_val_acc=0.4, epochs_completed=3)
USER = Summary(state=RunState.FAILED, error="data.train: no such file", error_kind=ErrorKind.USER)
STORAGE = Summary(state=RunState.FAILED, error="s3 timed out", error_kind=ErrorKind.STORAGE)
INFRA = Summary(state=RunState.FAILED, error="worker group died", error_kind=ErrorKind.INFRA)


def facts(
    state: JobState = R,
    status: RayJobStatus | None = RUNNING,
    *,
    cancel: bool = False,
    exit_code: int | None = None,
    summary: Summary | None = None,
    storage_up: bool = True,
    attempts: int = 1,
    max_restarts: int = 2,
    charged: int = 0,
    free: int = 0,
) -> Facts:
    return Facts(
        state=state,
        cancel_requested=cancel,
        ray_status=status,
        submission_id="j-1",
        exit_code=exit_code,
        ray_message="driver said so",
        summary=summary,
        storage_up=storage_up,
        attempts=attempts,
        max_restarts=max_restarts,
        charged_restarts=charged,
        free_restarts=free,
        storage_name="s3://bucket/root",
    )


ROWS: list[tuple[str, Facts, type[Action], str]] = [
    # --- the run goes on ---------------------------------------------------------------------------------
    ("pending stays", facts(S, PENDING), Wait, ""),
    ("pending, running job", facts(R, PENDING), Wait, ""),
    ("starting -> running", facts(S, RUNNING), Progress, "start=True"),
    ("running records progress", facts(R, RUNNING), Progress, "start=False"),
    ("cancel not yet told to Ray: pending", facts(S, PENDING, cancel=True), Stop, ""),
    ("cancel not yet told to Ray: running", facts(R, RUNNING, cancel=True), Stop, ""),
    ("storage down while running: keep going", facts(R, RUNNING, storage_up=False), Progress, ""),
    # --- cancel requested, run over ------------------------------------------------------------------------
    ("cancel then stopped", facts(R, STOPPED, cancel=True), Cancel, "cancelled by user"),
    ("cancel then failed", facts(R, FAILED, cancel=True, exit_code=1, summary=INFRA), Cancel, ""),
    ("cancel then user error", facts(R, FAILED, cancel=True, exit_code=2, summary=USER), Cancel, ""),
    ("cancel then Ray forgot it", facts(R, GONE, cancel=True), Cancel, ""),
    ("cancel while storage down", facts(R, FAILED, cancel=True, exit_code=1, storage_up=False), Cancel, ""),
    ("cancel too late: it succeeded", facts(R, SUCCEEDED, cancel=True, exit_code=0, summary=OK), Succeed, "0.4"),
    # --- storage down when the run ended -------------------------------------------------------------------
    ("storage down, exit 1: wait for the summary", facts(R, FAILED, exit_code=1, storage_up=False), Wait, ""),
    ("storage down, exit 0: wait", facts(R, SUCCEEDED, exit_code=0, storage_up=False), Wait, ""),
    ("storage down, Ray forgot: wait", facts(R, GONE, storage_up=False), Wait, ""),
    (
        "storage down, exit 3: fail now",
        facts(R, FAILED, exit_code=3, storage_up=False),
        Fail,
        "storage was unreachable (s3://bucket/root)",
    ),
    # --- succeeded ---------------------------------------------------------------------------------------
    ("succeeded with summary", facts(R, SUCCEEDED, exit_code=0, summary=OK), Succeed, "last_epoch=3"),
    ("succeeded from STARTING", facts(S, SUCCEEDED, exit_code=0, summary=OK), Succeed, ""),
    ("succeeded without summary", facts(R, SUCCEEDED, exit_code=0), Fail, "wrote no successful summary.json"),
    ("succeeded, summary says failed", facts(R, SUCCEEDED, exit_code=0, summary=INFRA), Fail, "summary.json"),
    # --- failed: user errors are never retried ----------------------------------------------------------------
    (
        "user error by summary",
        facts(R, FAILED, exit_code=2, summary=USER),
        Fail,
        "message=\"data.train: no such file (the job's spec or data is wrong; not retried)",
    ),
    ("user error by exit code only", facts(R, FAILED, exit_code=2), Fail, "not retried"),
    ("user error by summary, odd exit", facts(R, FAILED, exit_code=1, summary=USER), Fail, "not retried"),
    # --- failed: storage ------------------------------------------------------------------------------------
    ("storage by summary", facts(R, FAILED, exit_code=3, summary=STORAGE), Fail, "unreachable (s3://bucket/root): s3"),
    ("storage by exit code", facts(R, FAILED, exit_code=3), Fail, "storage was unreachable"),
    # --- failed: infrastructure, retried within the budget ------------------------------------------------------
    (
        "infra, restarts left",
        facts(R, FAILED, exit_code=1, summary=INFRA),
        Resubmit,
        "attempt 1 failed: worker group died",
    ),
    ("infra error is charged", facts(R, FAILED, exit_code=1, summary=INFRA), Resubmit, "charged=True"),
    # the cluster or the service ended the run: resubmitted without using the budget
    ("driver killed, no summary", facts(R, FAILED, exit_code=-9), Resubmit, "charged=False"),
    ("driver killed: its reason", facts(R, FAILED, exit_code=-9), Resubmit, "Ray job j-1 FAILED: driver said so"),
    ("stopped by someone else", facts(R, STOPPED, summary=INFRA), Resubmit, "worker group died"),
    ("Ray forgot the job", facts(R, GONE), Resubmit, "Ray has no record of j-1 (head restarted?)"),
    ("Ray forgot it, budget spent: still free", facts(R, GONE, attempts=3, charged=2), Resubmit, "charged=False"),
    ("Ray forgot it an 11th time", facts(R, GONE, attempts=12, free=10), Fail, "no record"),
    ("Ray forgot a starting job", facts(S, GONE), Resubmit, "no record"),
    ("a stale succeeded summary does not count", facts(R, FAILED, exit_code=1, summary=OK), Resubmit, "FAILED"),
    (
        "last restart used",
        facts(R, FAILED, exit_code=1, summary=INFRA, attempts=3, max_restarts=2, charged=2),
        Fail,
        "worker group died (failed after 3 attempt(s); 2 restart(s) of checkpoint.max_restarts=2 used)",
    ),
    ("no restarts allowed", facts(R, FAILED, exit_code=1, max_restarts=0), Fail, "after 1 attempt(s)"),
    (
        "a traceback becomes one line",
        facts(
            R,
            FAILED,
            exit_code=2,
            summary=Summary(
                state=RunState.FAILED,
                error_kind=ErrorKind.USER,
                error='TrainingFailedError: worker errors:\nTraceback (most recent call last):\n  File "x.py"\n'
                "trainer.data.DataError: /d/train.parquet: file not found\n",
            ),
        ),
        Fail,
        'message="DataError: /d/train.parquet: file not found (the job',
    ),
]


@pytest.mark.parametrize("name, f, kind, detail", ROWS, ids=[r[0] for r in ROWS])
def test_decision_table(name: str, f: Facts, kind: type[Action], detail: str) -> None:
    action = decide(f)
    assert isinstance(action, kind), (name, action)
    assert detail in repr(action), (name, action)


def test_the_table_covers_every_state_and_ray_status() -> None:
    seen = {(f.state, f.ray_status) for _, f, _, _ in ROWS}
    for state, status in itertools.product((S, R), (*RayJobStatus, None)):
        if (state, status) in seen:
            continue
        # the few combinations not listed decide as their RUNNING-job twin does (bar Progress.start)
        assert type(decide(facts(state, status))) is type(decide(facts(R if state is S else S, status)))


ALL = [
    facts(
        state,
        status,
        cancel=cancel,
        exit_code=code,
        summary=summary,
        storage_up=up,
        attempts=attempts,
        charged=attempts - 1,
    )
    for state, status, cancel, code, summary, up, attempts in itertools.product(
        (S, R),
        (*RayJobStatus, None),
        (False, True),
        (None, 0, 1, 2, 3, -9),
        (None, OK, USER, STORAGE, INFRA),
        (True, False),
        (1, 3),
    )
]


def test_invariants_over_every_combination() -> None:
    assert len(ALL) == 2880
    for f in ALL:
        _check_invariants(f, decide(f))


def _check_invariants(f: Facts, action: Action) -> None:
    over = f.ray_status is None or f.ray_status.is_terminal()
    if not over:  # a live run is never ended by the service except through Ray
        assert isinstance(action, Stop if f.cancel_requested else (Progress, Wait))
        return
    if f.cancel_requested and f.ray_status is not RayJobStatus.SUCCEEDED:
        assert isinstance(action, Cancel)  # the user asked: a failure after a cancel is that cancel
    if isinstance(action, Succeed):
        assert f.ray_status is RayJobStatus.SUCCEEDED and f.summary is OK
    if isinstance(action, Resubmit):  # only infrastructure failures, only within the budget
        assert f.exit_code not in (2, 3) and f.summary not in (USER, STORAGE)
        # a failure of the job's own run uses its budget; one the cluster or service caused never does
        assert action.charged is not cluster_caused(f.ray_status, f.exit_code)
        assert f.charged_restarts < f.max_restarts if action.charged else f.free_restarts < MAX_FREE_RESTARTS
        assert not f.cancel_requested and f.storage_up
    if not f.storage_up and f.exit_code != 3 and not f.cancel_requested:
        assert isinstance(action, Wait)  # the summary may say more once storage is back


def test_ray_status_enum() -> None:
    assert [s for s in RayJobStatus if s.is_terminal()] == [STOPPED, SUCCEEDED, FAILED]
    assert RayJobInfo("RUNNING").status is RUNNING  # type: ignore[arg-type]
    from ray.job_submission import JobStatus  # Ray's own enum converts by value, both ways

    assert {RayJobStatus(str(s)) for s in JobStatus} == set(RayJobStatus)
    assert all(RayJobStatus(str(s)).is_terminal() == s.is_terminal() for s in JobStatus)
    assert replace(facts(), ray_status=None).run_over
