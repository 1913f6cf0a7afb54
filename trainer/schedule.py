"""Learning-rate schedules as a pure function of the optimizer step.

Because the factor depends only on the step count, a resumed run continues the schedule exactly where the
checkpoint left it (LambdaLR's state is just that count).
"""

from __future__ import annotations

import math

import torch

from trainer.spec import ScheduleSpec

ONECYCLE_START = 1 / 25  # torch's OneCycleLR default div_factor


def lr_factor(spec: ScheduleSpec, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    total = max(1, steps_per_epoch * epochs)
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


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(spec, step, steps_per_epoch, epochs))
