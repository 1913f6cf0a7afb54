"""Job views (service/api/views.py): what a poll shows stays exact while the caches behind it skip unchanged
work, and conditional polls (ETag / If-None-Match) answer 304 until the job changes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from service.api import views
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


def test_a_revoked_token_is_refused_at_once_by_another_replica(make_api: Any) -> None:
    """No replica caches token checks: a revoke on one is a 401 on the next request to any other."""
    one = make_api()
    other = make_api()  # the same database, as a second API replica
    token = one.client.post("/v1/tokens", headers=one.headers(), json={"name": "carol"}).json()["token"]
    assert other.client.get("/v1/jobs", headers=other.headers(token)).status_code == 200
    assert one.client.delete("/v1/tokens/carol", headers=one.headers()).status_code == 204
    assert other.client.get("/v1/jobs", headers=other.headers(token)).status_code == 401


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
