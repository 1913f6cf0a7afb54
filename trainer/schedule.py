"""Learning-rate and weight-decay schedules as pure functions of the optimizer step / epoch.

Because the factor depends only on the step count, a resumed run continues the schedule exactly where the
checkpoint left it (LambdaLR's state is just that count).
"""

from __future__ import annotations

import math

import torch

from trainer.spec import OptimSpec, ScheduleSpec

ONECYCLE_START = 1 / 25  # torch's OneCycleLR default div_factor


def lr_factor(spec: ScheduleSpec, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    total = max(1, steps_per_epoch * epochs)
    # A restart at epoch r (1-based) starts the schedule over at step (r - 1) * steps_per_epoch, as a fresh
    # scheduler built there would: the run's remaining steps are its whole length.
    starts = [(r - 1) * steps_per_epoch for r in spec.restart_epochs if (r - 1) * steps_per_epoch <= step]
    if starts:
        offset = max(starts)
        step, total = step - offset, max(1, total - offset)
    if spec.step_per == "epoch":
        # scheduler.step() once per epoch: the lr holds through an epoch at the value of its first step.
        step = (step // steps_per_epoch) * steps_per_epoch
    t = min(step, total) / total  # progress through the run, 0..1
    if spec.kind == "constant":
        return 1.0
    if spec.kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if spec.kind == "cosine_warm_restarts":
        # torch's CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult) stepped with fractional epochs.
        epoch = step / steps_per_epoch
        cycle_len = float(spec.t0)
        while epoch >= cycle_len:
            epoch -= cycle_len
            cycle_len *= spec.t_mult
        return 0.5 * (1 + math.cos(math.pi * epoch / cycle_len))
    if spec.kind == "onecycle":
        w = spec.warmup_fraction
        if t < w:
            return ONECYCLE_START + (1 - ONECYCLE_START) * t / w
        return 0.5 * (1 + math.cos(math.pi * (t - w) / (1 - w)))
    raise ValueError(f"unknown schedule.kind {spec.kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step, steps_per_epoch, epochs))


def weight_decay_at(spec: OptimSpec, epoch: int) -> float:
    """Weight decay in force during `epoch` (1-based): the latest milestone at or before it, else the base."""
    passed = [e for e in spec.weight_decay_milestones if e <= epoch]
    return spec.weight_decay_milestones[max(passed)] if passed else spec.weight_decay


def apply_epoch_settings(optimizer: torch.optim.Optimizer, spec: OptimSpec, epoch: int) -> None:
    """Set the epoch's weight decay; at a milestone with fresh_momentum_at_milestones, drop the momentum
    buffers as a freshly built SGD would have none. A pure function of the epoch, so resume is exact."""
    wd = weight_decay_at(spec, epoch)
    for group in optimizer.param_groups:
        # a group built without decay (optim.decay_norm_and_bias False: trainer/step.param_groups) keeps none
        group["weight_decay"] = wd if group.get("decayed", True) else 0.0
    if spec.fresh_momentum_at_milestones and epoch in spec.weight_decay_milestones:
        optimizer.state.clear()
