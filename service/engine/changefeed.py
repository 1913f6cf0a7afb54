"""One thread per API process that LISTENs on PostgreSQL's `trainctl_changes` channel (migration 0006's
triggers announce every job and token change there) and passes each payload to a `ReadCache`.

Its own connection, outside SQLAlchemy's pool, in autocommit (a LISTEN inside an open transaction hears
nothing). Every `check_every_s` it sends a ping of its own on the channel and waits to hear it back.
PostgreSQL delivers notifications in the order their transactions committed, so hearing the ping means every
change committed before the ping was sent has been heard and applied: only then may the cache serve, for
`max_quiet_s` from the ping. A feed that does not hear its own ping (a proxy in transaction-pooling mode drops
LISTEN; a stuck connection) reconnects, and the cache answers nothing meanwhile. Any error (the database
restarted, the network dropped, the backend was terminated) resets the cache, which then reads the database
until a new connection has listened again: a change made while no one listened is never missed this way,
only not cached.
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
# What announces changes on it (migration 0006): without all three a cache would miss changes, so none is made.
TRIGGERS = ("jobs_changed", "job_tags_changed", "tokens_changed")
PING = "ping:"  # payloads of the feeds' own pings (every replica hears every replica's); never a change
STOP_POLL_S = 0.1  # how long `stop` may wait for the thread to notice


class DeafFeed(Exception):
    """The feed's own ping did not come back: it would not hear changes either."""


def psycopg_dsn(sqlalchemy_url: str) -> str:
    """postgresql+psycopg://user:pw@host:port/db?opts -> what psycopg.connect takes (libpq's URI)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeFeed:
    """`ping_channel`: where the pings go — the channel itself; a test sends them elsewhere to make a deaf feed."""

    def __init__(
        self,
        dsn: str,
        cache: ReadCache,
        check_every_s: float = 1.0,
        retry_s: float = 1.0,
        ping_channel: str = CHANNEL,
    ) -> None:
        self.dsn, self.cache = dsn, cache
        self.check_every_s, self.retry_s, self.ping_channel = check_every_s, retry_s, ping_channel
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainctl-changefeed", daemon=True)
        self.backend_pid: int | None = None  # the listening backend's pid (tests terminate it)
        self.last_error: str | None = None  # why the cache is off, while it is

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=STOP_POLL_S + 5)
        self.cache.reset()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    self.backend_pid = conn.info.backend_pid
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listen(conn)
            except Exception as exc:  # psycopg's errors, DeafFeed, anything: the cache is off until we hear again
                if self.last_error is None:  # once per outage
                    log.warning(
                        "read cache off (polls read the database) until the change feed hears again: %s",
                        exc,
                        exc_info=not isinstance(exc, psycopg.Error | DeafFeed),
                    )
                self.last_error = str(exc)
            finally:
                self.backend_pid = None
                self.cache.reset()
            self._stopping.wait(self.retry_s)

    def _listen(self, conn: psycopg.Connection) -> None:
        pings = 0
        while not self._stopping.is_set():
            pings += 1
            ping = f"{PING}{conn.info.backend_pid}:{pings}"
            sent = time.monotonic()
            conn.execute("SELECT pg_notify(%s, %s)", (self.ping_channel, ping))
            heard = False
            while not self._stopping.is_set():
                now = time.monotonic()
                if heard and now >= sent + self.check_every_s:
                    break  # time for the next ping
                if not heard and now - sent > self.cache.max_quiet_s:
                    raise DeafFeed(
                        f"the change feed did not hear its own notification within {self.cache.max_quiet_s:g} s "
                        "(a proxy in transaction-pooling mode drops LISTEN: connect directly, or set "
                        "TRAINCTL_READ_CACHE=0)"
                    )
                wait = STOP_POLL_S if not heard else min(STOP_POLL_S, sent + self.check_every_s - now)
                for note in conn.notifies(timeout=wait):
                    if note.payload == ping:
                        heard = True
                        self.cache.confirmed(sent)  # every change committed before `sent` came before it
                        if self.last_error is not None:
                            log.warning("read cache on again: the change feed hears")
                            self.last_error = None
                    elif not note.payload.startswith(PING):
                        self.cache.changed(note.payload)
