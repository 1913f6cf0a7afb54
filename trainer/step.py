"""One rank's training, epoch by epoch, as plain functions: no Ray, so it runs and is tested in-process.

`trainer/loop.py` is the Ray Train worker around these functions: it supplies the rank, the world size, the
device and `ray.train.torch.prepare_model`, and does the reporting and checkpoint uploads. Everything that
decides *what* a rank computes lives here: building the model/optimizer/scheduler, restoring them from a
checkpoint dict, one epoch of training, BatchNorm synchronisation, evaluation and the all-reduce of the
sums every rank contributes to an epoch's metrics. The collectives (torch.distributed) are only called when
`world > 1`, so a single rank runs without a process group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import objstore
from trainer import checkpoint as ckpt
from trainer import contract
from trainer.contract import EpochMetrics
from trainer.data import DeviceData
from trainer.model import build_model
from trainer.precision import autocast, resolve_precision
from trainer.schedule import build_scheduler
from trainer.spec import JobSpec

EVAL_BATCH = 1024


@dataclass
class Trainee:
    """What one rank trains: the (possibly DDP-wrapped) model, the module underneath it (whose state is
    saved and evaluated), the callable used for the training forward pass (compiled or not), and the
    optimizer and schedule stepping it."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _to_device(device: torch.device) -> Callable[[torch.nn.Module], torch.nn.Module]:
    return lambda model: model.to(device)


def build(
    spec: JobSpec,
    device: torch.device,
    steps_per_epoch: int,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    channels_last: bool = False,
) -> Trainee:
    """The model, optimizer and schedule of `spec` on `device`. `wrap` moves the model to the device and
    wraps it for data parallelism (Ray passes `ray.train.torch.prepare_model`); by default it only moves it."""
    torch.manual_seed(spec.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(spec.model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = (wrap or _to_device(device))(model)
    raw_model = model.module if hasattr(model, "module") else model
    forward = torch.compile(model) if spec.compile else model
    o = spec.optim
    optimizer = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )
    scheduler = build_scheduler(optimizer, spec.schedule, steps_per_epoch, o.epochs)
    return Trainee(model, raw_model, forward, optimizer, scheduler, device, resolve_precision(spec, device))


def restore(trainee: Trainee, state: dict[str, Any] | None) -> int:
    """Load a checkpoint dict into `trainee`; returns the epoch to start at (1 without a checkpoint)."""
    if state is None:
        return 1
    trainee.raw_model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1


def checkpoint_state(trainee: Trainee, spec: JobSpec, epoch: int, metrics: EpochMetrics) -> dict[str, Any]:
    """The checkpoint: one plain dict (see trainer/checkpoint.py), loadable with weights_only=True."""
    return {
        "model": trainee.raw_model.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "epoch": epoch,
        "spec": spec.model_dump_json(),
        "rng": torch.get_rng_state(),
        "metrics": metrics.scalars(),
    }


def newest_state(ray_state: dict[str, Any] | None, manifest_dir: str) -> dict[str, Any] | None:
    """The newest trustworthy checkpoint: Ray Train's (from its run snapshot), or the manifest's latest
    when that is newer — a driver killed between the upload and Ray registering it would otherwise lose
    an epoch. The manifest's file is used only if its sha256 matches."""
    state = ray_state
    latest = ckpt.read_manifest(manifest_dir).latest()
    if latest is not None and (state is None or latest.epoch > int(state["epoch"])):
        try:
            state = ckpt.load(latest.uri, latest.sha256)
        except (ckpt.CheckpointCorrupt, FileNotFoundError, OSError) as exc:
            print(f"not resuming from {latest.uri}: {exc}", flush=True)
    return state


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Dropout noise that depends only on (seed, epoch, rank): reproducible when a run resumes."""
    torch.manual_seed(seed * 1009 + epoch * 31 + rank)


def train_epoch(
    trainee: Trainee,
    data: DeviceData,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    local_batch: int,
    label_smoothing: float,
) -> torch.Tensor:
    """One pass over this rank's shard of `data`; returns this rank's [loss*n, correct, n]."""
    model, device = trainee.model, trainee.device
    model.train()
    sums = torch.zeros(3, device=device)  # loss*n, correct, n
    for x, y in data.train_batches(epoch, seed, rank, world, local_batch):
        with autocast(device, trainee.amp_dtype):
            logits = trainee.forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        trainee.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainee.optimizer.step()
        trainee.scheduler.step()
        sums += torch.stack(
            [
                loss.detach().float() * len(y),
                (logits.argmax(1) == y).sum().float(),
                torch.tensor(float(len(y)), device=device),
            ]
        )
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time the work, not its launch
    return sums


def evaluate(
    model: torch.nn.Module, data: DeviceData, rank: int, world: int, device: torch.device, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """[loss*n, correct, n] over this rank's slice of `data` (plain cross-entropy, no smoothing)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device)
    with torch.no_grad():
        for x, y in data.eval_batches(rank, world, EVAL_BATCH):
            with autocast(device, amp_dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            sums += torch.stack(
                [loss, (logits.argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=device)]
            )
    model.train(was_training)
    return sums


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """DDP broadcasts BatchNorm running stats from rank 0 only at the start of each forward, so each rank
    ends an epoch with its own. Give every rank rank 0's — the ones it saves — before evaluating."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce(sums: list[torch.Tensor], world: int) -> None:
    """Sum every rank's sums in place (no-op on a single rank)."""
    if world > 1:
        for s in sums:
            dist.all_reduce(s)


def epoch_metrics(
    *,
    epoch: int,
    train_sums: torch.Tensor,
    val_sums: torch.Tensor,
    lr: float,
    train_seconds: float,
    epoch_seconds: float,
    resumed: bool,
    node_ids: list[str],
) -> EpochMetrics:
    """One metrics.jsonl line from the all-reduced sums."""
    tl, tc, tn = train_sums.tolist()
    vl, vc, vn = val_sums.tolist()
    return EpochMetrics(
        epoch=epoch,
        train_loss=tl / tn,
        train_acc=tc / tn,
        # No validation split (val_fraction=0): null loss (JSON has no NaN), and 0 accuracy.
        val_loss=vl / vn if vn else None,
        val_acc=vc / vn if vn else 0.0,
        lr=lr,
        images_per_s=tn / train_seconds,
        epoch_seconds=epoch_seconds,
        time=time.time(),
        resumed=resumed,
        node_ids=node_ids,
    )


def run_epoch(
    trainee: Trainee,
    spec: JobSpec,
    train_data: DeviceData,
    val_data: DeviceData,
    *,
    epoch: int,
    start_epoch: int,
    rank: int,
    world: int,
    local_batch: int,
    node_ids: list[str],
) -> EpochMetrics:
    """Train one epoch, synchronise BatchNorm, evaluate, all-reduce: the epoch's metrics (equal on every
    rank). Every rank must call it (it runs collectives when world > 1)."""
    seed_epoch(spec.seed, epoch, rank)
    t0 = time.perf_counter()
    train_sums = train_epoch(
        trainee,
        train_data,
        epoch=epoch,
        seed=spec.seed,
        rank=rank,
        world=world,
        local_batch=local_batch,
        label_smoothing=spec.optim.label_smoothing,
    )
    train_seconds = time.perf_counter() - t0
    sync_buffers(trainee.raw_model, world)
    val_sums = evaluate(trainee.raw_model, val_data, rank, world, trainee.device, trainee.amp_dtype)
    all_reduce([train_sums, val_sums], world)
    return epoch_metrics(
        epoch=epoch,
        train_sums=train_sums,
        val_sums=val_sums,
        lr=trainee.lr,
        train_seconds=train_seconds,
        epoch_seconds=time.perf_counter() - t0,
        resumed=epoch == start_epoch and start_epoch > 1,
        node_ids=node_ids,
    )


def read_history(metrics_uri: str, before_epoch: int) -> list[EpochMetrics]:
    """The metrics of epochs before `before_epoch`: epochs after the checkpoint a run resumes from will
    run again, so their stale lines are dropped."""
    if not objstore.exists(metrics_uri):
        return []
    return [m for m in contract.parse_metrics(objstore.read_text(metrics_uri)) if m.epoch < before_epoch]


def write_history(metrics_uri: str, history: list[EpochMetrics]) -> None:
    objstore.write_text(metrics_uri, contract.metrics_jsonl(history))
