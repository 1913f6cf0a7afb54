"""An exponential moving average (EMA) of a model's weights, for `optim.ema_decay`.

A copy of the network whose every floating-point tensor (parameters and BatchNorm's running statistics)
moves a fraction `1 - decay` towards the live model's after each optimizer step; integer buffers (BatchNorm's
batch counter) are copied. The average is what a run evaluates and checkpoints as its model: it smooths out
the last steps' noise, which a short run with a high learning rate has most of. The decay ramps up as
`(1 + step) / (10 + step)` until it reaches `decay`, so the first steps' random weights do not linger.
Knows nothing of Ray or DDP: the loop calls `update` after each step on every rank, and every rank holds the
same average because DDP keeps their parameters equal (the buffers are broadcast before evaluation, as the
live model's are).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)  # same device and memory format as the live model
        self.model.requires_grad_(False)
        self.model.eval()

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step `step` (0-based): ramped up over the first steps."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, live: nn.Module, step: int) -> None:
        """Move the average towards `live` (the unwrapped model) after optimizer step `step`."""
        weight = 1.0 - self.decay_at(step)
        averaged, current, counters, counter_values = [], [], [], []
        for mine, theirs in zip(self.model.state_dict().values(), live.state_dict().values(), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs)
            else:
                counters.append(mine)
                counter_values.append(theirs)
        torch._foreach_lerp_(averaged, current, weight)  # one multi-tensor kernel, not a loop over tensors
        for mine, theirs in zip(counters, counter_values, strict=True):
            mine.copy_(theirs)
