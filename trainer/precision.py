"""Which autocast dtype a run uses: shared by the training loop and offline evaluation, so a checkpoint
evaluates to exactly the val_acc its run reported."""

from __future__ import annotations

import contextlib

import torch

from trainer.spec import JobSpec


def bf16_native_cpu() -> bool:
    """AMX or AVX512-BF16: where bf16 autocast makes CPU training faster rather than slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (precision=auto: bf16 on CUDA and native-bf16 CPUs)."""
    if spec.precision == "fp32":
        return None
    if spec.precision == "bf16" or device.type == "cuda" or bf16_native_cpu():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
