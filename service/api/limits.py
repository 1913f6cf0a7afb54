"""Bounds on requests that cost the service more than a database read (issue 21 item 9, docs/security.md):

- `SlowPool`: a bounded thread pool for slow work (rendering plots). Past its threads and its queue a request
  is refused with 503 and Retry-After instead of piling up; it is not the pool that `/healthz` or the
  ordinary routes use, so a flood of plot requests cannot make the service look dead.
- `PlotCache`: rendered PNGs by job, plot and the data drawn (epoch count and a digest), so asking for the
  same epoch again does not render again.
- `StreamSlots`: open event streams per owner and in all; past either a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.api.errors import ApiError

T = TypeVar("T")
RETRY_AFTER_S = 5


class SlowPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers, self.capacity = workers, workers + queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainctl-slow")
        self._lock = threading.Lock()
        self.in_use = 0

    async def run(self, fn: Callable[[], T], what: str) -> T:
        with self._lock:
            if self.in_use >= self.capacity:
                raise ApiError(
                    503,
                    "busy",
                    f"the service is busy with {self.in_use} slow requests ({what}); try again shortly "
                    "(TRAINCTL_SLOW_WORKERS, TRAINCTL_SLOW_QUEUE)",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.in_use += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            with self._lock:
                self.in_use -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PlotCache:
    """PNG bytes by (job id, plot name, digest of what was drawn), least recently used out first."""

    def __init__(self, entries: int = 256) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.renders = 0  # how many times a plot was actually rendered (tests, metrics)

    @staticmethod
    def key(job_id: str, name: str, data: Any) -> tuple[str, str, str]:
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
        return job_id, name, digest

    def get_or_render(self, key: tuple[str, str, str], render: Callable[[], bytes]) -> bytes:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
                return png
        png = render()
        with self._lock:
            self.renders += 1
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return png

    def forget(self, job_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == job_id]:
                del self._items[key]


class StreamSlot:
    def __init__(self, slots: StreamSlots, owner: str) -> None:
        self._slots, self.owner, self._released = slots, owner, False

    def release(self) -> None:
        """Give the slot back; idempotent (the stream's end and the response's end both call it)."""
        with self._slots.lock:
            if self._released:
                return
            self._released = True
            self._slots.by_owner[self.owner] -= 1
            if not self._slots.by_owner[self.owner]:
                del self._slots.by_owner[self.owner]
            self._slots.total -= 1


class StreamSlots:
    """Counts of open event streams. Per process: each replica holds its own streams' connections."""

    def __init__(self, per_owner: int, total: int) -> None:
        self.per_owner, self.max_total = per_owner, total
        self.lock = threading.Lock()
        self.by_owner: dict[str, int] = {}
        self.total = 0

    def acquire(self, owner: str) -> StreamSlot:
        with self.lock:
            mine = self.by_owner.get(owner, 0)
            if mine >= self.per_owner or self.total >= self.max_total:
                limit, setting = (
                    (self.per_owner, "TRAINCTL_MAX_EVENT_STREAMS_PER_OWNER")
                    if mine >= self.per_owner
                    else (self.max_total, "TRAINCTL_MAX_EVENT_STREAMS")
                )
                raise ApiError(
                    429,
                    "too_many_streams",
                    f"{'you have' if mine >= self.per_owner else 'the service has'} {limit} event streams open, "
                    f"the most it allows ({setting}); close one (or poll GET /v1/jobs/{{id}})",
                    {"limit": setting.removeprefix("TRAINCTL_").lower(), "open": mine, "total": self.total},
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.by_owner[owner] = mine + 1
            self.total += 1
            return StreamSlot(self, owner)
