"""Job views (service/api/views.py): what a poll shows stays exact while the caches behind it skip unchanged
work, and conditional polls (ETag / If-None-Match) answer 304 until the job changes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from service.api import views
from service.engine.readcache import MAX_QUIET_S
from tests.service.conftest import DEBUG_JOB, Api, metrics_line


def _running_job(api: Api, epochs: int = 5) -> str:
    job_id = api.post({"preset": "debug", "overrides": {"optim.epochs": epochs}}).json()["id"]
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    return job_id


def test_a_job_poll_answers_304_until_the_job_changes(api: Api) -> None:
    job_id = _running_job(api)
    first = api.get(f"/v1/jobs/{job_id}")
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and first.json()["state"] == "RUNNING"
    assert first.headers["cache-control"] == "private, no-cache"
    again = api.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    # a list of tags, a weak tag and `*` match too; another tag does not
    for header in (f'"x", {etag}', f"W/{etag}", "*"):
        assert api.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": header}).status_code == 304, header
    assert api.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": '"other"'}).status_code == 200

    # a new epoch in metrics.jsonl changes the answer at once (a new size: no waiting for any cache)
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.3))
    fresh = api.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.json()["progress"]["epoch"] == 1 and fresh.headers["etag"] != etag
    # and so does a change of the row (a cancel)
    etag = fresh.headers["etag"]
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 200
    cancelled = api.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"


def test_the_job_list_answers_304_until_a_job_changes(api: Api) -> None:
    ids = [api.post(DEBUG_JOB).json()["id"] for _ in range(3)]
    first = api.get("/v1/jobs")
    body = first.json()
    assert [j["id"] for j in body["jobs"]] == ids[::-1] and body["total"] == 3 and body["limit"] == 50
    assert body["jobs"][0]["spec"] is None and body["offset"] == 0
    etag = first.headers["etag"]
    assert api.get("/v1/jobs", headers={"If-None-Match": etag}).status_code == 304
    # another page is another answer
    assert api.get("/v1/jobs", params={"limit": 1}, headers={"If-None-Match": etag}).status_code == 200
    api.reconcile()  # the oldest job starts
    changed = api.get("/v1/jobs", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["jobs"][-1]["state"] == "STARTING"


def test_the_rendered_view_is_what_the_response_model_says(api: Api) -> None:
    """The body is rendered once by views, not by FastAPI: it must still be exactly schemas.JobView."""
    from service.api.schemas import JobList, JobView

    job_id = _running_job(api)
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.3) + metrics_line(2, 0.4))
    one = api.get(f"/v1/jobs/{job_id}").json()
    assert JobView.model_validate(one).model_dump(mode="json") == one
    assert one["progress"] == {"epoch": 2, "epochs": 5, "eta_seconds": 9.0} and one["best_val_acc"] == 0.4
    assert one["spec"]["optim"]["epochs"] == 5
    listed = api.get("/v1/jobs").json()
    assert JobList.model_validate(listed).model_dump(mode="json") == listed


def test_a_file_is_parsed_again_only_when_its_size_or_mtime_changes(tmp_path: Path) -> None:
    now = [time.time()]
    cache = views.FileCache(size=2, clock=lambda: now[0])
    path = tmp_path / "metrics.jsonl"
    calls: list[str] = []

    def parse(uri: str) -> str:
        calls.append(uri)
        return Path(uri).read_text()

    def write(text: str, age_s: float) -> None:  # a file written `age_s` before `now`
        path.write_text(text)
        os.utime(path, (now[0] - age_s, now[0] - age_s))

    write("a", 10)
    assert cache.read(str(path), parse)[0] == "a" and cache.read(str(path), parse)[0] == "a"
    assert len(calls) == 1
    write("bb", 10)  # a new size
    assert cache.read(str(path), parse)[0] == "bb" and len(calls) == 2
    # Read just after it was written: even with the same size and mtime as the cached copy it is read again,
    # since a second write within the storage's mtime resolution would not change its key.
    now[0] += 60
    write("cc", views.RACY_LOCAL_S / 2)
    assert cache.read(str(path), parse)[0] == "cc" and len(calls) == 3
    write("dd", views.RACY_LOCAL_S / 2)  # the same size and mtime
    assert cache.read(str(path), parse)[0] == "dd" and len(calls) == 4
    # a missing file is never cached
    missing = tmp_path / "nothing"
    assert cache.read(str(missing), lambda uri: "none") == ("none", None)


def test_file_cache_entries_expire_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    now = [time.time()]
    cache = views.FileCache(size=2, clock=lambda: now[0])
    calls: list[str] = []
    paths = []
    for name in "abc":
        p = tmp_path / name
        p.write_text(name)
        os.utime(p, (time.time() - 10, time.time() - 10))
        paths.append(str(p))

    def parse(uri: str) -> str:
        calls.append(uri)
        return Path(uri).read_text()

    for p in paths:
        cache.read(p, parse)
    assert len(cache._entries) == 2  # the oldest went
    cache.read(paths[0], parse)
    assert calls.count(paths[0]) == 2
    now[0] += views.MAX_AGE_S + 1
    cache.read(paths[0], parse)
    assert calls.count(paths[0]) == 3
    # and by the files' total size: a file larger than the whole budget is not kept at all
    small = views.FileCache(size=10, max_bytes=2, clock=lambda: now[0])
    for p in paths:
        small.read(p, parse)
    assert len(small._entries) == 2 and small._entries.weight == 2
    big = tmp_path / "big"
    big.write_text("xyz")
    os.utime(big, (now[0] - 10, now[0] - 10))
    small.read(str(big), parse)
    small.read(str(big), parse)
    assert calls.count(str(big)) == 2 and len(small._entries) == 2


def test_a_revoked_token_is_refused_by_another_replica(make_api: Any) -> None:
    """A revoke on one replica is a 401 on another: at once on SQLite (nothing cached), and on PostgreSQL as
    soon as the database's announcement of the change arrives (the read cache, service/engine/readcache.py:
    milliseconds; this allows the cache's worst case, a silent change feed)."""
    one = make_api()
    other = make_api()  # the same database, as a second API replica
    token = one.client.post("/v1/tokens", headers=one.headers(), json={"name": "carol"}).json()["token"]
    for _ in range(3):  # on PostgreSQL, `other` now holds the token's identity in its read cache
        assert other.client.get("/v1/jobs", headers=other.headers(token)).status_code == 200
    assert one.client.delete("/v1/tokens/carol", headers=one.headers()).status_code == 204
    revoked, accepted = time.monotonic(), 0
    while (status := other.client.get("/v1/jobs", headers=other.headers(token)).status_code) == 200:
        accepted += 1
        assert time.monotonic() - revoked < MAX_QUIET_S, "the other replica still accepts the revoked token"
        time.sleep(0.01)
    assert status == 401
    if one.settings.database_url.startswith("sqlite"):
        assert accepted == 0


def test_events_state_shows_the_epochs_just_read(api: Api) -> None:
    job_id = _running_job(api)
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.3))
    api.ray.set(f"{job_id}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers()) as resp:
        text = "".join(resp.iter_text())
    states = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"id"')]
    assert states and states[-1]["progress"]["epoch"] == 1 and states[-1]["best_val_acc"] == 0.3


def test_the_client_polls_with_the_last_etag(api: Api) -> None:
    """TrainctlClient.job (what `trainctl watch` polls) gets 304s while the job is unchanged."""
    import httpx

    from service.client import TrainctlClient

    statuses: list[int] = []

    class Recording(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            resp = api.client._transport.handle_request(request)
            statuses.append(resp.status_code)
            return resp

    job_id = _running_job(api)
    with TrainctlClient("http://testserver", api.token, transport=Recording()) as client:
        first = client.job(job_id)
        assert client.job(job_id) == first and statuses == [200, 304]
        api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.3))
        assert client.job(job_id)["progress"]["epoch"] == 1 and statuses[-1] == 200
        other = api.post(DEBUG_JOB).json()["id"]
        assert client.job(other)["state"] == "QUEUED" and statuses[-1] == 200  # another job: no stale tag


def test_store_snapshots_are_reused_only_for_an_unchanged_row(database_url: str, tmp_path: Path) -> None:
    from service.engine.store import Store
    from trainer.spec import resolve

    (tmp_path / "data").mkdir(exist_ok=True)
    one, other = Store(database_url), Store(database_url)  # two replicas
    one.create_schema()
    try:
        job, _ = one.create_job("alice", resolve("debug", {"optim.epochs": 3}), None, None)
        first = one.get(job.id)
        assert first is not None and one.get(job.id) is first  # unchanged: the same snapshot
        other.update(job.id, message="changed elsewhere")
        fresh = one.get(job.id)
        assert fresh is not None and fresh is not first and fresh.message == "changed elsewhere"
        assert one.list()[0][0] is fresh
    finally:
        one.close()
        other.close()


def test_polls_run_inline_only_where_nothing_waits_on_a_network() -> None:
    from service.api.deps import polls_can_run_inline

    assert polls_can_run_inline("sqlite", "/srv/trainctl/storage")
    assert not polls_can_run_inline("postgresql", "/srv/trainctl/storage")  # a round trip per read
    assert not polls_can_run_inline("sqlite", "s3://bucket/trainctl")  # metrics.jsonl is stat'ed on S3
    assert not polls_can_run_inline("sqlite", "S3://bucket/trainctl")


def test_status_polls_answer_while_every_worker_thread_is_taken(api: Api, monkeypatch: Any) -> None:
    """Polls never wait for the threadpool of `def` routes: on SQLite + local storage they run on the event
    loop, on PostgreSQL on the app's poll threads. With the threadpool's one token held by a blocked `def`
    route they still answer, and the revocation of a token is still seen by the next poll."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import anyio.to_thread

    from service.engine import jobdir

    state = api.client.app.state.trainctl
    assert state.polls_inline == (state.store.dialect == "sqlite")
    job_id = _running_job(api)
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.3))
    token = api.client.post("/v1/tokens", headers=api.headers(), json={"name": "dave"}).json()["token"]
    release, entered = threading.Event(), threading.Event()
    real_read = jobdir.read_metrics

    def blocked_read(job_dir: str) -> Any:
        entered.set()
        release.wait(20)
        return real_read(job_dir)

    monkeypatch.setattr(jobdir, "read_metrics", blocked_read)

    def one_token() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1

    api.client.portal.call(one_token)
    with ThreadPoolExecutor(2) as threads:
        try:
            held = threads.submit(api.get, f"/v1/jobs/{job_id}/metrics")  # a `def` route: takes the one thread
            assert entered.wait(10)
            assert (state.poll_threads is None) == state.polls_inline
            started = time.monotonic()
            one = api.get(f"/v1/jobs/{job_id}")
            assert one.status_code == 200 and one.json()["progress"]["epoch"] == 1
            assert api.get("/v1/jobs").json()["total"] == 1
            assert api.get(f"/v1/jobs/{job_id}", headers=api.headers(token)).status_code == 404  # not dave's
            assert api.get("/v1/jobs", headers=api.headers(token)).json()["total"] == 0
            assert time.monotonic() - started < 5
        finally:
            release.set()
        assert held.result().status_code == 200
    # no poll caches a token check: revoked, it is refused by the very next poll of either kind
    assert api.client.delete("/v1/tokens/dave", headers=api.headers()).status_code == 204
    assert api.get(f"/v1/jobs/{job_id}", headers=api.headers(token)).status_code == 401
    assert api.get("/v1/jobs", headers=api.headers(token)).status_code == 401


def test_a_list_page_is_rendered_again_when_one_of_its_jobs_changes(api: Api) -> None:
    """The page cache is keyed by its items' ETags: a change of any job on the page is a new body at once."""
    views.LISTS.clear()
    ids = [api.post(DEBUG_JOB).json()["id"] for _ in range(2)]
    first = api.get("/v1/jobs")
    assert api.get("/v1/jobs").content == first.content and len(views.LISTS) == 1
    assert api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers()).status_code == 200
    after = api.get("/v1/jobs", headers={"If-None-Match": first.headers["etag"]})
    assert after.status_code == 200 and [j["state"] for j in after.json()["jobs"]] == ["QUEUED", "CANCELLED"]
    assert after.headers["etag"] != first.headers["etag"] and len(views.LISTS) == 2


def test_inline_polls_never_wait_for_a_pooled_connection(api: Api) -> None:
    """The event loop's polls read through its own kept connection: with every pooled connection held by
    worker threads (here: this test) they still answer, and see what those connections commit."""
    import sqlalchemy.exc

    state = api.client.app.state.trainctl
    if not state.polls_inline:
        pytest.skip("PostgreSQL: a poll thread takes its connection from the pool at its first poll")
    job_id = api.post(DEBUG_JOB).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200  # the loop's connection is open from now on
    pool = state.store.engine.pool
    pool._timeout = 0.2  # a read that waits for the pool fails (a 500) in 0.2 s, not thirty
    held = []
    try:
        while True:
            try:
                held.append(state.store.engine.connect())
            except sqlalchemy.exc.TimeoutError:  # the pool is exhausted
                break
        assert len(held) >= pool.size()
        one, page = api.get(f"/v1/jobs/{job_id}"), api.get("/v1/jobs")
        assert one.status_code == 200 and one.json()["state"] == "QUEUED", one.text
        assert page.status_code == 200 and page.json()["total"] == 1, page.text
    finally:
        for conn in held:
            conn.close()
    api.reconcile()  # a write through the pool; the next poll's read transaction sees it
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "STARTING"


def test_polls_outlive_a_dropped_database_connection(api: Api) -> None:
    """PostgreSQL: each poll thread keeps its connection rather than taking a pre-pinged one from the pool per
    poll. When the server drops them all (a restart, an idle timeout), every poll still answers: the one
    read that finds its connection gone is run again on a new one."""
    from sqlalchemy import text

    from service.server.app import POLL_THREADS

    state = api.client.app.state.trainctl
    if state.polls_inline:
        pytest.skip("SQLite + local storage: polls read through the event loop's own file connection")
    job_id = api.post(DEBUG_JOB).json()["id"]
    rounds = 3 * POLL_THREADS  # enough polls to give every poll thread its kept connection
    assert all(api.get(f"/v1/jobs/{job_id}").status_code == 200 for _ in range(rounds))
    with state.store.engine.connect() as conn:
        dropped = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert dropped >= 1
    answers = [api.get(f"/v1/jobs/{job_id}") for _ in range(rounds)] + [api.get("/v1/jobs") for _ in range(rounds)]
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers if r.status_code != 200]


def test_the_view_says_which_host_was_lost_and_where_the_job_resumed(api: Api) -> None:
    """trainer/infra.py's record, carried by the restarted run's first epoch, is one line of the job's view
    and of its metrics CSV."""
    job_id = _running_job(api)
    loss = {"time": 1e9 + 2.5, "host": "10.77.0.3", "lost_at_epoch": 3, "checkpoint_epoch": 2}
    resumed = json.loads(metrics_line(3, 0.4)) | {
        "resumed": True,
        "infra_losses": [loss | {"resumed_from_epoch": 2, "replacement": True}],
    }
    lines = metrics_line(1, 0.2) + metrics_line(2, 0.3) + json.dumps(resumed) + "\n"
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(lines)
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["infra_losses"] == ["worker host 10.77.0.3 lost at epoch 3; resumed from epoch 2 on a replacement host"]
    csv_text = api.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"}).text
    assert '""host"": ""10.77.0.3""' in csv_text  # the loss as JSON in its column
    api.job_dir(job_id).joinpath("metrics.jsonl").write_text(metrics_line(1, 0.2))
    assert api.get(f"/v1/jobs/{job_id}").json()["infra_losses"] is None
