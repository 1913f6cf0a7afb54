"""Issue 10 end to end: a real `trainctl serve` on the session's real Ray head, real HTTP, real jobs.

A user with an ordinary token: a spec naming /etc/passwd is a 422; a planted pickle inside the data roots
fails the job as the user's error and never runs (its marker file is never created); a good job runs, and
neither the Ray job's recorded runtime env nor its entrypoint hold any secret the service's environment had;
a revoked token is a 401. Small CIFAR-10 python files in a tmp dir: no shared dataset needed.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import TRAINCTL, start_service, wait_for
from tests.trainer.cifar_files import write_cifar_python
from tests.trainer.jobs import ONE_WORKER

pytestmark = pytest.mark.ray

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAE2ESECRETKEY",
    "AWS_SECRET_ACCESS_KEY": "e2e-aws-secret-value",
    "AWS_SESSION_TOKEN": "e2e-aws-session-token",
    "TRAINCTL_TOKEN": "tc_e2e-exported-admin-token",
}


class _Plant:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_attacks_through_the_real_service(ray_head: RayHead, tmp_path: Path) -> None:
    roots = tmp_path / "datasets"
    good = write_cifar_python(roots / "cifar", per_batch=40)
    planted, marker = roots / "planted", tmp_path / "pwned"
    planted.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (planted / name).write_bytes(pickle.dumps({b"data": _Plant(marker), b"labels": [0]}))
    # the service's own environment holds secrets (as an operator's shell might); none may reach Ray
    svc = start_service(ray_head, tmp_path / "data", TRAINCTL_DATA_ROOTS=str(roots), **SECRETS)
    try:
        admin = svc.client()
        user = admin.post("/v1/tokens", json={"name": "mallory"}).json()["token"]
        with svc.client(user) as c:
            r = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"data.train": "/etc/passwd"}})
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "data.train", r.text
            assert "root:" not in r.text

            base = {
                "optim.epochs": 1,
                "data.max_train_images": 128,
                "checkpoint.max_restarts": 2,
                **ONE_WORKER,
            }
            bad = c.post("/v1/jobs", json={"preset": "debug", "overrides": {**base, "data.train": str(planted)}})
            assert bad.status_code == 201, bad.text
            job = wait_for(
                c,
                bad.json()["id"],
                lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                300,
                "the planted job to fail",
            )
            assert job["state"] == "FAILED" and job["attempts"] == 1, job
            assert "refused to load" in job["message"] and "data.train" in job["message"], job["message"]
            assert not marker.exists()

            ok = c.post("/v1/jobs", json={"preset": "debug", "overrides": {**base, "data.train": str(good)}})
            job = wait_for(
                c,
                ok.json()["id"],
                lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                300,
                "the good job to finish",
            )
            assert job["state"] == "SUCCEEDED", (job, c.get(f"/v1/jobs/{job['id']}/logs").text[-3000:])

        # what Ray recorded for the job: runtime env, entrypoint, metadata
        for submission in (f"{bad.json()['id']}-1", f"{ok.json()['id']}-1"):
            info = httpx.get(f"{ray_head.dashboard_url}/api/jobs/{submission}", timeout=10).json()
            recorded = json.dumps({k: info.get(k) for k in ("runtime_env", "entrypoint", "metadata")})
            assert "TRAINCTL_DATA_ROOTS" in recorded  # the allow-listed setting did go
            for value in [*SECRETS.values(), svc.token, user]:
                assert value not in recorded, (value, recorded)

        # the admin revokes the user's token: 401 at once, through the CLI
        env = {**svc.env, "TRAINCTL_URL": svc.url, "TRAINCTL_TOKEN": svc.token}
        out = subprocess.run(
            [TRAINCTL, "token", "revoke", "mallory"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        listed = subprocess.run([TRAINCTL, "token", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "mallory" not in listed.stdout and "admin" in listed.stdout
        assert httpx.get(svc.url + "/v1/jobs", headers={"Authorization": f"Bearer {user}"}).status_code == 401
        admin.close()
    finally:
        svc.stop()


def test_issue21_http_attacks_through_the_real_service(ray_head: RayHead, tmp_path: Path) -> None:
    """Issue 21 over real HTTP (no job runs): 40 parallel specs with 10^12 blocks are 422s in milliseconds while
    /healthz still answers; a YAML alias bomb on the dashboard's submit route and a megabyte-long bad value
    are short 422s; made-up methods and paths add no /metrics series; then, restarted with --no-auth, the
    service answers only Host headers that are exactly loopback."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.service.test_security import ALIAS_BOMB

    svc = start_service(ray_head, tmp_path / "data")
    try:
        admin = svc.client()
        user = admin.post("/v1/tokens", json={"name": "mallory"}).json()["token"]
        with svc.client(user) as c:
            hang = {"preset": "debug", "overrides": {"model.blocks": [1, 1, 1, 10**12]}}

            def submit(_: int) -> tuple[int, str, float]:
                started = time.perf_counter()
                r = c.post("/v1/jobs", json=hang)
                return r.status_code, r.text, time.perf_counter() - started

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(submit, range(40)))
                health = httpx.get(svc.url + "/healthz", timeout=10)
            assert health.status_code in (200, 503)
            assert all(code == 422 and '"model.blocks.3"' in text for code, text, _ in answers), answers[0]
            print(f"40 parallel 10^12-block specs: slowest answer {max(s for *_, s in answers):.3f} s")
            assert max(s for *_, s in answers) < 5.0  # (a loaded machine; each is milliseconds of work)

            r = c.post("/ui/api/submit", json={"preset": "debug", "overrides_yaml": ALIAS_BOMB})
            assert r.status_code == 422 and "anchors" in r.text and len(r.content) < 1000, r.text[:500]
            r = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"scaling.num_workers": "x" * 900_000}})
            assert r.status_code == 422 and len(r.content) < 2000 and "x" * 300 not in r.text
            assert c.get("/v1/jobs").json()["total"] == 0

        def series() -> int:
            text = admin.get("/metrics").text
            return sum(
                1 for line in text.splitlines() if line.startswith("trainctl_http_request_duration_seconds_count")
            )

        def made_up(i: int) -> None:
            httpx.request(f"MADEUP{i}", f"{svc.url}/v1/jobs/x{i}", timeout=10)
            httpx.get(f"{svc.url}/nothing/here/{i}", timeout=10)

        series()  # (the first scrape adds its own series)
        made_up(0)
        once = series()
        for i in range(1, 30):
            made_up(i)
        assert series() == once, admin.get("/metrics").text  # 29 more made-up methods and paths: no new series
        admin.close()

        svc.stop()
        svc.args = ("--no-auth",)
        svc.start()
        for host, ok in (
            (f"127.0.0.1:{svc.port}", True),
            (f"localhost:{svc.port}", True),
            (f"127.attacker.example:{svc.port}", False),
            (f"127.0.0.1.nip.io:{svc.port}", False),
        ):
            r = httpx.get(svc.url + "/v1/jobs", headers={"Host": host}, timeout=10)
            assert r.status_code == (200 if ok else 400), (host, r.text)
    finally:
        svc.stop()
