"""Rebuilding lost job records from storage (`trainctl reindex`), and the reconciler leader lock, on SQLite
and PostgreSQL. The app runs over a fake Ray; the storage is real (local directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service.engine import records
from service.engine.leader import LeaderLock
from service.engine.store import Store, make_engine
from service.server.reindex import reindex
from tests.service.conftest import DEBUG_JOB, Api, metrics_line


def _another_database(request: pytest.FixtureRequest, database_url: str, tmp_path) -> str:
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'rebuilt.db'}"
    return request.getfixturevalue("postgres").create_database("rebuilt")


def _key(api: Api) -> bytes | None:
    return records.read_key(api.settings.record_key_path)


def test_reindex_rebuilds_finished_running_and_cancelled_jobs(make_api, request, database_url, tmp_path) -> None:
    api: Api = make_api()
    labelled = {"preset": "debug", "overrides": {"optim.epochs": 2}, "name": "n", "project": "p", "tags": ["t"]}
    done = api.post(labelled, headers={"Idempotency-Key": "k-done"}).json()["id"]
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
    report = reindex(store, api.settings.storage_root, _key(api), api.settings)
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
            "name",
            "project",
            "tags",
            "parent",
        ):
            assert getattr(new, f) == getattr(old, f), (job_id, f, getattr(new, f), getattr(old, f))
    # Submission order is kept; a second run changes nothing.
    assert [j.id for j in store.list(limit=10)[0]] == [cancelled, running, done]
    again = reindex(store, api.settings.storage_root, _key(api), api.settings)
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
        [sys.executable, "-m", "service.client.cli", "reindex", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["restored"] == [job_id]
    store = Store(new_url)
    assert store.get(job_id).state.value == "STARTING"
    store.close()
    # a planted directory is reported, with why, and becomes nobody's job; --unsigned-owner admin is refused
    planted = api.job_dir("planted")
    planted.mkdir()
    (planted / "spec.json").write_text((api.job_dir(job_id) / "spec.json").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "service.client.cli", "reindex"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "skipped 1" in out.stdout and "skipped  planted: no record.json" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "service.client.cli", "reindex", "--unsigned-owner", "admin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "may not be 'admin'" in out.stderr


# --- issue 21 item 7: reindex trusts nothing it finds in storage ------------------------------------------------


def _plant(api: Api, job_id: str, spec: dict, record: dict | None) -> None:
    """What anyone with write access to the storage root can do: a job directory of their own making."""
    folder = api.job_dir(job_id)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    if record is not None:
        (folder / "record.json").write_text(json.dumps(record))


def test_reindex_believes_only_signed_records_and_valid_specs(make_api, tmp_path) -> None:
    api: Api = make_api()
    alice = api.client.post("/v1/tokens", json={"name": "alice"}, headers=api.headers()).json()["token"]
    real = api.post(DEBUG_JOB, headers=api.headers(alice)).json()["id"]
    api.reconcile()
    real_dir = api.job_dir(real)
    signed = json.loads((real_dir / "record.json").read_text())
    spec = json.loads((real_dir / "spec.json").read_text())
    assert records.SIGNATURE in signed and signed["ray_submission_id"] == f"{real}-1"
    # 1. an unsigned record claiming the admin and alice's Ray submission
    forged = {**{k: v for k, v in signed.items() if k != records.SIGNATURE}, "owner": "admin"}
    _plant(api, "planted1", spec, {**forged, "id": "planted1"})
    # 2. alice's signed record copied into another directory (the signature covers the job id)
    _plant(api, "planted2", spec, {**signed, "id": "planted2"})
    # 3. a signed record next to a spec that is not the one it was signed for (a bigger model)
    _plant(api, "planted3", {**spec, "model": {**spec["model"], "widths": [64, 128, 256, 512]}}, None)
    (api.job_dir("planted3") / "record.json").write_text(json.dumps(signed))
    # 4. a spec over the limits (it would hang or exhaust the head), and one over this service's own limit
    _plant(api, "planted4", {**spec, "model": {**spec["model"], "blocks": [1, 1, 1, 10**12]}}, forged)
    _plant(api, "planted5", {**spec, "limits": {"max_hours": 500}}, forged)
    _plant(api, "planted6", {**spec, "data": {**spec["data"], "train": "/etc/passwd"}}, forged)
    # 5. no record at all (it used to become an admin job), and a name no job has
    _plant(api, "planted7", spec, None)
    _plant(api, "-rf", spec, None)

    store = Store(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    store.create_schema()
    report = reindex(store, api.settings.storage_root, _key(api), api.settings)
    assert report.restored == [real] and report.unsigned == []
    skipped = report.skipped
    assert set(skipped) == {f"planted{i}" for i in range(1, 8)} | {"-rf"}, skipped
    assert "not signed" in skipped["planted1"] and "--unsigned-owner" in skipped["planted1"]
    for name in ("planted2", "planted3"):
        assert "signature does not verify" in skipped[name], skipped[name]
    assert skipped["planted4"].startswith("spec.json is not a valid spec") and "model.blocks" in skipped["planted4"]
    assert "limits.max_hours" in skipped["planted5"] and "TRAINCTL_MAX_JOB_HOURS" in skipped["planted5"]
    assert "data.train" in skipped["planted6"] and skipped["planted7"].startswith("no record.json")
    assert skipped["-rf"] == "not a job id"
    restored = store.get(real)
    assert restored.owner == "alice" and restored.ray_submission_id == f"{real}-1"

    # the operator adopts unsigned directories, as finished jobs of an ordinary owner: never the admin's,
    # never running, never pointing at a Ray submission
    with pytest.raises(ValueError, match="admin"):
        reindex(store, api.settings.storage_root, _key(api), api.settings, unsigned_owner="admin")
    report = reindex(store, api.settings.storage_root, _key(api), api.settings, unsigned_owner="recovered")
    assert sorted(report.restored) == ["planted1", "planted2", "planted3", "planted7"]
    assert sorted(report.unsigned) == sorted(report.restored)
    for job_id in report.restored:
        job = store.get(job_id)
        assert job.owner == "recovered" and job.state.value == "FAILED" and job.ray_submission_id is None
        assert job.attempts == 0 and job.attempt_log == [] and "unsigned" in job.message
    assert sorted(report.skipped) == ["-rf", "planted4", "planted5", "planted6"]
    # without the key nothing verifies: even the real record is only unsigned data
    fresh = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh.create_schema()
    report = reindex(fresh, api.settings.storage_root, None, api.settings)
    assert real in report.skipped and "no record key" in report.skipped[real]
    store.close()
    fresh.close()


def test_reindex_re_derives_the_ray_submission_id(make_api, tmp_path) -> None:
    """Even a record signed with the key (an older service, a bug) cannot point a job at another Ray job: the
    id is always `<job id>-<attempts>`."""
    api: Api = make_api()
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    folder = api.job_dir(job_id)
    record = {k: v for k, v in json.loads((folder / "record.json").read_text()).items() if k != records.SIGNATURE}
    spec = json.loads((folder / "spec.json").read_text())
    record["ray_submission_id"] = "someone-elses-job-1"
    (folder / "record.json").write_text(json.dumps(records.sign(_key(api), job_id, record, spec)))
    store = Store(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    store.create_schema()
    assert reindex(store, api.settings.storage_root, _key(api), api.settings).restored == [job_id]
    assert store.get(job_id).ray_submission_id == f"{job_id}-1"
    store.close()


def test_records_are_signed_with_an_owner_only_key(api: Api) -> None:
    import stat

    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    key_file = api.settings.record_key_path
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    record = json.loads((api.job_dir(job_id) / "record.json").read_text())
    spec = json.loads((api.job_dir(job_id) / "spec.json").read_text())
    key = records.read_key(key_file)
    assert records.verified(key, job_id, record, spec)
    assert not records.verified(key, job_id, {**record, "owner": "mallory"}, spec)
    assert not records.verified(key, job_id, record, {**spec, "seed": 1})
    assert not records.verified(b"k" * 64, job_id, record, spec)


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
            "import sys, time\nfrom service.engine.leader import LeaderLock\n"
            "from service.engine.store import make_engine\nassert LeaderLock(make_engine(sys.argv[1])).acquire()\n"
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
