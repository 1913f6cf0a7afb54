"""Infrastructure losses: a worker node or host that died is not the job's fault.

Ray Train V2 decides whether a failed worker group is restarted in its `FailurePolicy` (the controller calls
`make_decision(error)` on every failure; ray/train/v2/_internal/execution/failure_handling/default.py). Its
default charges every `WorkerGroupError` to `FailureConfig.max_failures` (preemptions aside), so a lost host
used up the budget meant for the job's own errors (`checkpoint.max_failures`), and once that was spent the
driver failed and the service charged `checkpoint.max_restarts` too.

`InfraAwareFailurePolicy` keeps Ray's rules and adds one: a worker group that failed because a node died
(Ray's "The actor died because its node has died", a node preemption) is restarted from the last checkpoint
within `checkpoint.max_infra_failures`, a budget of its own; an exception of the job's own code is still
charged to `max_failures`.

When a host dies, the ranks on the other hosts may fail first, with a collective error naming the peer
that vanished ("[10.0.0.3]:21001: Connection reset by peer" in gloo), before Ray declares the node dead. The
policy then waits `PEER_SETTLE_S` (the controller polls again: `NOOP`) for the other ranks' reports: a rank
whose own code raised, or whose process died on a live node, is reported within that time and makes the
failure the job's; if every failed rank still only says that a peer vanished, the failure is an
infrastructure loss (the peer's address from the error text) and the group restarts at once. A rank that has
not answered Ray Train's health check for `UNRESPONSIVE_WORKER_S` (Ray's default: 600 s) is taken for lost
with its host, too. A worker process that keeps dying in a way only its peers see is thereby retried up to
`max_infra_failures` times, no more.

Each infrastructure loss is appended to the run's `infra_losses.jsonl` (trainer/contract.py `InfraLoss`:
which node or host, at which epoch, the newest checkpoint then); the restarted run's first epoch carries it
in metrics.jsonl with the epoch it resumed from and whether it runs on a replacement host (trainer/loop.py),
which the job's view shows.

Ray Train V2 has no public way to pass a failure policy: `InfraAwareTorchTrainer` swaps it in through
`_initialize_and_run_controller`, the one place `fit()` hands the policy to the controller (checked against
the installed wheel by tests/trainer/test_infra.py). It also leaves out Ray's `DatasetsCallback` when the
trainer has no Ray Datasets (trainctl's workers read their data themselves, trainer/data.py): that callback
starts a `DatasetManager` actor for every worker group regardless, one more Ray worker process per run
(~1.4 CPU-s of imports) that nothing would ask for a shard.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.train import FailureConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

import objstore
from trainer import contract
from trainer.contract import InfraLoss

log = logging.getLogger("trainer.infra")

# How long a worker group whose ranks failed only with "a peer vanished" errors waits for the other ranks'
# reports before it counts as an infrastructure loss: a dead worker process on a live node is reported in
# 1-2 s (its raylet sees it exit); a dead node takes Ray 15-60 s to declare (GCS health checks).
PEER_SETTLE_S = 10.0

# Ray's words for an actor whose node died (GCS: "The actor died because its node has died. Node Id: ...").
_NODE_DIED = re.compile(r"its node has died|node (?:was|has been) (?:terminated|removed)|raylet (?:has )?died", re.I)
# What the ranks on healthy hosts raise when a peer vanishes mid-collective (gloo, NCCL, torch.distributed).
_PEER_LOST = re.compile(
    r"Connection reset by peer|Connection closed by peer|Broken pipe|ECONNRESET|Connection refused|"
    r"DistBackendError|DistNetworkError|NCCL communicator was aborted|ncclRemoteError|"
    r"Gloo connectFullMesh failed|\[gloo/|gloo::IoException|Socket Timeout|timed out in collective",
    re.I,
)
# A worker that has not answered the controller's health check (a tiny actor call, answered between
# training steps) for this long is taken for lost. Ray's default is 600 s: a dead host's workers would hold
# the run that long when Ray's own node-death verdict does not reach the controller. Set by
# `unresponsive_worker_env` in the driver unless RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S is set (Ray passes
# it on to its controller).
UNRESPONSIVE_WORKER_S = 10.0
HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"

_NODE_IP = re.compile(r"node_ip='([^']+)'|\tip: (\S+)")
_PEER_ADDRESS = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]:\d+")  # gloo: "Read error [10.0.0.3]:21001: ..."
_NODE_ID = re.compile(r"node_id='([0-9a-f]+)'|Node Id: ([0-9a-f]+)")


class Cause(str, Enum):
    NODE_LOST = "node_lost"  # a node died under a rank: infrastructure
    PEER_LOST = "peer_lost"  # a rank saw a peer vanish: infrastructure unless another rank says otherwise
    OWN = "own"  # the job's own code (or anything else): charged to max_failures


@dataclass(frozen=True)
class Verdict:
    cause: Cause
    host: str | None = None
    node_id: str | None = None
    reason: str = ""


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return next((g for g in match.groups() if g), None) if match else None


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    died = [ln for ln in lines if _NODE_DIED.search(ln)]
    line = (died or lines or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def classify_failure(error: BaseException) -> Verdict:
    """What ended one rank: its node died, it lost a peer, or its own code raised."""
    cause: BaseException = error
    if isinstance(error, WorkerHealthCheckFailedError):
        cause = error.health_check_failure
    text = str(error)
    if isinstance(cause, RayActorError) and (cause.preempted or _NODE_DIED.search(str(cause))):
        return Verdict(Cause.NODE_LOST, _first(_NODE_IP, text), _first(_NODE_ID, text), _one_line(str(cause)))
    if isinstance(cause, WorkerHealthCheckTimeoutError):  # silent for UNRESPONSIVE_WORKER_S: its host is gone
        return Verdict(Cause.NODE_LOST, _first(_NODE_IP, text), _first(_NODE_ID, text), _one_line(text))
    if isinstance(cause, ActorUnavailableError) or _PEER_LOST.search(text):
        # An unreachable or silent actor, or a collective that lost its peer.
        return Verdict(Cause.PEER_LOST, host=_first(_PEER_ADDRESS, text), reason=_one_line(text))
    return Verdict(Cause.OWN, reason=_one_line(text))


def classify(worker_failures: Mapping[int, BaseException]) -> Verdict:
    """The worker group's failure as a whole. A node death wins over the collateral errors of the ranks it
    left behind (Ray's own rule for preemptions); an exception of the job's own code on any rank, with no
    node death, makes it the job's; only "a peer went away" errors leave it open (PEER_LOST)."""
    verdicts = [classify_failure(e) for _, e in sorted(worker_failures.items())]
    for cause in (Cause.NODE_LOST, Cause.OWN, Cause.PEER_LOST):
        found = [v for v in verdicts if v.cause is cause]
        if found:
            return found[0]
    return Verdict(Cause.OWN)


def unresponsive_worker_env() -> None:
    """Ray Train's worker health-check timeout, UNRESPONSIVE_WORKER_S unless the operator set one."""
    os.environ.setdefault(HEALTH_CHECK_TIMEOUT_ENV, f"{UNRESPONSIVE_WORKER_S:g}")


Recorder = Callable[[Verdict], None]


class InfraAwareFailurePolicy(DefaultFailurePolicy):
    """Ray's DefaultFailurePolicy, with a lost node charged to a budget of its own (see the module doc)."""

    def __init__(
        self,
        failure_config: FailureConfig,
        max_infra_failures: int,
        record: Recorder | None = None,
        peer_settle_s: float = PEER_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(failure_config)
        self.max_infra_failures = max_infra_failures
        self.infra_failures = 0
        self._record = record
        self._peer_settle_s = peer_settle_s
        self._clock = clock
        self._waiting_since: float | None = None

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if not isinstance(training_failed_error, WorkerGroupError) or any(
            isinstance(e, RayActorError) and e.preempted for e in _causes(training_failed_error)
        ):
            return super().make_decision(training_failed_error)  # controller errors, preemptions: Ray's rules
        verdict = classify(training_failed_error.worker_failures)
        if verdict.cause is Cause.PEER_LOST:
            now = self._clock()
            if self._waiting_since is None:
                self._waiting_since = now
                log.info(
                    "a rank lost a peer (%s): %.0f s for the other ranks' reports", verdict.reason, self._peer_settle_s
                )
            if now - self._waiting_since < self._peer_settle_s:
                return FailureDecision.NOOP  # the controller polls the group again
        self._waiting_since = None
        if verdict.cause is Cause.OWN:
            return super().make_decision(training_failed_error)
        self.infra_failures += 1
        within = self.infra_failures <= self.max_infra_failures
        log.warning(
            "[InfraAwareFailurePolicy] %s: worker node %s (%s) lost (%s): infrastructure loss %d of "
            "checkpoint.max_infra_failures=%d (not charged to max_failures): %s",
            "RETRY" if within else "RAISE", verdict.host, verdict.node_id, verdict.cause.value, self.infra_failures,
            self.max_infra_failures, verdict.reason,
        )  # fmt: skip
        if not within:
            return FailureDecision.RAISE
        if self._record is not None:
            try:
                self._record(verdict)
            except Exception as exc:  # noqa: BLE001 - a record lost costs the job's view a line, never the run
                log.warning("could not record the infrastructure loss: %s: %s", type(exc).__name__, exc)
        return FailureDecision.RETRY


def _causes(error: WorkerGroupError) -> list[BaseException]:
    return [
        e.health_check_failure if isinstance(e, WorkerHealthCheckFailedError) else e
        for e in error.worker_failures.values()
    ]


@dataclass(frozen=True)
class LossRecorder:
    """Appends each infrastructure loss to `run_root`/infra_losses.jsonl with the epoch it interrupted (the
    epoch after metrics.jsonl's last) and the newest checkpoint then (manifest.json). Runs in the Train
    controller (on the driver's node), so it holds only the URIs: only JSON crosses into Ray."""

    run_root: str  # holds metrics.jsonl, manifest.json and infra_losses.jsonl

    def __call__(self, verdict: Verdict) -> None:
        metrics_uri = objstore.join(self.run_root, contract.METRICS)
        metrics = contract.parse_metrics(objstore.read_text(metrics_uri)) if objstore.exists(metrics_uri) else []
        manifest_uri = objstore.join(self.run_root, contract.MANIFEST)
        manifest = contract.parse_manifest(objstore.read_text(manifest_uri)) if objstore.exists(manifest_uri) else None
        loss = InfraLoss(
            time=time.time(),
            host=verdict.host,
            node_id=verdict.node_id,
            lost_at_epoch=(metrics[-1].epoch if metrics else 0) + 1,
            checkpoint_epoch=(manifest.latest_epoch if manifest else None) or 0,
            error=verdict.reason,
        )
        uri = objstore.join(self.run_root, contract.INFRA_LOSSES)
        before = objstore.read_text(uri) if objstore.exists(uri) else ""
        objstore.write_text(uri, before + loss.model_dump_json() + "\n")
        log.warning("recorded: %s", loss.describe())


def pending_losses(run_root: str, history: list[contract.EpochMetrics]) -> list[InfraLoss]:
    """The losses a run starting now recovers from: those recorded after the last epoch it keeps
    (`history`, the epochs before the one it starts at) ended."""
    uri = objstore.join(run_root, contract.INFRA_LOSSES)
    if not objstore.exists(uri):
        return []
    since = history[-1].time if history else 0.0
    return [loss for loss in contract.parse_infra_losses(objstore.read_text(uri)) if loss.time > since]


def resumed(losses: list[InfraLoss], history: list[contract.EpochMetrics], start_epoch: int,
            node_ids: list[str]) -> list[InfraLoss]:  # fmt: skip
    """`losses` completed with where the run resumed: the checkpoint epoch, and whether it uses a node the
    last kept epoch did not (a replacement host)."""
    replacement = bool(set(node_ids) - set(history[-1].node_ids)) if history and history[-1].node_ids else None
    return [
        loss.model_copy(update={"resumed_from_epoch": start_epoch - 1, "replacement": replacement}) for loss in losses
    ]


class InfraAwareTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller uses `InfraAwareFailurePolicy` and starts no idle dataset actor."""

    def __init__(self, *args: Any, failure_policy: InfraAwareFailurePolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._infra_failure_policy = failure_policy

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        if "failure_policy" not in controller_init_kwargs:  # a Ray that no longer passes it here
            raise RuntimeError("Ray Train no longer passes failure_policy to its controller: see trainer/infra.py")
        controller_init_kwargs["failure_policy"] = self._infra_failure_policy
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
