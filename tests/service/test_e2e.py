"""End to end, no fakes: a real `trainctl serve` process (uvicorn, SQLite, local storage) attached to the
session's real Ray head, real HTTP, real `python -m trainer.run` jobs (debug preset, 2 Ray Train workers on
CPU, 1-3 epochs on the real CIFAR-10 parquet).

The module shares one service with max 1 concurrent job, so tests run their jobs one after another (this
machine has 2 cores) and a second submission waits QUEUED.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import TRAINCTL, Service, start_service, wait_for
from tests.service.test_api import MALFORMED

pytestmark = pytest.mark.ray

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def job_body(parquet: Path, epochs: int = 2, **overrides) -> dict:
    return {"preset": "debug", "overrides": {"data.train": str(parquet), "optim.epochs": epochs, **overrides}}


def ray_status(head: RayHead, submission_id: str) -> str:
    r = httpx.get(f"{head.dashboard_url}/api/jobs/{submission_id}", timeout=10)
    return r.json()["status"] if r.status_code == 200 else f"HTTP {r.status_code}"


def finished(job: dict) -> bool:
    return job["state"] in TERMINAL


def test_job_runs_to_success(service: Service, cifar_parquet: Path) -> None:
    with service.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        resp = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=2))
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        states, epochs_seen = [], set()
        deadline = time.monotonic() + 400
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if not states or states[-1] != job["state"]:
                states.append(job["state"])
            epochs_seen.add(job["progress"]["epoch"])
            if finished(job) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert job["state"] == "SUCCEEDED", (job, c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}).text)
        assert "RUNNING" in states and states[0] in ("QUEUED", "STARTING"), states
        assert {1, 2} <= epochs_seen, epochs_seen  # progress moved through every epoch
        assert job["progress"] == {"epoch": 2, "epochs": 2, "eta_seconds": 0.0}
        assert job["attempts"] == 1 and job["ray_submission_id"] == f"{job_id}-1"
        assert 0.0 <= job["best_val_acc"] <= 1.0 and job["metrics"]["epoch"] == 2

        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        assert [m["epoch"] for m in metrics] == [1, 2]
        assert max(m["val_acc"] for m in metrics) == pytest.approx(job["best_val_acc"])
        csv = c.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"}).text.strip().splitlines()
        assert len(csv) == 3 and csv[0].startswith("epoch,")

        cps = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]
        assert cps and all(cp["size"] > 0 and len(cp["sha256"]) == 64 for cp in cps)
        with c.stream("GET", f"/v1/jobs/{job_id}/checkpoints/best") as r:
            assert r.status_code == 200
            body = b"".join(r.iter_bytes())
            header_sha = r.headers["x-checkpoint-sha256"]
        assert hashlib.sha256(body).hexdigest() == header_sha
        summary = json.loads((Path(service.data_dir) / "storage" / "jobs" / job_id / "summary.json").read_text())
        assert summary["best_checkpoint_sha256"] == header_sha and summary["best_checkpoint_size"] == len(body)

        logs = c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 5})
        assert logs.status_code == 200 and 0 < len(logs.text.splitlines()) <= 5
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "SUCCEEDED"  # too late: unchanged


def test_cancel_queued_and_running(service: Service, cifar_parquet: Path, ray_head: RayHead) -> None:
    with service.client() as c:
        a = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=200)).json()["id"]
        b = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=200)).json()["id"]
        wait_for(c, a, lambda j: j["state"] in ("STARTING", "RUNNING"), 60, "job A to start")
        assert c.get(f"/v1/jobs/{b}").json()["state"] == "QUEUED"  # max 1 concurrent job
        resp = c.post(f"/v1/jobs/{b}/cancel")
        assert resp.status_code == 200 and resp.json()["state"] == "CANCELLED"

        wait_for(c, a, lambda j: j["state"] == "RUNNING", 120, "job A to run")
        started = time.monotonic()
        resp = c.post(f"/v1/jobs/{a}/cancel")
        assert resp.status_code == 200 and resp.json()["state"] == "CANCELLED"
        assert time.monotonic() - started < 15  # "within seconds", with room for a loaded machine
        deadline = time.monotonic() + 60
        while ray_status(ray_head, f"{a}-1") != "STOPPED":
            assert time.monotonic() < deadline, ray_status(ray_head, f"{a}-1")
            time.sleep(0.5)
        time.sleep(3)  # several reconciler passes later ...
        for job_id in (a, b):
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "CANCELLED", job  # ... still cancelled, never retried
        assert c.get(f"/v1/jobs/{a}").json()["attempts"] == 1
        assert c.get(f"/v1/jobs/{b}").json()["ray_submission_id"] is None  # B never reached Ray
        assert ray_status(ray_head, f"{b}-1") == "HTTP 404"
        assert c.post(f"/v1/jobs/{a}/cancel").json()["state"] == "CANCELLED"  # idempotent
        assert c.delete(f"/v1/jobs/{b}").status_code == 204


def test_clients_get_4xx_never_500(service: Service) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as anon, service.client() as c:
        assert anon.get("/v1/jobs").status_code == 401
        assert anon.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        bob = c.post("/v1/tokens", json={"name": "bob-e2e"}).json()["token"]
        mine = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"optim.epochs": 1}},
                      headers={"Idempotency-Key": "e2e-key"}).json()["id"]
        c.post(f"/v1/jobs/{mine}/cancel")
        with service.client(token=bob) as b:
            assert b.get(f"/v1/jobs/{mine}").status_code == 404
            assert b.post(f"/v1/jobs/{mine}/cancel").status_code == 404
        for body, field in MALFORMED:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422 and field in [d["field"] for d in r.json()["error"]["details"]], r.text
        r = c.post("/v1/jobs", content=b"{oops", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"optim.epochs": 2}},
                   headers={"Idempotency-Key": "e2e-key"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        assert c.get("/v1/jobs/nope").status_code == 404


def test_user_error_fails_without_retry(service: Service, tmp_path: Path) -> None:
    """Wrong data is the user's error (trainer exit 2): FAILED at once, with the reason, never resubmitted."""
    with service.client() as c:
        body = job_body(tmp_path / "missing" / "train.parquet", epochs=1, **{"checkpoint.max_restarts": 2})
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        job = wait_for(c, job_id, finished, 300, "the job to fail")
        assert job["state"] == "FAILED" and job["attempts"] == 1, job
        assert "not retried" in job["message"] and "train.parquet" in job["message"], job["message"]
        time.sleep(2)
        assert c.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1


def _cli(service: Service, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**service.env, "TRAINCTL_URL": service.url, "TRAINCTL_TOKEN": service.token}
    return subprocess.run([TRAINCTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_submit_watch_best(service: Service, cifar_parquet: Path, tmp_path: Path) -> None:
    bad = _cli(service, "submit", "--preset", "debug", "--set", "optim.lr=-1")
    assert bad.returncode == 5 and "optim.lr" in bad.stderr
    sub = _cli(service, "submit", "--preset", "debug", "--set", f"data.train={cifar_parquet}",
               "--set", "optim.epochs=1", "--set", 'exports=["safetensors", "pt2"]', "-q")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    watch = _cli(service, "watch", job_id, "--interval", "1", timeout=400)
    assert watch.returncode == 0, (watch.stdout, watch.stderr)
    assert "SUCCEEDED epoch 1/1" in watch.stdout
    out = tmp_path / "best.pt"
    best = _cli(service, "best", job_id, "-o", str(out))
    assert best.returncode == 0, best.stderr
    with service.client() as c, c.stream("GET", f"/v1/jobs/{job_id}/checkpoints/best") as r:
        r.read()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == r.headers["x-checkpoint-sha256"]
    assert "verified" in best.stdout and not (tmp_path / "best.pt.part").exists()
    csv = _cli(service, "metrics", job_id, "--csv")
    assert csv.returncode == 0 and len(csv.stdout.strip().splitlines()) == 2
    status = _cli(service, "status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "SUCCEEDED"
    listing = _cli(service, "list")
    assert listing.returncode == 0 and job_id in listing.stdout
    logs = _cli(service, "logs", job_id, "--tail", "3")
    assert logs.returncode == 0 and logs.stdout
    # The exported model leaves trainctl: listed, downloaded verified, and run by plain torch here.
    with service.client() as c:
        names = {a["name"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]}
    assert names == {"model.safetensors", "model.pt2"}
    exported = _cli(service, "export", job_id, "--format", "pt2", "-o", str(tmp_path / "model.pt2"))
    assert exported.returncode == 0 and "verified" in exported.stdout, exported.stderr
    import torch

    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert program(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    from torchvision.io import write_png

    from trainer.data import load

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, img in enumerate(load(str(cifar_parquet), "parquet", limit=5).images):
        write_png(img, str(pngs / f"{i}.png"))
    predicted = _cli(service, "predict", job_id, "--input", str(pngs), "-o", str(tmp_path / "pred.csv"))
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "pred.csv").read_text().splitlines()[0] == "ID,Labels"
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 6
    missing = _cli(service, "status", "no-such-job")
    assert missing.returncode == 5 and "not_found" in missing.stderr


def test_restart_api_mid_job(ray_head: RayHead, cifar_parquet: Path, tmp_path: Path) -> None:
    # This service names the cluster by its GCS address (the module's by its dashboard URL): both work.
    svc = start_service(ray_head, tmp_path / "data", TRAINCTL_RAY_ADDRESS=ray_head.address)
    try:
        with svc.client() as c:
            job_id = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=2)).json()["id"]
            wait_for(c, job_id, lambda j: j["state"] == "RUNNING", 120, "the job to run")
        svc.stop()  # the API dies mid-job; the Ray job goes on
        svc.proc = None
        svc.start()
        with svc.client() as c:
            job = wait_for(c, job_id, finished, 400, "the job to finish after the restart")
            assert job["state"] == "SUCCEEDED" and job["attempts"] == 1, job
            assert [m["epoch"] for m in c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]] == [1, 2]
    finally:
        svc.stop()


def test_driver_killed_is_resubmitted_and_resumes(service: Service, cifar_parquet: Path, ray_head: RayHead) -> None:
    """The job's driver process (`python -m trainer.run`) is SIGKILLed: the Ray job fails outside the user's
    code, so the service resubmits the same job dir as <id>-2, which resumes from its checkpoint."""
    with service.client() as c:
        # ~2 s epochs, so the kill lands mid-run
        body = job_body(cifar_parquet, epochs=3, **{"data.max_train_images": 2048})
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        wait_for(c, job_id, lambda j: j["progress"]["epoch"] >= 1 or finished(j), 300, "the first epoch")
        info = httpx.get(f"{ray_head.dashboard_url}/api/jobs/{job_id}-1", timeout=10).json()
        killed_at = time.time()
        os.kill(int(info["driver_info"]["pid"]), signal.SIGKILL)
        job = wait_for(c, job_id, finished, 400, "the job to finish")
        assert job["state"] == "SUCCEEDED", job
        assert job["attempts"] == 2 and job["ray_submission_id"] == f"{job_id}-2", job
        assert "attempt 1 failed" in job["attempt_log"][1]["reason"]
        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        assert [m["epoch"] for m in metrics] == [1, 2, 3]  # no epoch repeated beyond the last checkpoint
        resumed = [m for m in metrics if m["resumed"]]
        assert len(resumed) == 1 and resumed[0]["epoch"] >= 2, metrics
        print(f"driver kill → resumed epoch {resumed[0]['epoch']} started after "
              f"{resumed[0]['time'] - resumed[0]['epoch_seconds'] - killed_at:.1f} s")


def test_serve_starts_and_stops_its_own_ray_head(tmp_path: Path) -> None:
    """Without a Ray address, `trainctl serve` starts a local head on 127.0.0.1 — with Ray token auth (the
    default), its token in the data dir — and, on SIGTERM, stops exactly that head (its process group)."""
    import re
    import signal

    from tests.plugins.ray_cluster import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "RAY_ADDRESS", "RAY_AUTH"))}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([TRAINCTL, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port),
                                 "--ray-num-cpus", "2"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head_pid = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"serve with its own head never became healthy:\n{log_path.read_text()[-3000:]}")
        text = log_path.read_text()
        assert "Created the admin token" in text and (tmp_path / "data" / "admin-token").read_text().strip() in text
        head_pid = int(re.search(r"\(pid (\d+)\)", text).group(1))
        dashboard = re.search(r"dashboard (http://127\.0\.0\.1:\d+)", text).group(1)
        ray_token = (tmp_path / "data" / "ray-auth-token").read_text().strip()
        assert httpx.get(dashboard + "/api/jobs/", timeout=5).status_code == 401  # token auth is on ...
        ok = httpx.get(dashboard + "/api/jobs/", headers={"Authorization": f"Bearer {ray_token}"}, timeout=5)
        assert ok.status_code == 200  # ... with the token serve generated, which it also uses (healthz ok)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 30  # the whole head process group goes (zombies need a moment)
        while True:
            try:
                os.killpg(head_pid, 0)
            except ProcessLookupError:
                break
            left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(head_pid)], capture_output=True, text=True)
            live = [ln for ln in left.stdout.splitlines()[1:] if ln.split()[1][0] != "Z"]
            if not live:
                break
            assert time.monotonic() < deadline, left.stdout
            time.sleep(0.5)
    finally:
        for pgid in (proc.pid, head_pid):
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
