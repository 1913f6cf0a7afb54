"""What a rank trains on, named for people: `cuda:0 NVIDIA H100 80GB HBM3`, `cpu (2 threads, bf16 AVX512-BF16)
AMD EPYC`. Recorded per rank in metrics.jsonl (`devices`) and shown by the API and `trainctl watch`."""

from __future__ import annotations

import os

import torch


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU's native bf16 instructions, or None where bf16 would only be emulated (slow)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            flags.update(value.split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "bf16" in flags:  # Arm (Neoverse V1/V2, Graviton 3+)
        return "Arm BF16"
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name") and value.strip():
            return value.strip()
    return "unknown CPU"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    bf16 = cpu_bf16_feature()
    return f"cpu ({torch.get_num_threads()} threads, {'bf16 ' + bf16 if bf16 else 'no native bf16'}) {cpu_model()}"
