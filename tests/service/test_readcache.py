"""The status path's read cache (service/engine/readcache.py) and the PostgreSQL change feed that keeps it
current (service/engine/changefeed.py, migration 0006's triggers): the rules on a fake clock, then two
replicas on a real PostgreSQL database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from service.api import deps
from service.common.lru import Lru
from service.engine.changefeed import ChangeFeed, psycopg_dsn
from service.engine.readcache import ReadCache
from service.engine.states import JobState
from service.engine.store import Store
from tests.service.conftest import DEBUG_JOB
from trainer.spec import JobSpec

# --- the rules -----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_served_until_the_feed_confirms_and_not_after_it_goes_quiet() -> None:
    clock = Clock()
    cache = ReadCache(max_quiet_s=3.0, clock=clock)
    assert cache.stamp() is None  # no feed has listened yet
    cache.confirmed(clock.now)
    stamp = cache.stamp()
    assert stamp is not None
    cache.put(stamp, cache.jobs, "j1", "job one")
    assert cache.jobs.get("j1") == "job one"
    clock.now += 2.9
    assert cache.stamp() is not None
    clock.now += 0.2  # 3.1 s since the feed's last check: it may have missed something
    assert cache.stamp() is None
    cache.put(stamp, cache.jobs, "j2", "job two")
    assert cache.jobs.get("j2") is None  # and nothing read meanwhile is kept


def test_a_read_that_raced_with_any_change_is_not_kept() -> None:
    clock = Clock()
    cache = ReadCache(clock=clock)
    cache.confirmed(clock.now)
    stamp = cache.stamp()
    assert stamp is not None
    cache.changed("j:other")  # arrives while the reader is at the database
    cache.put(stamp, cache.jobs, "j1", "read before the change")
    assert cache.jobs.get("j1") is None
    fresh = cache.stamp()
    assert fresh is not None and fresh != stamp
    cache.put(fresh, cache.jobs, "j1", "read after it")
    assert cache.jobs.get("j1") == "read after it"


def test_each_change_forgets_what_it_names() -> None:
    clock = Clock()
    cache = ReadCache(clock=clock)
    cache.confirmed(clock.now)

    def fill() -> None:
        stamp = cache.stamp()
        assert stamp is not None
        entries: list[tuple[Lru, str, object]] = [
            (cache.jobs, "j1", "job"),
            (cache.jobs, "j2", "job"),
            (cache.tokens, "h1", ("alice",)),
            (cache.pages, "page", ([], 0)),
        ]
        for lru, key, value in entries:
            cache.put(stamp, lru, key, value)

    fill()
    cache.changed("j:j1")
    assert cache.jobs.get("j1") is None and cache.jobs.get("j2") == "job"
    assert cache.pages.get("page") is None  # a page may hold j1, or count it
    assert cache.tokens.get("h1") == ("alice",)
    cache.changed("t:h1")
    assert cache.tokens.get("h1") is None and cache.jobs.get("j2") == "job"
    fill()
    cache.changed("*")  # a TRUNCATE, or a payload this version does not know
    assert len(cache.jobs) == len(cache.tokens) == len(cache.pages) == 0
    fill()
    cache.reset()  # the feed lost its connection
    assert len(cache.jobs) == 0 and cache.stamp() is None


def test_the_listener_takes_libpq_s_form_of_the_url() -> None:
    url = "postgresql+psycopg://u:p%40ss@127.0.0.1:5433/db?sslmode=disable"
    assert psycopg_dsn(url) == "postgresql://u:p%40ss@127.0.0.1:5433/db?sslmode=disable"


# --- two replicas on a real PostgreSQL -----------------------------------------------------------------------


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.02)


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[tuple[Store, Store]]:
    """Two API processes' stores on one database, each with its read cache and change feed listening."""
    a, b = Store(postgres_url), Store(postgres_url)
    a.create_schema()
    for s in (a, b):
        s.cache_reads()
    try:
        for s in (a, b):
            until(lambda s=s: s.read_cache is not None and s.read_cache.stamp() is not None)
        yield a, b
    finally:
        a.close()
        b.close()


def served_from_memory(store: Store, read: Callable[[], bool]) -> None:
    """`read()` holds, and soon holds without a database read (a cache hit)."""

    def hit() -> bool:
        hits = cached(store).hits
        assert read()
        return cached(store).hits == hits + 1

    until(hit)


def cached(store: Store) -> ReadCache:
    assert store.read_cache is not None
    return store.read_cache


def test_polls_are_served_from_memory_until_another_replica_changes_the_job(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    owner_id = b.add_token("bob", "b" * 64)
    job, _ = b.create_job("bob", JobSpec(), owner_id=owner_id)
    who, seen = a.identity_and_job("b" * 64, job.id)
    assert who is not None and who.owner_id == owner_id and seen is not None and seen.state is JobState.QUEUED
    # b's inserts are announced to a some milliseconds after they committed: a read that overlapped an
    # announcement is not kept, so the first reads may all go to the database
    served_from_memory(a, lambda: a.identity_and_job("b" * 64, job.id) == (who, seen))

    b.transition(job.id, JobState.STARTING)  # the other replica (its reconciler)
    until(lambda: cached(a).jobs.get(job.id) is None)  # the database's announcement reached replica a
    _, seen = a.identity_and_job("b" * 64, job.id)
    assert seen is not None and seen.state is JobState.STARTING


def test_a_token_revoked_on_another_replica_is_refused(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    owner_id = b.add_token("bob", "b" * 64)
    job, _ = b.create_job("bob", JobSpec(), owner_id=owner_id)
    served_from_memory(a, lambda: a.token_identity("b" * 64) is not None)
    b.delete_token("bob")
    until(lambda: cached(a).tokens.get("b" * 64) is None)
    assert a.identity_and_job("b" * 64, job.id) == (None, None)
    assert a.token_identity("b" * 64) is None


def test_an_operator_s_sql_is_announced_too(replicas: tuple[Store, Store], postgres_url: str) -> None:
    a, _ = replicas
    job, _ = a.create_job("alice", JobSpec())
    a.add_token("alice", "a" * 64)
    page = a.list(limit=10)
    assert [j.id for j in page[0]] == [job.id]
    served_from_memory(a, lambda: a.list(limit=10) == page)
    with psycopg.connect(psycopg_dsn(postgres_url), autocommit=True) as conn:
        conn.execute("UPDATE jobs SET message = 'set by hand' WHERE id = %s", (job.id,))
    until(lambda: cached(a).pages.get((None, None, None, 10, 0)) is None)
    assert a.list(limit=10)[0][0].message == "set by hand"
    assert a.get(job.id).message == "set by hand"


def test_this_replica_reads_its_own_writes_at_once(replicas: tuple[Store, Store]) -> None:
    a, _ = replicas
    owner_id = a.add_token("bob", "b" * 64)
    job, _ = a.create_job("bob", JobSpec(), owner_id=owner_id)
    served_from_memory(a, lambda: a.identity_and_job("b" * 64, job.id)[1].state is JobState.QUEUED)
    a.list(limit=5)
    a.transition(job.id, JobState.CANCELLED)
    assert a.identity_and_job("b" * 64, job.id)[1].state is JobState.CANCELLED  # no wait for the database
    assert a.list(limit=5)[0][0].state is JobState.CANCELLED
    a.end_sessions("b" * 64, now=123.0)
    assert a.token_identity("b" * 64).sessions_not_before == 123.0


def test_a_lost_feed_turns_the_cache_off_and_a_new_one_misses_nothing(
    replicas: tuple[Store, Store], postgres_url: str
) -> None:
    a, b = replicas
    owner_id = b.add_token("bob", "b" * 64)
    job, _ = b.create_job("bob", JobSpec(), owner_id=owner_id)
    served_from_memory(a, lambda: a.identity_and_job("b" * 64, job.id)[1] is not None)
    feed = a._feed
    pid = feed.backend_pid
    assert pid is not None
    with psycopg.connect(psycopg_dsn(postgres_url), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))  # as a database restart or a dropped link would
    until(lambda: cached(a).stamp() is None)
    assert cached(a).jobs.get(job.id) is None  # everything forgotten
    b.transition(job.id, JobState.STARTING)  # perhaps while no one listened
    assert a.identity_and_job("b" * 64, job.id)[1].state is JobState.STARTING  # the database, read directly
    until(lambda: cached(a).stamp() is not None and feed.backend_pid not in (None, pid))  # a new connection
    served_from_memory(a, lambda: a.identity_and_job("b" * 64, job.id)[1].state is JobState.STARTING)


def test_sqlite_has_no_read_cache(tmp_path) -> None:
    store = Store(tmp_path / "trainctl.db")
    store.create_schema()
    store.cache_reads()
    assert store.read_cache is None
    store.close()


# --- through the API ------------------------------------------------------------------------------------------


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """The read cache exists on PostgreSQL only: these API tests run there alone."""
    return postgres_url


def test_a_poll_the_cache_answers_stays_on_the_event_loop(
    make_api: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = make_api()
    state = api.client.app.state.trainctl
    assert state.polls_try_cache and not state.polls_inline
    handed_off: list[str] = []
    real = deps._poll_kept

    def counted(store: Store, poll: Callable[[], Any]) -> Any:
        handed_off.append("poll thread")
        return real(store, poll)

    monkeypatch.setattr(deps, "_poll_kept", counted)
    job_id = api.post(DEBUG_JOB).json()["id"]

    def polled_on_the_loop() -> bool:
        before = len(handed_off)
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"
        assert api.get("/v1/jobs").json()["total"] == 1
        return len(handed_off) == before

    until(polled_on_the_loop)
    other = Store(postgres_url)  # another replica cancels it
    try:
        other.transition(job_id, JobState.CANCELLED)
    finally:
        other.close()
    until(lambda: api.get(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED")
    assert api.get("/v1/jobs").json()["jobs"][0]["state"] == "CANCELLED"
    assert api.get("/v1/jobs/no-such-job").status_code == 404  # a miss goes to a poll thread and the database
    assert api.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_the_read_cache_can_be_turned_off(make_api: Any) -> None:
    api = make_api(read_cache=False)
    state = api.client.app.state.trainctl
    assert state.store.read_cache is None and not state.polls_try_cache
    job_id = api.post(DEBUG_JOB).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"


def test_a_feed_that_does_not_hear_its_own_ping_never_turns_the_cache_on(postgres_url: str) -> None:
    """As behind a proxy that drops LISTEN: the connection answers, but no notification comes back."""
    store = Store(postgres_url)
    store.create_schema()
    cache = ReadCache(max_quiet_s=0.5)
    feed = ChangeFeed(psycopg_dsn(postgres_url), cache, check_every_s=0.2, retry_s=0.1, ping_channel="elsewhere")
    feed.start()
    try:
        until(lambda: feed.last_error is not None and "did not hear its own notification" in feed.last_error)
        assert cache.stamp() is None
    finally:
        feed.stop()
        store.close()


def test_no_cache_without_the_triggers_that_announce_changes(postgres_url: str) -> None:
    store = Store(postgres_url)
    store.create_schema()
    with psycopg.connect(psycopg_dsn(postgres_url), autocommit=True) as conn:
        conn.execute("DROP TRIGGER tokens_changed ON tokens")  # a database someone changed by hand
    store.cache_reads()
    assert store.read_cache is None
    store.close()


def test_the_engine_reads_the_database_and_polled_reads_may_not(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    job, _ = b.create_job("alice", JobSpec())
    served_from_memory(a, lambda: a.get(job.id, cached=True) == job)  # the dashboard's and event streams' reads
    hits = cached(a).hits
    assert a.get(job.id) == job and cached(a).hits == hits  # the runner's: never from memory
    b.transition(job.id, JobState.CANCELLED)
    until(lambda: cached(a).jobs.get(job.id) is None)
    assert a.get(job.id, cached=True).state is JobState.CANCELLED
