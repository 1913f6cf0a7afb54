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
from pathlib import Path

import httpx
import pytest

from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import TRAINCTL, start_service, wait_for
from tests.trainer.cifar_files import write_cifar_python

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

            base = {"optim.epochs": 1, "data.max_train_images": 128, "checkpoint.max_restarts": 2}
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
