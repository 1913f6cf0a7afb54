"""Driver-side fitting: one Ray Train run (`TorchTrainer`) of a spec, writing the job-directory layout.

Used by `trainer/run.py` for single runs and by `trainer/tune.py` for each search trial, which is why it is
a module of its own (neither imports the other for it). Ray is imported inside the functions, so importing
this module stays cheap; its types are named for the type checker only.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import objstore
from trainer import checkpoint as ckpt
from trainer import contract
from trainer.placement import Placement, placement_strategy, resolve_placement, worker_resources
from trainer.spec import JobSpec

if TYPE_CHECKING:
    from ray.train import RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer

log = logging.getLogger("trainer.fit")


def cluster_nodes() -> list[dict[str, float]]:
    """The live nodes' total resources (CPU, GPU, ...): the map trainer.placement resolves against."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def placement(spec: JobSpec) -> Placement:
    """The run's workers on the cluster as it is now (raises PlacementError naming the field to change)."""
    import ray

    result = resolve_placement(
        spec.scaling, spec.optim.batch_size, cluster_nodes(), ray.available_resources().get("CPU", 0.0)
    )
    log.info("placement: %s", result.reason)
    return result


def fit_single(spec: JobSpec, job_dir: str) -> None:
    """One TorchTrainer run whose checkpoints land in job_dir/<job dir name>/epoch_NNNN/."""
    fit_run(spec, job_dir, name=job_dir.rstrip("/").rsplit("/", 1)[-1])


def fit_run(spec: JobSpec, run_root: str, name: str, callbacks: list[UserCallback] | None = None) -> None:
    """Fit one run, removing checkpoint folders orphaned by an earlier crash before it starts and after it
    ends — never while it runs, when Ray Train's controller deletes old checkpoints of its own and
    deleting one under it fails the run."""
    run_dir = objstore.join(run_root, name)
    ckpt.remove_orphans(run_dir, ckpt.read_manifest(run_root))
    build_trainer(spec, run_root, name, callbacks).fit()
    ckpt.remove_orphans(run_dir, ckpt.read_manifest(run_root))


def build_trainer(spec: JobSpec, run_root: str, name: str, callbacks: list[UserCallback] | None = None) -> TorchTrainer:
    """A TorchTrainer writing metrics.jsonl and manifest.json into `run_root` and its checkpoints into
    `run_root/name/` — the layout of a single job and of each search trial alike."""
    from ray.train.torch import TorchConfig

    from trainer.device_settings import process_group_backend
    from trainer.infra import InfraAwareFailurePolicy, InfraAwareTorchTrainer, LossRecorder, unresponsive_worker_env
    from trainer.loop import RunPaths, train_loop_per_worker

    paths = RunPaths(
        metrics=objstore.join(run_root, contract.METRICS), manifest_dir=run_root, run_dir=objstore.join(run_root, name)
    )
    where = placement(spec)
    unresponsive_worker_env()
    config = run_config(spec, run_root, name, callbacks)
    # A lost node or host is charged to checkpoint.max_infra_failures, not max_failures (trainer/infra.py).
    policy = InfraAwareFailurePolicy(
        config.failure_config, spec.checkpoint.max_infra_failures, record=LossRecorder(run_root)
    )
    return InfraAwareTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec_json": spec.model_dump_json(), "paths": paths.to_dict(), "placement": where.to_dict()},
        scaling_config=scaling_config(spec, where),
        # backend: Ray's own rule, made explicit. timeout_s: a rank whose peer is cut off by a network
        # partition waits in its all-reduce; this bounds that wait (torch's default is 30 minutes), so the
        # collective raises and Ray Train restarts the group even if node-death detection is slow.
        torch_config=TorchConfig(backend=process_group_backend(where.use_gpu), timeout_s=collective_timeout_s()),
        run_config=config,
        failure_policy=policy,
    )


# Seconds a DDP collective (all-reduce, broadcast) may wait for every rank before it raises. Long enough for
# rank 0's own work between collectives (timing numerics candidates, a checkpoint save), short enough that a
# partitioned peer stalls the others for minutes, not half an hour. cluster/onprem.yaml sets it per cluster.
COLLECTIVE_TIMEOUT_ENV = "TRAINCTL_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300


def collective_timeout_s() -> int:
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 10:
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: must be a whole number of seconds, at least 10")
    return value


def scaling_config(spec: JobSpec, where: Placement) -> ScalingConfig:
    from ray.train import ScalingConfig

    if where.min_workers is not None:
        # Elastic (Ray Train V2): a (min, max) tuple; the controller considers growing the group every
        # resize interval and restarts it, at the new size, from the latest checkpoint.
        return ScalingConfig(
            num_workers=(where.min_workers, where.num_workers),
            elastic_resize_monitor_interval_s=spec.scaling.resize_interval_s,
            use_gpu=where.use_gpu,
            resources_per_worker=worker_resources(spec.scaling, where),
            placement_strategy=placement_strategy(spec.scaling),
        )
    return ScalingConfig(
        num_workers=where.num_workers,
        use_gpu=where.use_gpu,
        resources_per_worker=worker_resources(spec.scaling, where),
        placement_strategy=placement_strategy(spec.scaling),
    )


def run_config(spec: JobSpec, storage_uri: str, name: str, callbacks: list[UserCallback] | None = None) -> RunConfig:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_path, filesystem = objstore.ray_storage(storage_uri)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=callbacks,
        # Without a validation split every val_acc is 0: rank checkpoints by epoch, so the best is the final
        # epoch (summary.json's best_checkpoint_rule), never a tie broken by chance.
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.checkpoint.keep_best,
            checkpoint_score_attribute="val_acc" if spec.data.val_fraction > 0 else "epoch",
            checkpoint_score_order="max",
        ),
        # controller_failure_limit: a worker group that cannot start (too few resources) is retried for
        # about 10 minutes (60 s each: room for an autoscaler to add a GPU node), then the run fails
        # instead of waiting forever (Ray's default).
        failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures, controller_failure_limit=10),
    )
