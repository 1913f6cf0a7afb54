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
from tests.service.conftest import TRAINCTL, Service, start_service, test_data_roots, wait_for
from tests.service.priority import autogroup_scheduling, niceness
from tests.service.test_api import MALFORMED
from tests.trainer.jobs import ONE_WORKER
from trainer.contract import MANIFEST, STEP_PAUSE_ENV, parse_manifest

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
        etag, job, not_modified = None, None, 0  # polls as `trainctl watch` does: 304 while nothing changed
        while True:
            resp = c.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag} if etag else {})
            if resp.status_code == 304:
                assert resp.content == b"" and resp.headers["etag"] == etag
                not_modified += 1
            else:
                assert resp.status_code == 200, resp.text
                job, etag = resp.json(), resp.headers["etag"]
            assert job is not None
            if not states or states[-1] != job["state"]:
                states.append(job["state"])
            epochs_seen.add(job["progress"]["epoch"])
            if finished(job) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert job["state"] == "SUCCEEDED", (job, c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}).text)
        assert "RUNNING" in states and states[0] in ("QUEUED", "STARTING"), states
        assert {1, 2} <= epochs_seen, epochs_seen  # progress moved through every epoch, 304s or not
        assert not_modified > 0
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

        # Estimates (issue 30): the finished job's view shows what it took beside its estimate, and the next
        # estimate of the same spec comes from this job's measured speed on the device it really ran on.
        took = c.get(f"/v1/jobs/{job_id}").json()["estimate"]
        assert took["actual_wall_seconds"] > 0 and took["actual_images_per_s"] > 0, took
        est = c.post("/v1/estimates", json=job_body(cifar_parquet, epochs=2)).json()
        assert est["images_per_s"]["basis"].startswith("history: "), est
        assert est["wall_seconds"]["value"] > 0 and est["key"]["device"] in job["devices"][0], est


def test_cancel_queued_and_running(service: Service, cifar_parquet: Path, ray_head: RayHead) -> None:
    with service.client() as c:
        a = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=200, **ONE_WORKER)).json()["id"]
        b = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=200, **ONE_WORKER)).json()["id"]
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


def test_clients_get_4xx_never_500(service: Service, cifar_parquet: Path) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as anon, service.client() as c:
        assert anon.get("/v1/jobs").status_code == 401
        assert anon.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        bob = c.post("/v1/tokens", json={"name": "bob-e2e"}).json()["token"]
        mine = c.post(
            "/v1/jobs",
            json={"preset": "debug", "overrides": {"optim.epochs": 1, "data.train": str(cifar_parquet)}},
            headers={"Idempotency-Key": "e2e-key"},
        ).json()["id"]
        c.post(f"/v1/jobs/{mine}/cancel")
        with service.client(token=bob) as b:
            assert b.get(f"/v1/jobs/{mine}").status_code == 404
            assert b.post(f"/v1/jobs/{mine}/cancel").status_code == 404
        for body, field in MALFORMED:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422 and field in [d["field"] for d in r.json()["error"]["details"]], r.text
        r = c.post("/v1/jobs", content=b"{oops", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        r = c.post(
            "/v1/jobs",
            json={"preset": "debug", "overrides": {"optim.epochs": 2, "data.train": str(cifar_parquet)}},
            headers={"Idempotency-Key": "e2e-key"},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        assert c.get("/v1/jobs/nope").status_code == 404


def test_user_error_fails_without_retry(service: Service, tmp_path: Path) -> None:
    """Wrong data is the user's error (trainer exit 2): FAILED at once, with the reason, never resubmitted."""
    with service.client() as c:
        # a missing file is refused at submission (422 naming the field) ...
        r = c.post("/v1/jobs", json=job_body(tmp_path / "missing" / "train.parquet", epochs=1))
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "data.train", r.text
        # ... a file that exists but is not a dataset fails in the driver
        bad = tmp_path / "train.parquet"
        bad.write_bytes(b"not a parquet file, and its bytes never reach the job message\n" * 20)
        body = job_body(bad, epochs=1, **{"checkpoint.max_restarts": 2})
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        job = wait_for(c, job_id, finished, 300, "the job to fail")
        assert job["state"] == "FAILED" and job["attempts"] == 1, job
        assert "not retried" in job["message"] and "train.parquet" in job["message"], job["message"]
        assert "data.train" in job["message"] and "its bytes" not in job["message"], job["message"]
        time.sleep(2)
        assert c.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1


def _cli(service: Service, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**service.env, "TRAINCTL_URL": service.url, "TRAINCTL_TOKEN": service.token}
    return subprocess.run([TRAINCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_cli_submit_watch_best(service: Service, cifar_parquet: Path, tmp_path: Path) -> None:
    bad = _cli(service, "submit", "--preset", "debug", "--set", "optim.lr=-1")
    assert bad.returncode == 8 and "optim.lr" in bad.stderr  # invalid request
    sub = _cli(
        service,
        "submit",
        "--preset",
        "debug",
        "--set",
        f"data.train={cifar_parquet}",
        "--set",
        "optim.epochs=1",
        "--set",
        "scaling.num_workers=1",
        "--set",
        'exports=["safetensors", "pt2"]',
        "-q",
    )
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
    assert missing.returncode == 6 and "not_found" in missing.stderr  # not found
    # `best` without -o writes the server's name for it here; `checkpoints` lists what is kept
    default = _cli(service, "best", job_id, cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / f"{job_id}-epoch1.pt").read_bytes() == out.read_bytes()
    cps = _cli(service, "checkpoints", job_id)
    assert cps.returncode == 0 and cps.stdout.splitlines()[1].split()[0] == "1", cps.stdout
    # a reader that leaves early is no error: no BrokenPipe traceback
    piped = subprocess.run(
        f"{TRAINCTL} list --json | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env={**service.env, "TRAINCTL_URL": service.url, "TRAINCTL_TOKEN": service.token},
        timeout=60,
    )
    assert piped.stdout.strip() == "{" and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_section_overrides_merge_and_ids_with_a_leading_dash(
    service: Service, cifar_parquet: Path, tmp_path: Path
) -> None:
    import sqlite3

    # natural YAML: `optim: {lr: 0.1}` changes lr and keeps the debug preset's epochs, batch and data size
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        f"preset: debug\noverrides:\n  optim: {{lr: 0.1}}\n  data: {{train: {cifar_parquet}}}\n"
        "  checkpoint: {max_restarts: 0}\n"
    )
    sub = _cli(service, "submit", str(spec_file), "--json")
    assert sub.returncode == 0, sub.stderr
    job = json.loads(sub.stdout)
    assert job["spec"]["optim"] == {**job["spec"]["optim"], "lr": 0.1, "epochs": 2, "batch_size": 64}
    assert job["spec"]["data"]["max_train_images"] == 512 and job["spec"]["data"]["train"] == str(cifar_parquet)
    assert job["spec"]["checkpoint"]["keep_best"] == 2  # the section's other fields keep their defaults
    assert _cli(service, "cancel", job["id"]).returncode == 0
    # A job made before ids stopped starting with '-': every command still takes it.
    dashed = "-" + job["id"][1:]
    with sqlite3.connect(service.data_dir / "trainctl.db") as db:
        db.execute("UPDATE jobs SET id = ? WHERE id = ?", (dashed, job["id"]))
    for args in (("status", dashed), ("status", dashed, "--json"), ("watch", dashed, "--interval", "0.2")):
        done = _cli(service, *args)
        assert done.returncode == (3 if args[0] == "watch" else 0), (args, done.stdout, done.stderr)  # CANCELLED
        assert dashed in done.stdout or "CANCELLED" in done.stdout, done.stdout


def test_a_job_waiting_for_cpus_is_not_shown_running(service: Service, cifar_parquet: Path) -> None:
    """Its workers need more CPUs than the cluster has free: the driver runs, the job stays STARTING and says
    what it waits for, with no ETA (the session head has 6 logical CPUs; 2 workers x 4 CPUs never fit)."""
    body = job_body(cifar_parquet, epochs=1, **{"scaling.cpus_per_worker": 4})
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        job = wait_for(
            c,
            job_id,
            lambda j: (j["message"] or "").startswith("waiting for resources") or finished(j),
            300,
            "the job to say it waits for resources",
        )
        assert job["state"] == "STARTING" and job["progress"]["eta_seconds"] is None, job
        assert "needs 8 CPU" in job["message"] and "free" in job["message"], job["message"]
        status = _cli(service, "status", job_id)
        assert "STARTING" in status.stdout and "waiting for resources: needs 8 CPU" in status.stdout
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "STARTING"
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "CANCELLED"


def test_an_image_folder_fails_with_one_line_naming_the_formats(service: Service, tmp_path: Path) -> None:
    import numpy as np
    import torch
    from torchvision.io import encode_png

    folder = tmp_path / "pngs"
    (folder / "cat").mkdir(parents=True)
    for i in range(2):
        img = torch.from_numpy(np.full((3, 32, 32), 40 * i, dtype=np.uint8))
        (folder / "cat" / f"{i}.png").write_bytes(bytes(encode_png(img).numpy()))
    with service.client() as c:
        job_id = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"data.train": str(folder)}}).json()["id"]
        job = wait_for(c, job_id, finished, 300, "the job to fail")
    assert job["state"] == "FAILED" and job["attempts"] == 1, job
    message = job["message"]
    assert "\n" not in message and len(message) <= 600 and "Traceback" not in message, message
    assert message.startswith("DataError: ") and "PNG/JPEG" in message and "convert-images" in message
    listing = _cli(service, "list")
    row = next(ln for ln in listing.stdout.splitlines() if ln.startswith(job_id))
    assert "DataError: " in row and "not retried" not in row  # the reason, not the boilerplate


def test_restart_api_mid_job(ray_head: RayHead, cifar_parquet: Path, tmp_path: Path) -> None:
    # This service names the cluster by its GCS address (the module's by its dashboard URL): both work.
    svc = start_service(ray_head, tmp_path / "data", TRAINCTL_RAY_ADDRESS=ray_head.address)
    try:
        with svc.client() as c:
            job_id = c.post("/v1/jobs", json=job_body(cifar_parquet, epochs=2, **ONE_WORKER)).json()["id"]
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
        # epochs of a few seconds, so the kill lands mid-run
        body = job_body(cifar_parquet, epochs=3, **{"data.max_train_images": 2048}, **ONE_WORKER)
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
        print(
            f"driver kill → resumed epoch {resumed[0]['epoch']} started after "
            f"{resumed[0]['time'] - resumed[0]['epoch_seconds'] - killed_at:.1f} s"
        )


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    left = subprocess.run(["ps", "-o", "pid,stat", "-g", str(pgid)], capture_output=True, text=True)
    return any(ln.split()[1][0] != "Z" for ln in left.stdout.splitlines()[1:])


def test_serve_restarts_never_cost_training(cifar_parquet: Path, tmp_path: Path) -> None:
    """Without a Ray address `trainctl serve` starts a local head (token auth, its token in the data dir)
    that outlives it. SIGTERM to serve mid-run returns within 10 s and the run goes on; the next serve
    re-attaches. `trainctl down` stops serve and the head (only that one); the next serve starts a new head
    and resubmits the job, which resumes — with checkpoint.max_restarts 0, because a restart the service or
    cluster caused is not the job's. The log of the attempt the old head ran is still served."""
    from service.server.localray import read_head_record
    from tests.ports import stable_port

    port = stable_port()  # serve restarts on it three times (tests/ports.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        {
            "TRAINCTL_RECONCILE_INTERVAL_S": "0.5",
            "PYTHONUNBUFFERED": "1",
            "TRAINCTL_DATA_ROOTS": test_data_roots(),
            # One step below normal: checks the head is niced without starving its job behind the suite's
            # other tests, which keep every core busy at nice 0 (the default, 10, timed this test out there).
            "TRAINCTL_RAY_NICE": "1",
            # Paced (contract.STEP_PAUSE_ENV): the job must outlive three restarts, on little CPU.
            STEP_PAUSE_ENV: "0.3",
        }
    )
    data = tmp_path / "data"
    svc = Service(f"http://127.0.0.1:{port}", data, env, port, args=("--ray-num-cpus", "4"))
    watcher: subprocess.Popen[str] | None = None
    t_start = time.monotonic()
    svc.start()
    try:
        head = read_head_record(data)
        assert head is not None and _group_alive(head.pid)
        # The head, and so every job it runs, trains below the API's CPU priority (TRAINCTL_RAY_NICE): its
        # processes' nice value and its session's autogroup, where the kernel schedules sessions as groups.
        assert niceness(head.pid) == 1
        if autogroup_scheduling():
            autogroup = Path(f"/proc/{head.pid}/autogroup").read_text()
            assert autogroup.strip().endswith("nice 1"), autogroup
        text = svc.log()
        # serve says where the admin token is, never the token (its output ends up in service logs)
        assert "admin token is in" in text and svc.token not in text
        ray_token = (data / "ray-auth-token").read_text().strip()
        assert httpx.get(head.dashboard_url + "/api/jobs/", timeout=10).status_code == 401  # token auth is on ...
        ok = httpx.get(head.dashboard_url + "/api/jobs/", headers={"Authorization": f"Bearer {ray_token}"}, timeout=10)
        assert ok.status_code == 200  # ... with the token serve generated, which it also uses
        # the CLI run with the same data dir finds this serve's port (not :8000)
        listed = subprocess.run(
            [TRAINCTL, "list", "--data-dir", str(data)], capture_output=True, text=True, env=env, timeout=60
        )
        assert listed.returncode == 0 and listed.stdout.startswith("ID"), listed.stderr

        # One worker (one thread) and 20 epochs of 8 paced steps (~3 s each): an unpaced job of 2,048 images an
        # epoch took a loaded machine's CPU from the single-threaded serve and `trainctl down` starting up,
        # and could finish before `down` landed.
        body = job_body(
            cifar_parquet,
            epochs=20,
            **{"data.max_train_images": 512, "checkpoint.max_restarts": 0, "scaling.num_workers": 1},
        )
        with svc.client() as c:
            job_id = c.post("/v1/jobs", json=body).json()["id"]
            job = wait_for(c, job_id, lambda j: j["progress"]["epoch"] >= 1 or finished(j), 400, "the first epoch")
            assert job["state"] == "RUNNING", job
            print(f"epoch 1 done at {time.monotonic() - t_start:.0f} s")
        # A user follows the job with `trainctl watch` through every restart below: it rides them out and
        # ends with the job's own exit code (0), never the "lost contact" one.
        watcher = subprocess.Popen(
            [TRAINCTL, "watch", job_id, "--url", svc.url, "--token", svc.token, "--interval", "1", "--patience", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

        # 1. SIGTERM to serve: it is gone within 10 s, the head and the Ray job are not
        t0 = time.monotonic()
        os.killpg(svc.proc.pid, signal.SIGTERM)
        assert svc.proc.wait(timeout=60) == 0, svc.log()
        took = time.monotonic() - t0
        print(f"SIGTERM → serve exited in {took:.1f} s")
        assert took <= 10, svc.log()
        svc.proc = None
        assert _group_alive(head.pid)
        auth = {"Authorization": f"Bearer {ray_token}"}
        assert (
            httpx.get(f"{head.dashboard_url}/api/jobs/{job_id}-1", headers=auth, timeout=10).json()["status"]
            == "RUNNING"
        )
        svc.start()
        assert "re-attached" in svc.log() and read_head_record(data) == head
        with svc.client() as c:
            before = c.get(f"/v1/jobs/{job_id}").json()["progress"]["epoch"]
            job = wait_for(
                c,
                job_id,
                lambda j: j["progress"]["epoch"] > before or finished(j),
                300,
                "an epoch under the re-attached serve",
            )
            assert job["state"] == "RUNNING" and job["attempts"] == 1, job
            print(f"epoch {job['progress']['epoch']} under the re-attached serve at {time.monotonic() - t_start:.0f} s")

        # 2. `trainctl down` mid-run: serve and this head stop (the job's attempt dies with the head)
        with svc.client() as c:
            at_down = c.get(f"/v1/jobs/{job_id}").json()["progress"]["epoch"]
        down = svc.down()
        print(down.stdout, flush=True)
        assert down.returncode == 0 and "stopped the local Ray head" in down.stdout, (down.stdout, down.stderr)
        assert "stopped 1 unfinished Ray job(s)" in down.stdout, down.stdout
        assert "the head shut down in" in down.stdout, down.stdout  # by Ray's own shutdown, nothing killed
        deadline = time.monotonic() + 30
        while _group_alive(head.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(head.pid) and read_head_record(data) is None
        assert not (data / "serve.json").exists()
        # `down` stopped the attempt through the Jobs API before the head: it trains no further epoch now
        # (killed with the head alone, it went on for several, into the directory attempt 2 resumes from)
        (metrics_file,) = data.rglob(f"{job_id}/metrics.jsonl")
        done_at_down = len(metrics_file.read_text().splitlines())
        # Rank 0 writes an epoch's metrics line before its checkpoint: `down` can land between the two.
        manifest = parse_manifest((metrics_file.parent / MANIFEST).read_text())
        saved_at_down = (manifest.latest_epoch if manifest else None) or 0
        time.sleep(6)
        assert len(metrics_file.read_text().splitlines()) == done_at_down

        # 3. serve again: a new head; the job is resubmitted without using its restart budget (0) and resumes.
        # Unpaced now: nothing restarts any more, so the epochs left are only waited for.
        svc.env.pop(STEP_PAUSE_ENV)
        svc.start()
        print(f"new head and serve at {time.monotonic() - t_start:.0f} s")
        assert read_head_record(data).pid != head.pid
        with svc.client() as c:
            job = wait_for(c, job_id, finished, 600, "the job to finish on the new head")
            assert job["state"] == "SUCCEEDED", (job, c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}).text)
            assert job["attempts"] == 2 and job["attempt_log"][1]["charged"] is False, job["attempt_log"]
            metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
            assert [m["epoch"] for m in metrics] == list(range(1, 21))  # contiguous, each epoch once
            resumed = [m["epoch"] for m in metrics if m["resumed"]]
            # attempt 2 resumed after attempt 1's last checkpoint (none left to train if `down` came after it)
            assert len(resumed) <= 1 and all(e > at_down for e in resumed), (resumed, at_down)
            # ... and so at the epoch after the last one trained, unless `down` cut that epoch's checkpoint off
            # (then it is trained again; the manifest can lag Ray's own record of the checkpoint, never lead it)
            assert resumed == [done_at_down + 1] or (resumed == [done_at_down] and saved_at_down < done_at_down), (
                resumed,
                done_at_down,
                saved_at_down,
            )
            print(f"epochs done when `down` began: {at_down}, when it returned: {done_at_down}; resumed at: {resumed}")
            print(down.stdout)
            # the first attempt ran on a head that is gone: its log is still there, colour codes stripped
            first = c.get(f"/v1/jobs/{job_id}/logs", params={"attempt": 1})
            assert first.status_code == 200 and "Running entrypoint" in first.text and "\x1b[" not in first.text
            both = c.get(f"/v1/jobs/{job_id}/logs").text
            assert "=== attempt 1" in both and "=== attempt 2" in both
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, (out[-2000:], err[-2000:])
        assert "lost contact with the service" in err and "contact restored" in err and "SUCCEEDED" in out
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        svc.down()
        rec = read_head_record(data)
        if rec is not None:
            try:
                os.killpg(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
