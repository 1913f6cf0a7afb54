"""Production topology, end to end with real processes: real `trainctl serve` replicas, a real PostgreSQL,
the session's real Ray head, real training jobs (debug preset on small CIFAR-10-format batches written by
the test: these tests are about the service, not the data).

* Two replicas on one PostgreSQL: exactly one reconciles; jobs submitted to either run exactly once; when
  the leader is SIGKILLed the other takes over within seconds and finishes everything.
* The database is deleted under a finished and a running job; `trainctl reindex` rebuilds both from the
  storage root, and the running job goes on (same Ray submission, no restart).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.postgres import PostgresServer
from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import TRAINCTL, Service, start_service, wait_for
from tests.trainer.cifar_files import write_cifar_python
from trainer.contract import STEP_PAUSE_ENV

pytestmark = pytest.mark.ray

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def body(data: Path, epochs: int) -> dict:
    # One Ray Train worker: the smallest real run (these tests are about the service, on a 2-core machine).
    return {"preset": "debug", "overrides": {"data.train": str(data), "optim.epochs": epochs, "scaling.num_workers": 1}}


@pytest.fixture(scope="module")
def cifar_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:  # (a CIFAR-10 python directory)
    return write_cifar_python(tmp_path_factory.mktemp("cifar"), per_batch=200)


def is_leader(svc: Service) -> bool:
    text = httpx.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {svc.token}"}, timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "trainctl_reconciler_leader":
            return fam.samples[0].value == 1
    raise AssertionError("no trainctl_reconciler_leader in /metrics")


def ray_submissions(head: RayHead, job_ids: set[str]) -> dict[str, list[str]]:
    """Every Ray job the cluster knows for each of our jobs (by the metadata the runner attaches)."""
    out: dict[str, list[str]] = {j: [] for j in job_ids}
    for rj in httpx.get(f"{head.dashboard_url}/api/jobs/", timeout=30).json():
        jid = (rj.get("metadata") or {}).get("trainctl_job_id")
        if jid in out:
            out[jid].append(rj["submission_id"])
    return out


@pytest.mark.timeout(1200)
def test_two_replicas_one_reconciler_and_takeover_after_kill(
    ray_head: RayHead, postgres: PostgresServer, cifar_parquet: Path, tmp_path: Path
) -> None:
    url = postgres.create_database("replicas")
    common = {
        "TRAINCTL_DATABASE_URL": url,
        "TRAINCTL_STORAGE": str(tmp_path / "storage"),
        "TRAINCTL_MAX_CONCURRENT_JOBS": "2",
    }
    a = start_service(ray_head, tmp_path / "a", **common)
    # Replicas share the admin token file (docs/operations.md): one that starts without it rotates the token.
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / "admin-token", tmp_path / "b" / "admin-token")
    b = start_service(ray_head, tmp_path / "b", **common)
    replicas = [a, b]
    try:
        token = a.token  # b found the admin token in the database: one set of users for all replicas
        deadline = time.monotonic() + 15
        while sum(map(is_leader, replicas)) != 1:
            assert time.monotonic() < deadline, [is_leader(r) for r in replicas]
            time.sleep(0.3)
        leader, follower = (a, b) if is_leader(a) else (b, a)
        ids = []
        for svc in (a, b, a, b):
            with svc.client(token) as c:
                resp = c.post("/v1/jobs", json=body(cifar_parquet, epochs=2))
                assert resp.status_code == 201, resp.text
                ids.append(resp.json()["id"])
        with follower.client(token) as c:  # the follower sees what the leader does: one database
            wait_for(c, ids[0], lambda j: j["state"] == "RUNNING", 300, "the first job to run")
        assert not is_leader(follower)

        os.killpg(leader.proc.pid, signal.SIGKILL)  # no goodbye: the process and its connections vanish
        leader.proc.wait(30)
        leader.proc = None
        killed_at = time.monotonic()
        while not is_leader(follower):
            assert time.monotonic() - killed_at < 10, "the follower did not take over within 10 s"
            time.sleep(0.2)
        print(f"take-over after {time.monotonic() - killed_at:.1f} s")

        with follower.client(token) as c:
            jobs = [wait_for(c, j, lambda j: j["state"] in TERMINAL, 900, "every job to finish") for j in ids]
        assert [j["state"] for j in jobs] == ["SUCCEEDED"] * 4, jobs
        assert [j["attempts"] for j in jobs] == [1] * 4, jobs
        # Exactly once on Ray too: one submission per job, never a second one by the new leader.
        assert ray_submissions(ray_head, set(ids)) == {j: [f"{j}-1"] for j in ids}
    finally:
        for svc in replicas:
            svc.stop()


@pytest.mark.timeout(900)
def test_reindex_after_the_database_is_lost(ray_head: RayHead, cifar_parquet: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Paced jobs (contract.STEP_PAUSE_ENV): the long job runs through the stop, the reindex and the restart
    # on ~2 s epochs of little CPU instead of training flat out for the minute they take.
    svc = start_service(ray_head, data, TRAINCTL_MAX_CONCURRENT_JOBS="2", **{STEP_PAUSE_ENV: "0.25"})
    try:
        with svc.client() as c:
            done = c.post("/v1/jobs", json=body(cifar_parquet, epochs=1)).json()["id"]
            finished = wait_for(c, done, lambda j: j["state"] in TERMINAL, 400, "the short job")
            assert finished["state"] == "SUCCEEDED", finished
            running = c.post("/v1/jobs", json=body(cifar_parquet, epochs=200)).json()["id"]
            before = wait_for(
                c,
                running,
                lambda j: j["state"] == "RUNNING" and j["progress"]["epoch"] >= 1,
                400,
                "the long job to finish an epoch",
            )
        svc.stop()  # the Ray job goes on without the service
        for f in data.glob("trainctl.db*"):
            f.unlink()

        out = subprocess.run(
            [TRAINCTL, "reindex", "--data-dir", str(data)], env=svc.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "restored 2 job(s)" in out.stdout, out.stdout + out.stderr

        svc.start()
        with svc.client() as c:  # a new admin token (the old one lived in the lost database): same owner name
            got = c.get(f"/v1/jobs/{done}").json()
            for f in ("state", "owner", "attempts", "best_val_acc", "spec", "created_at"):
                assert got[f] == finished[f], (f, got[f], finished[f])
            after = c.get(f"/v1/jobs/{running}").json()
            assert after["state"] in ("STARTING", "RUNNING") and after["owner"] == before["owner"]
            # It goes on: same attempt, epochs keep coming from the same Ray job.
            later = wait_for(
                c,
                running,
                lambda j: j["state"] == "RUNNING" and j["progress"]["epoch"] > before["progress"]["epoch"] + 1,
                300,
                "the rebuilt running job to make progress",
            )
            assert later["attempts"] == 1
            assert c.post(f"/v1/jobs/{running}/cancel").json()["state"] == "CANCELLED"
        assert ray_submissions(ray_head, {done, running}) == {done: [f"{done}-1"], running: [f"{running}-1"]}
    finally:
        svc.stop()
