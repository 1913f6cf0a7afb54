"""The Ray Train worker loop: one DDP rank training the paper's network on its shard.

Every rank runs this function; what a rank computes each epoch is `trainer/step.py` (plain functions, no
Ray). This module is the Ray side: the rank's context and device, the checkpoint Ray hands back on a
restart, `ray.train.report` and the checkpoint upload. Rank 0 alone writes files: the checkpoint (through
ray.train.report), `metrics.jsonl` (Ray Train V2 keeps only metrics attached to checkpoints, so we keep our
own, one line per epoch) and the manifest. On start the loop resumes from `ray.train.get_checkpoint()` (or
the manifest's newer one) at the next epoch, with the schedule in the same position.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import ray.train
import ray.train.torch
import ray.util
import torch
import torch.distributed as dist

import objstore
from trainer import checkpoint as ckpt
from trainer import contract, fence, infra, step
from trainer.contract import CheckpointEntry, EpochMetrics
from trainer.data import Dataset, DeviceData, load, load_splits, test_source
from trainer.device_settings import ddp_options
from trainer.hardware import describe_device, usable_cpus
from trainer.model import build_model
from trainer.precision import Numerics, choose_numerics
from trainer.spec import JobSpec
from trainer.tensorboard import EventLog

log = logging.getLogger("trainer.loop")


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes: the job dir for single runs, a trial dir for searches."""

    metrics: str  # metrics.jsonl URI
    manifest_dir: str  # holds manifest.json
    run_dir: str  # Ray Train's {storage_path}/{name}: checkpoints land in run_dir/epoch_NNNN/

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate_json(config["spec_json"])  # only JSON crosses into Ray
    paths = RunPaths(**config["paths"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # The CPUs Ray reserved for this worker, but never more threads than cores it may run on (a local
        # cluster often advertises more logical CPUs than the machine has).
        cpus = (config.get("placement") or {}).get("cpus_per_worker", 1)
        torch.set_num_threads(max(1, min(int(cpus), usable_cpus())))

    train_set, val_set = load_splits(spec.data, spec.seed, spec.model.num_classes)
    local_batch = spec.optim.batch_size // world
    numerics = _decide_numerics(spec, device, train_set, local_batch, rank, world)
    source = test_source(spec.data) if spec.data.test_every_epochs else None
    splits = step.Splits(
        train=DeviceData(train_set, device, numerics.channels_last, spec.data.augment),
        val=DeviceData(val_set, device, numerics.channels_last),
        test=None
        if source is None
        else DeviceData(load(source[0], source[1], "test", spec.model.num_classes), device, numerics.channels_last),
    )
    # to the device, in DDP (device_settings.ddp_options) when world > 1
    wrap = functools.partial(ray.train.torch.prepare_model, parallel_strategy_kwargs=ddp_options())
    trainee = step.build(
        spec,
        device,
        splits.train.steps_per_epoch(local_batch, world),
        wrap=wrap,
        numerics=numerics,
        train_images=train_set.images,
    )
    devices = _with_addresses(_gather(describe_device(device), world), _gather(ray.util.get_node_ip_address(), world))
    if rank == 0:
        # Logged, not printed: Train V2 turns a worker's print into a log record AND echoes it to the worker's
        # stdout (which Ray has replaced), so a print reaches the driver log twice.
        log.info("devices: %s; numerics: %s", ", ".join(devices), numerics.describe())

    start_epoch = step.restore(trainee, step.newest_state(_ray_state(ray.train.get_checkpoint()), paths.manifest_dir))
    # This worker group's attempt (trainer/fence.py): rank 0, the only writer, records it before its first
    # write and checks it before every later one, so an older group cut off by a partition writes nothing.
    attempt = fence.claim(paths.manifest_dir, start_epoch) if rank == 0 else 0
    history = []
    if rank == 0:
        history = step.read_history(paths.metrics, start_epoch, attempts=fence.read(paths.manifest_dir))
    # a worker group never moves: where each rank runs holds until it ends (an elastic resize, docs/scaling.md,
    # restarts this function with the new world size from the latest checkpoint: the global batch, the steps
    # per epoch and so the schedule's position are the same at every world size that divides the batch)
    ctx = step.RankContext(
        rank, world, local_batch, tuple(_node_ids(world)), tuple(devices), contract.step_pause_s(os.environ)
    )
    if rank == 0 and ctx.step_pause_s:  # a slow job's log says why
        log.warning("paced: %s=%s s after every step (a test setting)", contract.STEP_PAUSE_ENV, ctx.step_pause_s)
    # Rank 0's TensorBoard event files in <run dir>/tensorboard/ (a resumed run purges the epochs it redoes).
    events = EventLog(paths.manifest_dir, purge_step=start_epoch if start_epoch > 1 else None) if rank == 0 else None

    # The lost nodes/hosts this run restarted after (trainer/infra.py), shown with its first epoch.
    recovered = (
        infra.resumed(infra.pending_losses(paths.manifest_dir, history), history, start_epoch, list(ctx.node_ids))
        if rank == 0
        else []
    )

    for epoch in range(start_epoch, spec.optim.epochs + 1):
        metrics = step.run_epoch(trainee, spec, splits, ctx, epoch=epoch, start_epoch=start_epoch)
        if rank == 0:
            metrics.attempt = attempt
            if epoch == start_epoch and recovered:
                metrics = metrics.model_copy(update={"infra_losses": recovered})
            history.append(metrics)
            fence.write_metrics(paths.manifest_dir, paths.metrics, attempt, history)
            assert events is not None
            events.epoch(metrics)
        if epoch % spec.checkpoint.every_epochs == 0 or epoch == spec.optim.epochs:
            _report_with_checkpoint(spec, paths, rank, epoch, metrics, trainee, attempt)
        else:
            ray.train.report(metrics.model_dump())
    if events is not None:
        events.close()


def _report_with_checkpoint(
    spec: JobSpec,
    paths: RunPaths,
    rank: int,
    epoch: int,
    metrics: EpochMetrics,
    trainee: step.Trainee,
    attempt: int,
) -> None:
    dir_name = f"epoch_{epoch:04d}"
    if rank != 0:
        ray.train.report(metrics.model_dump(), checkpoint_dir_name=dir_name)
        return
    # A replaced attempt's upload would overwrite the new attempt's folder of the same epoch.
    fence.check(paths.manifest_dir, attempt, f"checkpoint {dir_name}")
    with tempfile.TemporaryDirectory() as tmp:
        sha256, size = ckpt.save(step.checkpoint_state(trainee, spec, epoch, metrics), tmp)
        # SYNC upload: when report returns, the checkpoint is fully in storage.
        ray.train.report(
            metrics.model_dump(), checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name
        )
    entry = CheckpointEntry(
        epoch=epoch,
        val_acc=metrics.val_acc,
        sha256=sha256,
        size=size,
        uri=objstore.join(paths.run_dir, dir_name, ckpt.FILENAME),
    )
    fence.check(paths.manifest_dir, attempt, f"{contract.MANIFEST} (epoch {epoch})")
    ckpt.record(paths.manifest_dir, entry, spec.checkpoint.keep_best)


def _ray_state(ray_checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    """The checkpoint dict of the checkpoint Ray Train restarts this worker group from, if any."""
    if ray_checkpoint is None:
        return None
    with ray_checkpoint.as_directory() as d:
        return ckpt.load(d)


def _node_ids(world: int) -> list[str]:
    """Every rank's Ray node id (gathered to all), so logs and metrics show where the workers ran."""
    return _gather(ray.get_runtime_context().get_node_id(), world)


def _with_addresses(devices: list[str], addresses: list[str]) -> list[str]:
    """Each rank's device with its host's address (`cpu (...) AMD EPYC on 10.0.0.2`) when the ranks run on
    more than one host, so a job's view shows where DDP ran; on one host the device alone says it all."""
    if len(set(addresses)) <= 1:
        return devices
    return [f"{device} on {address}" for device, address in zip(devices, addresses, strict=True)]


def _gather(value: Any, world: int) -> list[Any]:
    """`value` of every rank, rank 0 first, on every rank."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _decide_numerics(
    spec: JobSpec, device: torch.device, train_set: Dataset, local_batch: int, rank: int, world: int
) -> Numerics:
    """precision/channels_last for this run: rank 0 decides (timing candidates when `auto` leaves a choice,
    trainer/precision.py) and every rank follows, so all ranks compute alike."""
    decided: list[Any] = [None]
    if rank == 0:
        torch.manual_seed(spec.seed)
        model = build_model(spec.model)
        sample = train_set.take(torch.arange(min(len(train_set), local_batch)))
        decided[0] = choose_numerics(spec, device, model, sample.images, sample.labels, local_batch).to_dict()
    if world > 1:
        dist.broadcast_object_list(decided, src=0)
    return Numerics.from_dict(decided[0])
