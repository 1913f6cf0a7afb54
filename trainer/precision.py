"""A run's numerics — autocast dtype and memory layout — and how `auto` chooses them.

`precision=auto` / `channels_last=auto`:
- on CUDA: bf16 autocast and channels_last (tensor cores want both);
- on a CPU with native bf16 (AMX, AVX512-BF16, Arm BF16): whichever candidate is fastest when timing a few
  forward+backward steps of the job's own model and local batch in each (bf16 or fp32) × (NCHW or NHWC)
  at start. A rule on CPU flags cannot do this: AVX512-BF16 without AMX is 1.7x faster in bf16 on AMD EPYC
  but slower than fp32 on some Intel Xeons (issue 15);
- on a CPU without native bf16: fp32 (emulated bf16 is many times slower: not worth timing), and the layout
  by measurement.
The choice and the timings go into metrics.jsonl and the log; the checkpoint records the choice, so offline
evaluation uses the same numerics and reproduces the run's val_acc.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainer.hardware import cpu_bf16_feature
from trainer.spec import JobSpec

PROBE_ROUNDS = 2  # timed steps per candidate, after one untimed warm-up step each


@dataclass(frozen=True)
class Numerics:
    precision: str  # "bf16" | "fp32"
    channels_last: bool
    chosen_by: str = "spec"  # "spec" (set explicitly), "rule" (auto, one candidate) or "measured"
    images_per_s: dict[str, float] = field(default_factory=dict)  # candidate label -> img/s, when measured
    compile: str = "off"  # the torch.compile mode that runs (trainer/device_settings.py), "off" when eager

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Numerics:
        fields = ("precision", "channels_last", "chosen_by", "images_per_s", "compile")
        return cls(**{k: data[k] for k in fields if k in data})

    def describe(self) -> str:
        text = f"{self.precision}{' + channels_last' if self.channels_last else ''} ({self.chosen_by}"
        if self.images_per_s:
            text += ": " + ", ".join(f"{k} {v:.1f}" for k, v in self.images_per_s.items()) + " img/s"
        return text + ")" + (f", compile {self.compile}" if self.compile != "off" else "")


def label(precision: str, channels_last: bool) -> str:
    return precision + ("+channels_last" if channels_last else "")


def candidates(spec: JobSpec, device: torch.device) -> tuple[list[str], list[bool]]:
    """The precisions and layouts `auto` may pick from on this device (one each where nothing to choose)."""
    precisions: list[str]
    if spec.precision != "auto":
        precisions = [spec.precision]
    elif device.type == "cuda":
        precisions = ["bf16"]
    else:
        precisions = ["bf16", "fp32"] if cpu_bf16_feature() else ["fp32"]
    if isinstance(spec.channels_last, bool):
        layouts = [spec.channels_last]
    elif device.type == "cuda":
        layouts = [True]
    else:
        layouts = [True, False]
    return precisions, layouts


def choose_numerics(
    spec: JobSpec, device: torch.device, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int
) -> Numerics:
    """Decide `auto` (module doc). `images` are raw uint8 N×3×32×32 training images (any N ≥ 1), `batch` the
    rank's local batch; `model` is left untouched (each candidate times its own copy)."""
    precisions, layouts = candidates(spec, device)
    if len(precisions) * len(layouts) == 1:
        auto = spec.precision == "auto" or spec.channels_last == "auto"
        return Numerics(precisions[0], layouts[0], "rule" if auto else "spec")
    rates = measure(model, device, images, labels, batch, [(p, c) for p in precisions for c in layouts])
    best = max(rates, key=lambda k: rates[k])
    precision, channels_last = best
    return Numerics(precision, channels_last, "measured", {label(p, c): round(r, 1) for (p, c), r in rates.items()})


def measure(
    model: torch.nn.Module,
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    which: list[tuple[str, bool]],
    rounds: int = PROBE_ROUNDS,
) -> dict[tuple[str, bool], float]:
    """Images/s of forward+backward (no optimizer step) for each (precision, channels_last): one warm-up
    step each, then `rounds` steps each, interleaved so that load from other processes hits every
    candidate alike; the fastest step counts (the least disturbed)."""
    reps = -(-batch // len(images))
    x = images.repeat(reps, 1, 1, 1)[:batch].to(device).float().div_(255.0)
    y = labels.repeat(reps)[:batch].to(device)
    models = {}
    for precision, channels_last in which:
        m = copy.deepcopy(model).to(device).train()  # BatchNorm statistics of the real model stay as they are
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        models[(precision, channels_last)] = m
    inputs = {c: x.contiguous(memory_format=torch.channels_last) if c else x.contiguous() for c in (True, False)}

    def step(key: tuple[str, bool]) -> float:
        m = models[key]
        dtype = torch.bfloat16 if key[0] == "bf16" else None
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = F.cross_entropy(m(inputs[key[1]]), y)
        loss.backward()
        m.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws: not the run's
        for key in which:
            step(key)
        best = {key: float("inf") for key in which}
        for _ in range(rounds):
            for key in which:
                best[key] = min(best[key], step(key))
    return {key: batch / seconds for key, seconds in best.items()}


def resolve_precision(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype by rule, without measuring: for checkpoints written before runs recorded their
    numerics (bf16 on CUDA and on CPUs with native bf16, as those runs chose)."""
    if spec.precision == "fp32":
        return None
    if spec.precision == "bf16" or device.type == "cuda" or cpu_bf16_feature():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
