"""trainer/infra.py: a lost node is an infrastructure loss, charged to checkpoint.max_infra_failures, never to
max_failures; the job's own exception still is. Ray's real exception types, built as its controller gets
them; no cluster."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from ray.core.generated.common_pb2 import ActorDiedErrorContext, NodeDeathInfo
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.train import FailureConfig
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from trainer import contract, infra
from trainer.contract import EpochMetrics, InfraLoss, Manifest
from trainer.infra import Cause, InfraAwareFailurePolicy, LossRecorder

NODE_ID = "3f" * 28
WORKER_INFO = (
    "A worker health check failed.\nWorker info: Worker(\n  actor=Actor(RayTrainWorker, 0a1b),\n"
    f"  metadata=ActorMetadata(\n    hostname='h2',\n    node_id='{NODE_ID}',\n    node_ip='10.77.0.3',\n"
    "    pid=4242,\n  ),\n)"
)


def node_died(preempted: bool = False) -> WorkerHealthCheckFailedError:
    """What the controller's poll of a rank whose host died ends in (ray/train/v2 worker_group.py)."""
    context = ActorDiedErrorContext(
        error_message=f"The actor died because its node has died. Node Id: {NODE_ID}",
        node_ip_address="10.77.0.3",
        actor_id=b"\x01" * 16,
        class_name="RayTrainWorker",
        pid=4242,
    )
    if preempted:
        context.node_death_info.reason = NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED
    return WorkerHealthCheckFailedError(WORKER_INFO, failure=ActorDiedError(context))


def process_died() -> WorkerHealthCheckFailedError:
    """A rank's own process died (e.g. killed for memory) on a healthy node: the job's."""
    context = ActorDiedErrorContext(
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR",
        actor_id=b"\x02" * 16,
        class_name="RayTrainWorker",
    )
    return WorkerHealthCheckFailedError(WORKER_INFO, failure=ActorDiedError(context))


PEER_LOST = RuntimeError(
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.77.0.3]:21001: Connection reset by peer"
)
OWN = ValueError("boom: the job's own code")


def group_error(**failures: BaseException) -> WorkerGroupError:
    return WorkerGroupError("test", {int(k.removeprefix("r")): e for k, e in failures.items()})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(max_failures: int = 0, max_infra: int = 2, **kw: object) -> tuple[InfraAwareFailurePolicy, list, Clock]:
    recorded: list[infra.Verdict] = []
    clock = Clock()
    p = InfraAwareFailurePolicy(
        FailureConfig(max_failures=max_failures), max_infra, record=recorded.append, clock=clock, **kw
    )
    return p, recorded, clock


# --- classification ---------------------------------------------------------------------------------------


def test_a_dead_node_is_infrastructure_with_its_address_and_node_id() -> None:
    verdict = infra.classify_failure(node_died())
    assert verdict.cause is Cause.NODE_LOST
    assert (verdict.host, verdict.node_id) == ("10.77.0.3", NODE_ID)
    assert "its node has died" in verdict.reason


def test_a_worker_silent_past_the_health_check_timeout_is_lost_with_its_host() -> None:
    from ray.train.v2._internal.exceptions import WorkerHealthCheckTimeoutError

    silent = WorkerHealthCheckTimeoutError("A worker health check has been hanging for 10.50 seconds.\n" + WORKER_INFO)
    verdict = infra.classify_failure(silent)
    assert (verdict.cause, verdict.host, verdict.node_id) == (Cause.NODE_LOST, "10.77.0.3", NODE_ID)


def test_own_exceptions_and_a_dead_process_on_a_live_node_are_the_jobs() -> None:
    assert infra.classify_failure(OWN).cause is Cause.OWN
    assert infra.classify_failure(process_died()).cause is Cause.OWN


def test_a_vanished_peer_or_an_unreachable_actor_leaves_it_open() -> None:
    assert infra.classify_failure(PEER_LOST) == infra.Verdict(Cause.PEER_LOST, "10.77.0.3", None, str(PEER_LOST))
    unreachable = WorkerHealthCheckFailedError(WORKER_INFO, failure=ActorUnavailableError("RPC failed", None))
    assert infra.classify_failure(unreachable).cause is Cause.PEER_LOST


def test_a_node_death_wins_over_the_collateral_errors_of_the_other_ranks() -> None:
    assert infra.classify({0: PEER_LOST, 1: node_died()}).cause is Cause.NODE_LOST
    assert infra.classify({0: OWN, 1: node_died()}).cause is Cause.NODE_LOST
    assert infra.classify({0: OWN, 1: PEER_LOST}).cause is Cause.OWN  # the bug took its peer down


# --- the policy -------------------------------------------------------------------------------------------


def test_a_lost_host_is_retried_with_max_failures_0_and_recorded() -> None:
    p, recorded, _ = policy(max_failures=0, max_infra=2)
    assert p.make_decision(group_error(r0=PEER_LOST, r1=node_died())) is FailureDecision.RETRY
    assert p.make_decision(group_error(r1=node_died())) is FailureDecision.RETRY
    assert [v.host for v in recorded] == ["10.77.0.3", "10.77.0.3"]
    # the infra budget is bounded: the third loss ends the run
    assert p.make_decision(group_error(r1=node_died())) is FailureDecision.RAISE
    assert p.infra_failures == 3 and len(recorded) == 2


def test_the_jobs_own_exception_is_still_charged_to_max_failures() -> None:
    p, recorded, _ = policy(max_failures=1, max_infra=5)
    assert p.make_decision(group_error(r0=OWN)) is FailureDecision.RETRY  # 1 of max_failures=1
    assert p.make_decision(group_error(r0=OWN)) is FailureDecision.RAISE
    assert recorded == [] and p.infra_failures == 0


def test_infra_losses_leave_max_failures_whole() -> None:
    p, _, _ = policy(max_failures=1, max_infra=5)
    for _ in range(3):
        assert p.make_decision(group_error(r1=node_died())) is FailureDecision.RETRY
    assert p.make_decision(group_error(r0=OWN)) is FailureDecision.RETRY  # max_failures still unused
    assert p.make_decision(group_error(r0=OWN)) is FailureDecision.RAISE


def test_a_vanished_peer_is_infrastructure_once_the_other_ranks_had_time_to_say_otherwise() -> None:
    p, recorded, clock = policy(max_failures=0, peer_settle_s=10)
    assert p.make_decision(group_error(r0=PEER_LOST)) is FailureDecision.NOOP  # the controller polls again
    clock.now = 5
    assert p.make_decision(group_error(r0=PEER_LOST)) is FailureDecision.NOOP
    clock.now = 11  # nothing else reported: the peer's host is gone (before Ray has declared the node dead)
    assert p.make_decision(group_error(r0=PEER_LOST)) is FailureDecision.RETRY
    assert [(v.cause, v.host) for v in recorded] == [(Cause.PEER_LOST, "10.77.0.3")]
    # next time the peer's own process died on a live node, reported within the settle time: the job's
    clock.now = 100
    assert p.make_decision(group_error(r0=PEER_LOST)) is FailureDecision.NOOP
    clock.now = 101
    assert p.make_decision(group_error(r0=PEER_LOST, r1=process_died())) is FailureDecision.RAISE
    assert len(recorded) == 1 and p.infra_failures == 1


def test_preemptions_and_controller_errors_keep_rays_own_rules() -> None:
    p, recorded, _ = policy(max_failures=0, max_infra=0)
    # Ray's max_preemption_failures (-1: unbounded by default), not our infra budget
    assert p.make_decision(group_error(r1=node_died(preempted=True))) is FailureDecision.RETRY
    assert recorded == []
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    assert p.make_decision(ControllerError(WorkerGroupStartupTimeoutError(2))) is FailureDecision.RETRY


def test_rays_trainer_still_hands_its_failure_policy_to_the_controller() -> None:
    """InfraAwareTorchTrainer swaps the policy in at `_initialize_and_run_controller(failure_policy=...)`:
    a Ray upgrade that moves it must fail here, not silently charge lost hosts to max_failures again."""
    source = inspect.getsource(DataParallelTrainer.fit)
    assert "failure_policy=create_failure_policy(" in source
    assert "_initialize_and_run_controller(" in source


# --- the record and the view's line -----------------------------------------------------------------------


def _row(epoch: int, t: float, node_ids: list[str]) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch, train_loss=1, train_acc=0.5, val_loss=None, val_acc=0, lr=0.1, images_per_s=1,
        epoch_seconds=1, time=t, node_ids=node_ids,
    )  # fmt: skip


def test_the_recorder_and_the_resumed_run_say_where_and_from_which_epoch(tmp_path: Path) -> None:
    root = str(tmp_path)
    (tmp_path / contract.METRICS).write_text(
        contract.metrics_jsonl([_row(e, 100.0 + e, ["a", "b"]) for e in (1, 2, 3)])
    )
    (tmp_path / contract.MANIFEST).write_text(Manifest(latest_epoch=2).to_json())
    LossRecorder(root)(infra.classify_failure(node_died()))
    (loss,) = contract.parse_infra_losses((tmp_path / contract.INFRA_LOSSES).read_text())
    assert (loss.host, loss.lost_at_epoch, loss.checkpoint_epoch) == ("10.77.0.3", 4, 2)
    # the restarted run resumes from epoch 2's checkpoint, on node "c" instead of "b"
    history = [_row(e, 100.0 + e, ["a", "b"]) for e in (1, 2)]
    pending = infra.pending_losses(root, history)
    assert pending == [loss]
    (done,) = infra.resumed(pending, history, start_epoch=3, node_ids=["a", "c"])
    assert done.describe() == "worker host 10.77.0.3 lost at epoch 4; resumed from epoch 2 on a replacement host"
    # an older loss, before the last kept epoch ended, belongs to an earlier restart
    assert infra.pending_losses(root, [_row(9, loss.time + 1, ["a"])]) == []


def test_describe_without_an_address_or_a_resume_yet() -> None:
    loss = InfraLoss(time=1, node_id="ab", lost_at_epoch=3, checkpoint_epoch=2)
    assert loss.describe() == "worker node ab lost at epoch 3; restarting from the checkpoint of epoch 2"
    same = loss.model_copy(update={"resumed_from_epoch": 2, "replacement": False})
    assert same.describe() == "worker node ab lost at epoch 3; resumed from epoch 2 on the remaining hosts"


@pytest.mark.parametrize("bad", ["", "not json\n", '{"time": 1}\n'])
def test_a_torn_or_invalid_loss_line_is_skipped(bad: str) -> None:
    good = InfraLoss(time=1, host="h", lost_at_epoch=1).model_dump_json() + "\n"
    assert [x.host for x in contract.parse_infra_losses(good + bad + good)] == ["h", "h"]


def test_no_dataset_actor_without_ray_datasets(tmp_path: Path) -> None:
    """Ray's DatasetsCallback starts a DatasetManager actor (a process) per worker group even with nothing to
    shard; trainctl's workers read their own data, so it is left out, and kept when Ray Datasets are given."""
    from ray.train import RunConfig
    from ray.train.v2._internal.callbacks import DatasetsCallback

    from trainer.infra import InfraAwareTorchTrainer

    def callbacks(**datasets: object) -> list[type]:
        trainer = InfraAwareTorchTrainer(
            lambda: None,
            run_config=RunConfig(storage_path=str(tmp_path)),
            datasets=datasets or None,
            failure_policy=InfraAwareFailurePolicy(FailureConfig(), 1),
        )
        return [type(cb) for cb in trainer._create_default_callbacks()]

    without = callbacks()
    assert DatasetsCallback not in without and without, without
    assert DatasetsCallback in callbacks(train=lambda: None)
