"""One rank's training, epoch by epoch, as plain functions: no Ray, so it runs and is tested in-process.

`trainer/loop.py` is the Ray Train worker around these functions: it supplies the rank, the world size, the
device and `ray.train.torch.prepare_model`, and does the reporting and checkpoint uploads. Everything that
decides *what* a rank computes lives here: building the model/optimizer/scheduler, restoring them from a
checkpoint dict, one epoch of training, BatchNorm synchronisation, evaluation and the all-reduce of the
sums every rank contributes to an epoch's metrics. The collectives (torch.distributed) are only called when
`world > 1`, so a single rank runs without a process group.

Functions take the spec sections they use and a frozen `RankContext` (rank, world, local batch, where every
rank runs), built once by the loop. Nothing in a step reads the device: loss and accuracy sums stay there
and the host reads them once per epoch (tests/trainer/test_host_sync.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import objstore
from trainer import checkpoint as ckpt
from trainer import contract
from trainer.contract import EpochMetrics, NumericsRecord
from trainer.data import DeviceData
from trainer.device_settings import apply_backend_flags, backend_flags, compile_plan
from trainer.ema import WeightAverage
from trainer.lookahead import Lookahead
from trainer.model import build_model
from trainer.precision import Numerics, autocast, resolve_precision
from trainer.schedule import apply_epoch_settings, build_scheduler
from trainer.spec import DataSpec, JobSpec, OptimSpec
from trainer.whiten import whiten_stem

EVAL_BATCH = 1024


@dataclass(frozen=True)
class RankContext:
    """Where this rank stands in the run: fixed for the life of a worker group, so it is built once by
    trainer/loop.py and handed to every epoch. (An elastic resize starts a new group, and the loop again.)"""

    rank: int
    world: int
    local_batch: int  # this rank's share of optim.batch_size
    node_ids: tuple[str, ...] = ()  # every rank's Ray node id, rank 0 first
    devices: tuple[str, ...] = ()  # what every rank trains on, rank 0 first (trainer/hardware.py)
    step_pause_s: float = 0.0  # tests only: a sleep after each optimizer step (contract.STEP_PAUSE_ENV)

    @classmethod
    def single(cls, local_batch: int, node_id: str = "local", device: str | None = None) -> RankContext:
        """One rank alone (tests, benchmarks)."""
        return cls(0, 1, local_batch, (node_id,), (device,) if device else ())


@dataclass(frozen=True)
class Splits:
    """One rank's data on its device: the training split, the validation split and, when the run has
    one, the test split."""

    train: DeviceData
    val: DeviceData
    test: DeviceData | None = None


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
    numerics: Numerics | None = None  # precision + layout + compile mode in use, and how they were chosen
    average: WeightAverage | None = None  # optim.ema_decay > 0: the EMA of the weights (trainer/ema.py)
    lookahead: Lookahead | None = None  # optim.lookahead_steps > 0 (trainer/lookahead.py)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model that is evaluated and checkpointed as `model`: the weight average when there is one."""
        return self.average.model if self.average is not None else self.raw_model


def _to_device(device: torch.device) -> Callable[[torch.nn.Module], torch.nn.Module]:
    return lambda model: model.to(device)


def build(
    spec: JobSpec,
    device: torch.device,
    steps_per_epoch: int,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    numerics: Numerics | None = None,
    train_images: torch.Tensor | None = None,
) -> Trainee:
    """The model, optimizer and schedule of `spec` on `device`. `wrap` moves the model to the device and
    wraps it for data parallelism (Ray passes `ray.train.torch.prepare_model`); by default it only moves it.
    `numerics` (trainer/precision.py) sets the precision and layout; without it, the precision by rule
    (no measuring) in NCHW. The compile mode that runs is recorded in the trainee's numerics.
    `train_images` (uint8 N×3×32×32) are what `model.whiten_stem` initialises the stem from."""
    if device.type == "cuda":
        apply_backend_flags(backend_flags(device.type))
    torch.manual_seed(spec.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(spec.model)
    if spec.model.whiten_stem:
        if train_images is None:
            raise ValueError("model.whiten_stem: the stem is initialised from training images, and none were given")
        whiten_stem(model, train_images)
    if numerics is not None and numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = (wrap or _to_device(device))(model)
    raw_model = model.module if hasattr(model, "module") else model
    plan = compile_plan(spec.compile, device.type)
    if plan.note:
        print(f"compile: {plan.note}", flush=True)
    kwargs = plan.kwargs
    forward = model if kwargs is None else torch.compile(model, **kwargs)
    o = spec.optim
    optimizer = torch.optim.SGD(
        param_groups(model, o.weight_decay, o.decay_norm_and_bias),
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        foreach=True,  # one multi-tensor kernel per update, not a Python loop over parameters (bench/step_overhead.py)
    )
    scheduler = build_scheduler(optimizer, spec.schedule, steps_per_epoch, o.epochs)
    amp_dtype = numerics.amp_dtype if numerics is not None else resolve_precision(spec, device)
    if numerics is not None:
        numerics = replace(numerics, compile=plan.mode)
    average = WeightAverage(raw_model, o.ema_decay) if o.ema_decay > 0 else None
    lookahead = Lookahead(o.lookahead_steps, steps_per_epoch * o.epochs) if o.lookahead_steps else None
    return Trainee(model, raw_model, forward, optimizer, scheduler, device, amp_dtype, numerics, average, lookahead)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one decayed group, or (decay_norm_and_bias False) the conv/linear
    weights decayed and the 1-D tensors (BatchNorm scales and shifts, biases) not. The grouping depends on
    the model alone, so a checkpoint's optimizer state maps onto the same tensors on resume."""
    params = list(model.parameters())
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "decayed": False},
    ]


def restore(trainee: Trainee, state: dict[str, Any] | None) -> int:
    """Load a checkpoint dict into `trainee`; returns the epoch to start at (1 without a checkpoint)."""
    if state is None:
        return 1
    # with a weight average, "model" is the average and "train_model" the live weights (checkpoint_state)
    trainee.raw_model.load_state_dict(state.get("train_model", state["model"]))
    if trainee.average is not None:
        trainee.average.model.load_state_dict(state["model"])  # (an average started now starts from the weights)
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1


def checkpoint_state(trainee: Trainee, spec: JobSpec, epoch: int, metrics: EpochMetrics) -> dict[str, Any]:
    """The checkpoint: one plain dict (see trainer/checkpoint.py), loadable with weights_only=True."""
    return {
        # what was evaluated: evaluate, export and serving load "model" and need nothing else
        "model": trainee.eval_model.state_dict(),
        # the live weights to resume from, when "model" is their average
        **({"train_model": trainee.raw_model.state_dict()} if trainee.average is not None else {}),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "epoch": epoch,
        "spec": spec.model_dump_json(),
        "rng": torch.get_rng_state(),
        "metrics": metrics.scalars(),
        # offline evaluation uses the run's own precision and layout (trainer/evaluate.py)
        **(
            {"numerics": {"precision": trainee.numerics.precision, "channels_last": trainee.numerics.channels_last}}
            if trainee.numerics is not None
            else {}
        ),
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
    trainee: Trainee, data: DeviceData, optim: OptimSpec, ctx: RankContext, *, epoch: int, seed: int
) -> torch.Tensor:
    """One pass over this rank's shard of `data`; returns this rank's [loss*n, correct, n] — on the device,
    unread: nothing in the loop waits for the device (tests/trainer/test_host_sync.py), the host reads the
    sums once per epoch (`epoch_metrics`)."""
    model, device = trainee.model, trainee.device
    model.train()
    apply_epoch_settings(trainee.optimizer, optim, epoch)  # weight-decay milestones (pure in epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0  # a host integer: batch sizes are known without asking the device
    steps = data.steps_per_epoch(ctx.local_batch, ctx.world)
    if trainee.lookahead is not None:
        trainee.lookahead.begin_epoch(trainee.raw_model)
    for step_in_epoch, (x, y) in enumerate(data.train_batches(epoch, seed, ctx.rank, ctx.world, ctx.local_batch), 1):
        with autocast(device, trainee.amp_dtype):
            logits = trainee.forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=optim.label_smoothing)
        trainee.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainee.optimizer.step()
        if trainee.lookahead is not None:  # before the EMA, which then averages the pulled-back weights
            trainee.lookahead.after_step(int(trainee.scheduler.last_epoch) + 1, step_in_epoch, steps)
        if trainee.average is not None:
            trainee.average.update(trainee.raw_model, int(trainee.scheduler.last_epoch))
        trainee.scheduler.step()
        if ctx.step_pause_s:
            time.sleep(ctx.step_pause_s)
        n = y.shape[0]
        loss_sum.add_(loss.detach().float(), alpha=n)
        correct.add_((logits.argmax(1) == y).sum())
        seen += n
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time the work, not its launch
    return _sums(loss_sum, correct, seen)


def _sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> torch.Tensor:
    """[loss*n, correct, n] as one float tensor on the device (what all_reduce and epoch_metrics take)."""
    n = torch.full((), float(seen), device=loss_sum.device)  # torch.full: no host-to-device copy
    return torch.stack([loss_sum.float(), correct.float(), n])


def evaluate(trainee: Trainee, data: DeviceData, ctx: RankContext, label_smoothing: float = 0.0) -> torch.Tensor:
    """[loss*n, correct, n] of the trainee's (unwrapped) model over this rank's slice of `data`
    (cross-entropy; plain unless label_smoothing), on the device and unread, like `train_epoch`'s. With a
    weight average (optim.ema_decay), the average is what is evaluated."""
    model, device = trainee.eval_model, trainee.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    with torch.no_grad():
        for x, y in data.eval_batches(ctx.rank, ctx.world, EVAL_BATCH):
            with autocast(device, trainee.amp_dtype):
                logits = model(x)
            loss_sum.add_(F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=label_smoothing))
            correct.add_((logits.argmax(1) == y).sum())
            seen += y.shape[0]
    model.train(was_training)
    return _sums(loss_sum, correct, seen)


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


@dataclass(frozen=True)
class EpochSums:
    """The all-reduced [loss*n, correct, n] of an epoch's splits (test: only on epochs that test)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None = None


def epoch_metrics(
    trainee: Trainee,
    sums: EpochSums,
    ctx: RankContext,
    *,
    epoch: int,
    resumed: bool,
    train_seconds: float,
    epoch_seconds: float,
) -> EpochMetrics:
    """One metrics.jsonl line from the all-reduced sums: the one place the host reads them (once an epoch)."""
    read = torch.cat([sums.train, sums.val, *([sums.test] if sums.test is not None else [])]).tolist()
    tl, tc, tn, vl, vc, vn = read[:6]
    sl, sc, sn = read[6:] if sums.test is not None else (0.0, 0.0, 0.0)
    numerics = trainee.numerics
    return EpochMetrics(
        epoch=epoch,
        train_loss=tl / tn,
        train_acc=tc / tn,
        # No validation split (val_fraction=0): null loss (JSON has no NaN), and 0 accuracy.
        val_loss=vl / vn if vn else None,
        val_acc=vc / vn if vn else 0.0,
        lr=trainee.lr,
        images_per_s=tn / train_seconds,
        epoch_seconds=epoch_seconds,
        time=time.time(),
        resumed=resumed,
        node_ids=list(ctx.node_ids),
        devices=list(ctx.devices),
        numerics=NumericsRecord(**numerics.to_dict()) if numerics is not None else None,
        test_loss=sl / sn if sn else None,
        test_acc=sc / sn if sn else None,
        workers=ctx.world,
        global_batch=ctx.local_batch * ctx.world,
        global_step=int(trainee.scheduler.last_epoch),  # LambdaLR counts optimizer steps: the schedule's position
    )


def tests_this_epoch(data: DataSpec, optim: OptimSpec, epoch: int) -> bool:
    """The test split is evaluated every data.test_every_epochs and at the last epoch (the figure the
    paper reports), never when test_every_epochs is 0."""
    n = data.test_every_epochs
    return n > 0 and (epoch % n == 0 or epoch == optim.epochs)


def run_epoch(
    trainee: Trainee, spec: JobSpec, splits: Splits, ctx: RankContext, *, epoch: int, start_epoch: int
) -> EpochMetrics:
    """Train one epoch, synchronise BatchNorm, evaluate (validation; the test split when this epoch tests
    it), all-reduce: the epoch's metrics (equal on every rank). Every rank must call it (it runs
    collectives when world > 1)."""
    seed_epoch(spec.seed, epoch, ctx.rank)
    t0 = time.perf_counter()
    train_sums = train_epoch(trainee, splits.train, spec.optim, ctx, epoch=epoch, seed=spec.seed)
    train_seconds = time.perf_counter() - t0
    sync_buffers(trainee.raw_model, ctx.world)
    if trainee.average is not None:
        sync_buffers(trainee.average.model, ctx.world)  # each rank averaged its own BatchNorm statistics
    sums = EpochSums(train_sums, evaluate(trainee, splits.val, ctx))
    if splits.test is not None and tests_this_epoch(spec.data, spec.optim, epoch):
        sums = replace(sums, test=evaluate(trainee, splits.test, ctx, label_smoothing=spec.optim.label_smoothing))
    all_reduce([s for s in (sums.train, sums.val, sums.test) if s is not None], ctx.world)
    return epoch_metrics(
        trainee,
        sums,
        ctx,
        epoch=epoch,
        resumed=epoch == start_epoch and start_epoch > 1,
        train_seconds=train_seconds,
        epoch_seconds=time.perf_counter() - t0,
    )


def read_history(metrics_uri: str, before_epoch: int, attempts: contract.Attempts | None = None) -> list[EpochMetrics]:
    """The metrics of epochs before `before_epoch`: epochs after the checkpoint a run resumes from will
    run again, so their stale lines are dropped, as are lines of attempts that did not own their epoch
    (trainer/fence.py)."""
    if not objstore.exists(metrics_uri):
        return []
    rows = contract.parse_metrics(objstore.read_text(metrics_uri), attempts)
    return [m for m in rows if m.epoch < before_epoch]


def write_history(metrics_uri: str, history: list[EpochMetrics]) -> None:
    objstore.write_text(metrics_uri, contract.metrics_jsonl(history))
