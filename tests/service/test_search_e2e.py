"""A Ray Tune search through the real service: trials API, search progress, CLI table, cancel stops every
trial. (The full search to SUCCEEDED and its best checkpoint are covered in tests/trainer/test_tune.py;
the service reads the same summary.json and manifest.json for searches as for single runs.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from ray.util.state import list_actors

from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import TRAINCTL, Service, wait_for

pytestmark = pytest.mark.ray

# Actors a search runs: the Tune trial (function trainable), its Ray Train controller and DDP workers.
SEARCH_ACTORS = ("ImplicitFunc", "TrainController", "RayTrainWorker")


def alive_search_actors(head: RayHead) -> list[str]:
    actors = list_actors(
        address=head.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
    )
    return [a.class_name for a in actors if a.class_name in SEARCH_ACTORS]


def test_search_trials_progress_and_cancel(service: Service, ray_head: RayHead, cifar_parquet: Path) -> None:
    body = {
        "preset": "debug",
        "overrides": {
            "data.train": str(cifar_parquet),
            "optim.epochs": 3,
            "data.max_train_images": 1024,
            "search": {
                "space": {"optim.lr": {"loguniform": [0.01, 0.2]}},
                "num_samples": 6,
                "scheduler": {"kind": "none"},
            },
        },
    }
    with service.client() as c:
        bad = c.post(
            "/v1/jobs",
            json={
                "preset": "debug",
                "overrides": {"search": {"space": {"optim.learning_rate": {"uniform": [0.0, 1.0]}}}},
            },
        )
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == "search.space.optim.learning_rate"

        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = wait_for(
            c,
            job_id,
            lambda j: (j.get("search") or {}).get("trials_finished", 0) >= 1 and j["search"]["trials_running"] >= 1,
            400,
            "one trial done and the next running",
        )
        search = job["search"]
        assert search["trials_total"] == 6 and search["metric"] == "val_acc"
        assert search["best_trial"] is not None and 0 <= search["best_metric"] <= 1

        trials = c.get(f"/v1/jobs/{job_id}/trials").json()
        assert trials["metric"] == "val_acc" and len(trials["trials"]) >= 2
        done = [t for t in trials["trials"] if t["state"] == "succeeded"]
        assert done and done[0]["epochs"] == 3 and 0.01 <= done[0]["config"]["optim.lr"] <= 0.2

        table = subprocess.run(
            [TRAINCTL, "trials", job_id, "--url", service.url, "--token", service.token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0 and done[0]["trial_id"] in table.stdout and "optim.lr=" in table.stdout

        assert alive_search_actors(ray_head), "a trial should be running before the cancel"
        cancelled_at = time.monotonic()
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "CANCELLED"
        deadline = time.monotonic() + 60
        while alive_search_actors(ray_head) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive_search_actors(ray_head) == [], "cancelling a search must stop every trial"
        print(f"search cancel → no trial actor alive after {time.monotonic() - cancelled_at:.1f} s")
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "CANCELLED" and job["search"]["trials_running"] == 0, job["search"]
        states = [t["state"] for t in c.get(f"/v1/jobs/{job_id}/trials").json()["trials"]]
        assert "running" not in states and "pending" not in states and "cancelled" in states, states
        assert job["search"]["best_config"] and 0.01 <= job["search"]["best_config"]["optim.lr"] <= 0.2
        status = subprocess.run(
            [TRAINCTL, "status", job_id, "--url", service.url, "--token", service.token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"trial {job['search']['best_trial']}" in status.stdout and "optim.lr=" in status.stdout

        single = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"data.train": str(cifar_parquet)}})
        single_id = single.json()["id"]
        assert c.get(f"/v1/jobs/{single_id}/trials").status_code == 409
        c.post(f"/v1/jobs/{single_id}/cancel")
