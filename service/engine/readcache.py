"""What status polls re-read, kept in memory while the database says nothing changed (PostgreSQL only).

A poll reads a token's row and a job's row (or a page of jobs) that almost never changed since the last poll,
and on PostgreSQL each read is a round trip to the database server and a pass through SQLAlchemy and psycopg
(bench/RESULTS.md, issue 22 item 6). The database announces every change to those rows (migration 0006's
triggers, NOTIFY on `trainctl_changes`), and `ChangeFeed` (service/engine/changefeed.py) hands each
announcement to `ReadCache.changed`, which forgets the row; the rest stays valid.

What a reader may rely on:
- **Nothing is served unless the feed is known to be working**: `stamp()` is None (read the database) until
  the feed has heard its own ping (and so every change committed before it), and again `max_quiet_s` after
  the last ping it heard (a broken, hung or deaf feed), so a change another replica made is missed for at most
  that long even when the feed fails silently; normally it is forgotten within the notification's delivery
  (milliseconds).
- **A read never re-caches what it raced with**: a reader takes `stamp()` *before* it reads the database
  and `put` keeps the result only if no change arrived since (any change, on any key: they are rare
  beside polls). A row read just before another transaction changed it is thus never stored after that
  change was forgotten.
- Absence is never cached (no such token, no such job): an unknown token always reaches the database.
- The writer's own process forgets what it wrote at once (`Store` calls `changed` after each commit), so a
  client that changed a job through this replica reads the change on its next poll.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from service.common.lru import Lru

if TYPE_CHECKING:
    from service.engine.store import Job  # not at run time: the store imports this module

T = TypeVar("T")

# A change feed hears its own ping every second (service/engine/changefeed.py); 3 s without one means it is
# broken, stuck or deaf, and the cache stops answering until a connection hears again.
MAX_QUIET_S = 3.0


class ReadCache:
    def __init__(self, max_quiet_s: float = MAX_QUIET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_quiet_s = max_quiet_s
        self._clock = clock
        self._lock = threading.Lock()  # orders `changed`/`reset` against `put`
        self._epoch = 0  # +1 on every change and reset: a put with an older stamp raced with one
        self._fresh_until = -math.inf  # clock time until which what is held is known current
        self.tokens: Lru[tuple[Any, ...]] = Lru(4096)  # token hash -> the token's identity columns
        self.jobs: Lru[Job] = Lru(4096)  # job id -> Job
        self.pages: Lru[tuple[list[Job], int]] = Lru(256)  # a status-path list query -> (jobs, total)
        self.hits = 0  # reads answered from memory, for tests; not locked (approximate under threads)

    # --- readers -------------------------------------------------------------------------------------------

    def stamp(self) -> int | None:
        """None: do not use the cache now (read the database, store nothing). Otherwise pass it to `put`."""
        if self._clock() >= self._fresh_until:
            return None
        return self._epoch

    def put(self, stamp: int, entries: Lru[T], key: Hashable, value: T) -> None:
        """Keep `value` read from the database after `stamp()` returned `stamp`, unless anything changed since."""
        with self._lock:
            if stamp == self._epoch and self._clock() < self._fresh_until:
                entries.put(key, value)

    # --- the change feed -----------------------------------------------------------------------------------

    def changed(self, payload: str) -> None:
        """Forget what a `trainctl_changes` payload names: `j:<job id>`, `t:<token hash>`; anything else
        (`*`, or a payload this version does not know) forgets everything."""
        kind, _, key = payload.partition(":")
        with self._lock:
            self._epoch += 1
            if kind == "j" and key:
                self.jobs.pop(key)
                self.pages.clear()  # a page may hold the job, and its total may have changed
            elif kind == "t" and key:
                self.tokens.pop(key)
            else:
                self._clear()

    def confirmed(self, as_of: float) -> None:
        """Every change committed before clock time `as_of` has been passed to `changed` (the feed heard its
        own ping sent then): what is held stays usable until `max_quiet_s` after it."""
        with self._lock:
            self._fresh_until = max(self._fresh_until, as_of + self.max_quiet_s)

    def reset(self) -> None:
        """The feed lost (or has not yet made) its connection: changes may have gone unheard. Forget
        everything and answer nothing until `confirmed` again."""
        with self._lock:
            self._epoch += 1
            self._fresh_until = -math.inf
            self._clear()

    def _clear(self) -> None:
        self.tokens.clear()
        self.jobs.clear()
        self.pages.clear()
