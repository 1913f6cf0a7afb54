"""The device-dependent settings of a run, each decided by a pure function of the device kind and the spec.

The CUDA-only paths cannot run on the CPU machines the tests run on, but what they *decide* can be tested there
(tests/trainer/test_device_settings.py); trainer/step.py, trainer/data.py and trainer/fit.py only apply
the answers:
- `compile_plan`: whether and how `torch.compile` runs (spec `compile`: off | default |
  max-autotune-no-cudagraphs | reduce-overhead). `reduce-overhead` is inductor + CUDA graphs; CUDA graphs
  exist only on CUDA (inductor skips them for CPU graphs, so on a CPU it is `default`): off CUDA the run
  compiles with `default` and records that.
- `backend_flags`: cuDNN autotuning and TF32 matmuls on CUDA (fixed batch shapes, so timing the convolution
  algorithms once pays; fp32 runs may use TF32 tensor cores, bf16 autocast runs are unaffected).
- `process_group_backend`: NCCL between GPU workers, gloo between CPU workers.
- `pin_host_memory`: host tensors bound for a CUDA device go through pinned memory, so their copy is
  asynchronous and does not stall the queue of kernels.
- `ddp_options`: DistributedDataParallel's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer.spec import CompileMode


@dataclass(frozen=True)
class CompilePlan:
    mode: CompileMode  # what runs: "off" or a torch.compile mode
    note: str = ""  # why it differs from the spec, if it does

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """torch.compile's keyword arguments, or None when the model is not compiled."""
        return None if self.mode == "off" else {"mode": self.mode}


def compile_plan(mode: CompileMode, device_type: str) -> CompilePlan:
    """The compile mode that runs on `device_type` for the spec's `compile`."""
    if mode == "reduce-overhead" and device_type != "cuda":
        return CompilePlan("default", f"reduce-overhead asked: no CUDA graphs on {device_type}, compiled as default")
    return CompilePlan(mode)


@dataclass(frozen=True)
class BackendFlags:
    cudnn_benchmark: bool
    matmul_precision: Literal["highest", "high"]  # "high" lets fp32 matmuls use TF32


def backend_flags(device_type: str) -> BackendFlags:
    if device_type == "cuda":
        return BackendFlags(cudnn_benchmark=True, matmul_precision="high")
    return BackendFlags(cudnn_benchmark=False, matmul_precision="highest")


def apply_backend_flags(flags: BackendFlags) -> None:
    """Process-wide: only called for CUDA runs, so a CPU process (tests, offline evaluation) keeps torch's
    defaults. TF32 convolutions are torch's default already (cudnn.allow_tf32)."""
    torch.backends.cudnn.benchmark = flags.cudnn_benchmark
    torch.set_float32_matmul_precision(flags.matmul_precision)


def process_group_backend(use_gpu: bool) -> Literal["nccl", "gloo"]:
    return "nccl" if use_gpu else "gloo"


def pin_host_memory(device_type: str) -> bool:
    return device_type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`: through pinned memory and without blocking the host when the
    device is a GPU (`pin_host_memory`), a plain move otherwise."""
    if tensor.device == device:
        return tensor
    if pin_host_memory(device.type) and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def ddp_options() -> dict[str, Any]:
    """DistributedDataParallel's keyword arguments (Ray: prepare_model's parallel_strategy_kwargs).
    - gradient_as_bucket_view: gradients are views into the all-reduce buckets, so no copy between them each
      step and one gradient-sized buffer less;
    - bucket_cap_mb stays DDP's 25: the paper model's 4.6 M parameters (18 MB fp32) fill one bucket, so
      communication overlaps the tail of the backward pass;
    - static_graph stays off: it gains little for a model whose parameters all get gradients every step
      (find_unused_parameters is off already), and it has not been measured on a GPU here."""
    return {"gradient_as_bucket_view": True}
