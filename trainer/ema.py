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
        self._pairs: tuple[list[torch.Tensor], ...] | None = None  # built at the first update

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step `step` (0-based): ramped up over the first steps."""
        return min(self.decay, (1 + step) / (10 + step))

    def _tensors(self, live: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(averaged, live) floating-point tensors and (averaged, live) counters, paired once: the optimizer
        and load_state_dict update tensors in place, so the same tensors serve every later step."""
        if self._pairs is None:
            pairs: tuple[list[torch.Tensor], ...] = ([], [], [], [])
            for mine, theirs in zip(self.model.state_dict().values(), live.state_dict().values(), strict=True):
                offset = 0 if mine.is_floating_point() else 2
                pairs[offset].append(mine)
                pairs[offset + 1].append(theirs)
            self._pairs = pairs
        return self._pairs

    @torch.no_grad()
    def update(self, live: nn.Module, step: int) -> None:
        """Move the average towards `live` (the unwrapped model, always the same one) after optimizer step
        `step`."""
        averaged, current, counters, counter_values = self._tensors(live)
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(step))  # one multi-tensor kernel
        torch._foreach_copy_(counters, counter_values)
