"""Counting the operations that make the host wait for the device, on a CPU (issue 23).

On a GPU, `.item()`, `.tolist()`, `.cpu()`, `bool(t)` and every operation whose output shape depends on the
data (`nonzero`, `masked_select`, `unique`, boolean-mask indexing, `repeat_interleave` without
`output_size`) copy from the device and wait for every queued kernel: a training loop doing one per step
cannot queue the next step while the GPU works. On a CPU nothing waits, but the same calls still happen, so
a `TorchDispatchMode` sees them (`_local_scalar_dense` is what `.item()`/`bool()`/`float()` dispatch to) and
Python-level counters see `.tolist()`/`.numpy()`/`.cpu()`, which on a CPU tensor never reach the
dispatcher.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that always read the device (their result, or their output's shape, lives on the host).
_ALWAYS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::argwhere",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
}
_BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as c: ...` then `c.total` and `c.seen` (op name → count)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()
        self._patched: list[tuple[str, Any]] = []

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _ALWAYS:
            self.seen[name] += 1
        elif name in _BOOL_INDEXED and len(args) > 1 and any(_is_bool_tensor(i) for i in (args[1] or [])):
            self.seen[f"{name} (boolean mask)"] += 1
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.seen[name] += 1
        elif name in ("aten::_to_copy", "aten::copy_"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst = kwargs.get("device") if name == "aten::_to_copy" else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst or "cpu").type == "cpu":
                self.seen[f"{name} to cpu"] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)
            self._patched.append((method, torch.Tensor.__dict__.get(method)))  # None: inherited from TensorBase
            setattr(torch.Tensor, method, self._counting(method, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for method, own in self._patched:
            if own is None:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, own)
        self._patched.clear()

    def _counting(self, method: str, original: Any) -> Any:
        @functools.wraps(original)
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.seen[f"Tensor.{method}"] += 1
            return original(tensor, *args, **kwargs)

        return counted
