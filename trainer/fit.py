"""Driver-side fitting: one Ray Train run (`TorchTrainer`) of a spec, writing the job-directory layout.

Used by `trainer/run.py` for single runs and by `trainer/tune.py` for each search trial, which is why it is
a module of its own (neither imports the other for it). Ray is imported inside the functions, so importing
this module stays cheap; its types are named for the type checker only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import objstore
from trainer import checkpoint as ckpt
from trainer import contract
from trainer.spec import JobSpec

if TYPE_CHECKING:
    from ray.train import RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer


def use_gpu(spec: JobSpec) -> bool:
    if spec.scaling.use_gpu is not None:
        return spec.scaling.use_gpu
    import ray

    return bool(ray.cluster_resources().get("GPU", 0) >= spec.scaling.num_workers)


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
    from ray.train.torch import TorchTrainer

    from trainer.loop import RunPaths, train_loop_per_worker

    paths = RunPaths(
        metrics=objstore.join(run_root, contract.METRICS), manifest_dir=run_root, run_dir=objstore.join(run_root, name)
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec_json": spec.model_dump_json(), "paths": paths.to_dict()},
        scaling_config=scaling_config(spec),
        run_config=run_config(spec, run_root, name, callbacks),
    )


def scaling_config(spec: JobSpec) -> ScalingConfig:
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=spec.scaling.num_workers,
        use_gpu=use_gpu(spec),
        resources_per_worker={"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker},
    )


def run_config(spec: JobSpec, storage_uri: str, name: str, callbacks: list[UserCallback] | None = None) -> RunConfig:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_path, filesystem = objstore.ray_storage(storage_uri)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=callbacks,
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.checkpoint.keep_best, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
        ),
        # controller_failure_limit: a worker group that cannot start (too few resources) is retried for
        # about 10 minutes (60 s each: room for an autoscaler to add a GPU node), then the run fails
        # instead of waiting forever (Ray's default).
        failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures, controller_failure_limit=10),
    )
