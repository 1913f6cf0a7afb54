"""A small bounded, thread-safe LRU mapping for the service's caches (views, store snapshots)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Lru(Generic[T]):
    """A thread-safe mapping that keeps its most recently used entries: at most `size` of them and, when
    `max_weight` is given, at most that total weight (each entry's weight is given to `put`)."""

    def __init__(self, size: int, max_weight: int | None = None) -> None:
        self.size, self.max_weight = size, max_weight
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: T, weight: int = 1) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            if self.max_weight is not None and weight > self.max_weight:
                return  # would evict everything else: not kept
            self._items[key] = (value, weight)
            self._weight += weight
            while len(self._items) > self.size or (self.max_weight is not None and self._weight > self.max_weight):
                _key, (_value, dropped) = self._items.popitem(last=False)
                self._weight -= dropped

    def pop(self, key: Hashable) -> T | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._weight -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight = 0

    @property
    def weight(self) -> int:
        return self._weight

    def __len__(self) -> int:
        return len(self._items)
