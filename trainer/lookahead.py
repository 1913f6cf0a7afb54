"""Lookahead (Zhang et al., 2019) as airbench runs it, for `optim.lookahead_steps`.

Slow weights φ trail the live ("fast") weights θ: every k optimizer steps, φ ← d·φ + (1 − d)·θ, then θ ← φ,
so the live weights are pulled back towards where they were k steps ago. The decay d ramps as airbench94's,
0.95^k × progress³ (progress = steps done / steps of the run): the first part of a run is plain SGD (d ≈ 0,
φ = θ) and the pull grows while the lr anneals, which is when the steps' noise is what is left to average.

The last step of every epoch also syncs, so at each checkpoint φ = θ: a resume needs no state of its own
(`begin_epoch` starts φ from the live weights). Every floating-point tensor moves, BatchNorm's running
statistics included, as in airbench; integer counters are left alone. Knows nothing of Ray or DDP: every rank
does the same arithmetic on the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

DECAY_PER_STEP = 0.95  # airbench94's per-step decay at the end of the run


class Lookahead:
    def __init__(self, every: int, total_steps: int):
        if every < 1:
            raise ValueError(f"lookahead every {every} steps: must be at least 1")
        self.every = every
        self.total_steps = max(1, total_steps)
        self._live: list[torch.Tensor] = []
        self._slow: list[torch.Tensor] = []

    def decay_at(self, step: int) -> float:
        """d after `step` optimizer steps of the run (1-based: the step just taken)."""
        progress = min(step, self.total_steps) / self.total_steps
        return float(DECAY_PER_STEP**self.every * progress**3)

    def begin_epoch(self, live: nn.Module) -> None:
        """Start the slow weights from the live ones (`live`: the unwrapped model, the same one every step)."""
        if not self._live:
            self._live = [t for t in live.state_dict().values() if t.is_floating_point()]
            self._slow = [t.detach().clone() for t in self._live]
        else:
            torch._foreach_copy_(self._slow, self._live)

    @torch.no_grad()
    def after_step(self, step: int, step_in_epoch: int, steps_in_epoch: int) -> None:
        """After optimizer step `step` of the run (1-based), the `step_in_epoch`-th of `steps_in_epoch`:
        every `every` steps and at the epoch's last, pull the live weights to the slow ones."""
        if step_in_epoch % self.every and step_in_epoch != steps_in_epoch:
            return
        torch._foreach_lerp_(self._slow, self._live, 1.0 - self.decay_at(step))  # φ ← d·φ + (1 − d)·θ
        torch._foreach_copy_(self._live, self._slow)  # θ ← φ
