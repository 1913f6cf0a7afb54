"""Rebuilding lost job records from storage (`trainctl reindex`), and the reconciler leader lock, on SQLite
and PostgreSQL. The app runs over a fake Ray; the storage is real (local directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service.leader import LeaderLock
from service.reindex import reindex
from service.store import Store, make_engine
from tests.service.conftest import DEBUG_JOB, Api, metrics_line


def _another_database(request: pytest.FixtureRequest, database_url: str, tmp_path) -> str:
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'rebuilt.db'}"
    return request.getfixturevalue("postgres").create_database("rebuilt")


def test_reindex_rebuilds_finished_running_and_cancelled_jobs(make_api, request, database_url, tmp_path) -> None:
    api: Api = make_api()
    done = api.post(
        {"preset": "debug", "overrides": {"optim.epochs": 2}}, headers={"Idempotency-Key": "k-done"}
    ).json()["id"]
    running = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    for job_id in (done, running):
        api.ray.set(f"{job_id}-1", "RUNNING")
        (api.job_dir(job_id) / "metrics.jsonl").write_text(metrics_line(1, 0.3) + metrics_line(2, 0.35))
    api.reconcile()
    (api.job_dir(done) / "summary.json").write_text(
        json.dumps({"state": "succeeded", "best_val_acc": 0.35, "epochs_completed": 2})
    )
    api.ray.set(f"{done}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    cancelled = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()  # a slot is free again: it starts, then is cancelled
    api.client.post(f"/v1/jobs/{cancelled}/cancel", headers=api.headers())
    (api.job_dir("not-a-job")).mkdir(parents=True)
    original = {j: api.runner.store.get(j) for j in (done, running, cancelled)}
    assert [original[j].state.value for j in (done, running, cancelled)] == ["SUCCEEDED", "RUNNING", "CANCELLED"]

    # The database is lost: a new, empty one; rebuild it from the storage root.
    new_url = _another_database(request, database_url, tmp_path)
    store = Store(new_url)
    store.create_schema()
    report = reindex(store, api.settings.storage_root)
    assert sorted(report.restored) == sorted([done, running, cancelled])
    assert report.skipped == {"not-a-job": "no spec.json"}
    for job_id, old in original.items():
        new = store.get(job_id)
        assert new is not None, job_id
        for f in (
            "owner",
            "state",
            "spec",
            "attempts",
            "attempt_log",
            "ray_submission_id",
            "best_val_acc",
            "last_epoch",
            "created_at",
            "idempotency_key",
            "request_hash",
            "message",
        ):
            assert getattr(new, f) == getattr(old, f), (job_id, f, getattr(new, f), getattr(old, f))
    # Submission order is kept; a second run changes nothing.
    assert [j.id for j in store.list(limit=10)[0]] == [cancelled, running, done]
    again = reindex(store, api.settings.storage_root)
    assert again.restored == [] and sorted(again.kept) == sorted([done, running, cancelled])
    store.close()

    # A service on the rebuilt database picks the running job up where it is: no resubmission.
    api2: Api = make_api(database_url=new_url, ray=api.ray)  # the same Ray cluster
    submitted = sorted(api.ray.jobs)
    (api.job_dir(running) / "summary.json").write_text(
        json.dumps({"state": "succeeded", "best_val_acc": 0.35, "epochs_completed": 2})
    )
    api2.ray.set(f"{running}-1", "SUCCEEDED", exit_code=0)
    api2.reconcile()
    job = api2.client.get(f"/v1/jobs/{running}", headers=api2.headers()).json()
    assert job["state"] == "SUCCEEDED" and job["attempts"] == 1 and job["owner"] == "admin"
    assert sorted(api2.ray.jobs) == submitted  # nothing new was submitted
    # The rebuilt job keeps its recorded owner id. The new database's admin token is a new owner (issue 21
    # item 11: a token re-created under a name never inherits its jobs), so its own key makes a new job.
    assert api2.runner.store.get(done).idempotency_key == "k-done"
    again = api2.post({"preset": "debug", "overrides": {"optim.epochs": 2}}, headers={"Idempotency-Key": "k-done"})
    assert again.status_code == 201 and again.json()["id"] != done


def test_reindex_command(make_api, request, database_url, tmp_path) -> None:
    api: Api = make_api()
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    new_url = _another_database(request, database_url, tmp_path)
    env = {**os.environ, "TRAINCTL_DATABASE_URL": new_url, "TRAINCTL_DATA_DIR": str(api.settings.data_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "reindex", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["restored"] == [job_id]
    store = Store(new_url)
    assert store.get(job_id).state.value == "STARTING"
    store.close()


def test_leader_lock_is_exclusive_and_released(database_url: str) -> None:
    Store(database_url).create_schema()
    a, b = LeaderLock(make_engine(database_url)), LeaderLock(make_engine(database_url))
    assert a.acquire() and a.acquire()  # re-checking a held lock keeps it
    assert not b.acquire()
    a.release()
    assert b.acquire() and not a.acquire()
    b.release()


def test_leader_lock_is_released_when_its_process_is_killed(database_url: str) -> None:
    Store(database_url).create_schema()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom service.leader import LeaderLock\n"
            "from service.store import make_engine\nassert LeaderLock(make_engine(sys.argv[1])).acquire()\n"
            "print('held', flush=True)\ntime.sleep(600)\n",
            database_url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = LeaderLock(make_engine(database_url))
        assert not lock.acquire()
        holder.kill()
        holder.wait(10)
        import time

        deadline = time.monotonic() + 5
        while not lock.acquire():
            assert time.monotonic() < deadline, "the lock of a killed process was not released within 5 s"
            time.sleep(0.1)
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
