"""One thread per API process that LISTENs on PostgreSQL's `trainctl_changes` channel (migration 0006's
triggers announce every job and token change there) and passes each payload to a `ReadCache`.

Its own connection, outside SQLAlchemy's pool, in autocommit (a LISTEN inside an open transaction hears
nothing). Every `check_every_s` it runs `SELECT 1`: a connection that answers has delivered every
notification committed before the check was sent, and the cache may serve for `max_quiet_s` more. Any error
(the database restarted, the network dropped, the backend was terminated) resets the cache, which then reads
the database until a new connection has listened again: a change made while no one listened is never missed
this way, only not cached.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from sqlalchemy import make_url

from service.engine.readcache import ReadCache

log = logging.getLogger("trainctl")

CHANNEL = "trainctl_changes"
STOP_POLL_S = 0.1  # how long `stop` may wait for the thread to notice


def psycopg_dsn(sqlalchemy_url: str) -> str:
    """postgresql+psycopg://user:pw@host:port/db?opts -> what psycopg.connect takes (libpq's URI)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeFeed:
    def __init__(self, dsn: str, cache: ReadCache, check_every_s: float = 1.0, retry_s: float = 1.0) -> None:
        self.dsn, self.cache = dsn, cache
        self.check_every_s, self.retry_s = check_every_s, retry_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainctl-changefeed", daemon=True)
        self.backend_pid: int | None = None  # the listening backend's pid (tests terminate it)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=STOP_POLL_S + 5)
        self.cache.reset()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    self.backend_pid = conn.info.backend_pid
                    conn.execute(f"LISTEN {CHANNEL}")
                    if down_since is not None:
                        log.warning("read cache: listening again after %.1f s", time.monotonic() - down_since)
                        down_since = None
                    self._listen(conn)
            except Exception as exc:  # psycopg's errors, and anything else: the cache is off until we listen again
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "read cache off (polls read the database) until the change feed reconnects: %s",
                        exc,
                        exc_info=not isinstance(exc, psycopg.Error),
                    )
            finally:
                self.backend_pid = None
                self.cache.reset()
            self._stopping.wait(self.retry_s)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stopping.is_set():
            sent = time.monotonic()
            conn.execute("SELECT 1")
            # Notifications that arrived during the round trip wait in psycopg's backlog: apply them first.
            for note in conn.notifies(timeout=0):
                self.cache.changed(note.payload)
            self.cache.confirmed(sent)
            # Until the next check, in short waits: `stop` (an app's shutdown) must not wait a whole period.
            while not self._stopping.is_set() and (left := sent + self.check_every_s - time.monotonic()) > 0:
                for note in conn.notifies(timeout=min(left, STOP_POLL_S)):
                    self.cache.changed(note.payload)
