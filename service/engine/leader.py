"""Which replica reconciles: a lock that at most one process per database holds, and that is released
by the operating system / database when its holder dies, so another replica takes over by itself.

PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on one dedicated connection; the server
drops it the moment that connection closes (process killed: the kernel closes the socket). SQLite (one
machine by nature): an exclusive `flock` on `<database>.leader`, dropped by the kernel with the process.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

# pg advisory lock key of the reconciler ("trn" + 2); service.engine.migrate uses another one.
RECONCILER_LOCK_KEY = 0x7472_6E02


class LeaderLock:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Any = None  # PostgreSQL: the connection holding the advisory lock
        self._fd: int | None = None  # SQLite: the flock'ed file
        self.held = False

    def acquire(self) -> bool:
        """Hold the lock (True) or learn that another process does (False). Cheap to call every pass: when
        held, it only checks that the holding connection is still alive."""
        try:
            self.held = self._acquire_pg() if self.engine.dialect.name == "postgresql" else self._acquire_file()
        except Exception as exc:  # noqa: BLE001 - a database hiccup means "not leader now", never a crash
            log.warning("leader lock: %s", exc)
            self.release()
        return self.held

    def _acquire_pg(self) -> bool:
        if self._conn is not None:
            self._conn.execute(text("SELECT 1"))  # raises when the connection (and so the lock) is gone
            return True
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RECONCILER_LOCK_KEY}).scalar())
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def _acquire_file(self) -> bool:
        if self._fd is not None:
            return True
        database = make_url(self.engine.url).database
        if not database or database == ":memory:":
            return True  # a private in-memory database: nobody else can reconcile it
        fd = os.open(f"{database}.leader", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RECONCILER_LOCK_KEY})
            except Exception:  # noqa: BLE001 - already broken: the server has dropped it
                pass
            try:
                # Really close the session (a pooled close would keep it, and the lock, alive in the pool);
                # the server releases a session's advisory locks when it ends.
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken: the server has dropped it
                pass
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        self.held = False
