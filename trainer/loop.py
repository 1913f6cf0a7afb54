"""The Ray Train worker loop: one DDP rank training the paper's network on its shard.

Every rank runs this function. Rank 0 alone writes files: the checkpoint (through ray.train.report),
`metrics.jsonl` (Ray Train V2 keeps only metrics attached to checkpoints, so we keep our own, one line per
epoch) and the manifest. On start the loop resumes from `ray.train.get_checkpoint()` at the next epoch,
with the schedule in the same position.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

import objstore
from trainer import checkpoint as ckpt
from trainer.data import DeviceData, load_splits, use_channels_last
from trainer.model import build_model
from trainer.precision import autocast, resolve_precision
from trainer.schedule import build_scheduler
from trainer.spec import JobSpec


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes: the job dir for single runs, a trial dir for searches."""
    metrics: str     # metrics.jsonl URI
    manifest_dir: str  # holds manifest.json
    run_dir: str     # Ray Train's {storage_path}/{name}: checkpoints land in run_dir/epoch_NNNN/

    def to_dict(self) -> dict[str, str]:
        return {"metrics": self.metrics, "manifest_dir": self.manifest_dir, "run_dir": self.run_dir}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate_json(config["spec_json"])  # only JSON crosses into Ray
    paths = RunPaths(**config["paths"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    train_set, val_set = load_splits(spec.data, spec.seed, spec.model.num_classes)
    channels_last = use_channels_last(spec)
    train_data = DeviceData(train_set, device, channels_last)
    val_data = DeviceData(val_set, device, channels_last)
    local_batch = spec.optim.batch_size // world
    steps_per_epoch = train_data.steps_per_epoch(local_batch, world)

    torch.manual_seed(spec.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(spec.model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1
    raw_model = model.module if hasattr(model, "module") else model
    forward = torch.compile(model) if spec.compile else model
    o = spec.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scheduler = build_scheduler(optimizer, spec.schedule, steps_per_epoch, o.epochs)
    amp_dtype = resolve_precision(spec, device)

    start_epoch, history = 1, []
    state = _resume_state(paths, ray.train.get_checkpoint())
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
    if rank == 0:
        # Epochs after the checkpoint we resume from will run again: drop their stale lines.
        history = [m for m in _read_metrics(paths.metrics) if m["epoch"] < start_epoch]

    for epoch in range(start_epoch, o.epochs + 1):
        torch.manual_seed(spec.seed * 1009 + epoch * 31 + rank)  # dropout noise: reproducible on resume
        t0 = time.perf_counter()
        model.train()
        train_sums = torch.zeros(3, device=device)  # loss*n, correct, n
        for x, y in train_data.train_batches(epoch, spec.seed, rank, world, local_batch):
            with autocast(device, amp_dtype):
                logits = forward(x)
                loss = F.cross_entropy(logits, y, label_smoothing=o.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            train_sums += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float(),
                                       torch.tensor(float(len(y)), device=device)])
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time the work, not its launch
        train_seconds = time.perf_counter() - t0
        if world > 1:
            # DDP broadcasts BatchNorm running stats from rank 0 only at the start of each forward, so each
            # rank ends the epoch with its own. Evaluate every shard with rank 0's — the ones it saves.
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, src=0)
        val_sums = evaluate(raw_model, val_data, rank, world, device, amp_dtype)
        if world > 1:
            dist.all_reduce(train_sums)
            dist.all_reduce(val_sums)
        tl, tc, tn = train_sums.tolist()
        vl, vc, vn = val_sums.tolist()
        metrics = {
            "epoch": epoch,
            "train_loss": tl / tn, "train_acc": tc / tn,
            # No validation split (val_fraction=0): null loss (JSON has no NaN), and 0 accuracy.
            "val_loss": vl / vn if vn else None, "val_acc": vc / vn if vn else 0.0,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": tn / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
            "time": time.time(),
            "resumed": epoch == start_epoch and start_epoch > 1,
            "node_ids": _node_ids(world),
        }
        if rank == 0:
            history.append(metrics)
            objstore.write_text(paths.metrics, "".join(json.dumps(m) + "\n" for m in history))
        if epoch % spec.checkpoint.every_epochs == 0 or epoch == o.epochs:
            _report_with_checkpoint(spec, paths, rank, epoch, metrics, raw_model, optimizer, scheduler)
        else:
            ray.train.report(metrics)


def evaluate(model: torch.nn.Module, data: DeviceData, rank: int, world: int, device: torch.device,
             amp_dtype: torch.dtype | None) -> torch.Tensor:
    """[loss*n, correct, n] over this rank's slice of `data` (plain cross-entropy, no smoothing)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device)
    with torch.no_grad():
        for x, y in data.eval_batches(rank, world, 1024):
            with autocast(device, amp_dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            sums += torch.stack([loss, (logits.argmax(1) == y).sum().float(),
                                 torch.tensor(float(len(y)), device=device)])
    model.train(was_training)
    return sums


def _report_with_checkpoint(spec: JobSpec, paths: RunPaths, rank: int, epoch: int, metrics: dict[str, Any],
                            model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    dir_name = f"epoch_{epoch:04d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=dir_name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "spec": spec.model_dump_json(),
            "rng": torch.get_rng_state(),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        sha256, size = ckpt.save(state, tmp)
        # SYNC upload: when report returns, the checkpoint is fully in storage.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=dir_name)
    ckpt.record(paths.manifest_dir, {
        "epoch": epoch, "val_acc": metrics["val_acc"],
        "uri": objstore.join(paths.run_dir, dir_name, ckpt.FILENAME), "sha256": sha256, "size": size,
    }, spec.checkpoint.keep_best)


def _resume_state(paths: RunPaths, ray_checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    """The newest trustworthy checkpoint: Ray Train's (from its run snapshot), or the manifest's latest
    when that is newer — a driver killed between the upload and Ray registering it would otherwise lose
    an epoch. The manifest's file is used only if its sha256 matches."""
    state = None
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as d:
            state = ckpt.load(d)
    entries = ckpt.read_manifest(paths.manifest_dir)["checkpoints"]
    latest = max(entries, key=lambda e: e["epoch"]) if entries else None
    if latest is not None and (state is None or latest["epoch"] > int(state["epoch"])):
        try:
            state = ckpt.load(latest["uri"], latest["sha256"])
        except (ckpt.CheckpointCorrupt, FileNotFoundError, OSError) as exc:
            print(f"not resuming from {latest['uri']}: {exc}", flush=True)
    return state


def _read_metrics(uri: str) -> list[dict[str, Any]]:
    if not objstore.exists(uri):
        return []
    return [json.loads(line) for line in objstore.read_text(uri).splitlines() if line.strip()]


def _node_ids(world: int) -> list[str]:
    """Every rank's Ray node id (gathered to all), so logs and metrics show where the workers ran."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, node)
    return gathered
