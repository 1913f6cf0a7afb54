"""The embedded default on S3, end to end: `trainctl serve --storage s3://...` starting its own Ray head,
a real SeaweedFS, real HTTP. A job's checkpoint downloads with a verified sha256; a storage outage longer
than the retry budget fails the running job with a storage message (never a hang, never a false
SUCCEEDED); once storage is back, a new job succeeds."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import objstore
from tests.plugins.ray_cluster import free_port
from tests.service.conftest import Service, wait_for
from tests.trainer.jobs import ONE_WORKER
from trainer.contract import STEP_PAUSE_ENV

pytestmark = [pytest.mark.ray, pytest.mark.s3]

RETRY_BUDGET_S = "4"


def test_service_on_s3_survives_a_storage_outage(
    s3_server, s3_bucket_uri: str, cifar_parquet: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in s3_server.env().items() if not k.startswith(("TRAINCTL_", "RAY_ADDRESS", "RAY_AUTH"))}
    env.update(s3_server.s3_env())
    env.update(
        {
            "TRAINCTL_STORAGE": s3_bucket_uri,
            "TRAINCTL_STORAGE_RETRY_SECONDS": RETRY_BUDGET_S,
            "TRAINCTL_RECONCILE_INTERVAL_S": "0.5",
            "TRAINCTL_DATA_DIR": str(tmp_path / "data"),
            "TRAINCTL_DATA_ROOTS": str(cifar_parquet.parent),
            "PYTHONUNBUFFERED": "1",
            # Normal priority for the head serve starts: the suite keeps every core busy at nice 0, and a niced
            # job would wait behind the other workers' tests past this test's timeout.
            "TRAINCTL_RAY_NICE": "0",
            # Paced (contract.STEP_PAUSE_ENV): the long job is still running when storage goes, on little CPU.
            STEP_PAUSE_ENV: "0.25",
        }
    )
    # No Ray address: serve starts its own head, which inherits the S3 settings (the embedded default).
    svc = Service(f"http://127.0.0.1:{port}", tmp_path / "data", env, port)
    svc.start()
    try:
        with svc.client() as c:
            long_job = {
                "preset": "debug",
                "overrides": {
                    "data.train": str(cifar_parquet),
                    "optim.epochs": 10,
                    "data.max_train_images": 512,
                    **ONE_WORKER,
                },
            }
            job_id = c.post("/v1/jobs", json=long_job).json()["id"]
            wait_for(
                c,
                job_id,
                lambda j: j["progress"]["epoch"] >= 1 or j["state"] in ("SUCCEEDED", "FAILED"),
                300,
                "the first epoch on S3",
            )
            s3_server.stop()
            stopped = time.monotonic()
            try:
                job = wait_for(
                    c,
                    job_id,
                    lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                    300,
                    "the job to fail while storage is down",
                )
            finally:
                s3_server.start()
            print(f"storage outage → job FAILED after {time.monotonic() - stopped:.1f} s: {job['message']}")
            assert job["state"] == "FAILED", job
            assert "storage" in job["message"].lower() and job["attempts"] == 1, job

            # storage is back: a new job on the same bucket succeeds, its checkpoint verified end to end
            short = {
                "preset": "debug",
                "overrides": {"data.train": str(cifar_parquet), "optim.epochs": 2, **ONE_WORKER},
            }
            job_id = c.post("/v1/jobs", json=short).json()["id"]
            job = wait_for(
                c, job_id, lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300, "the job after the outage"
            )
            assert job["state"] == "SUCCEEDED", (job, c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 40}).text)
            r = c.get(f"/v1/jobs/{job_id}/checkpoints/best")
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == r.headers["x-checkpoint-sha256"]
            job_dir = objstore.join(s3_bucket_uri, "jobs", job_id)
            assert objstore.exists(objstore.join(job_dir, "summary.json"))
            assert not os.path.exists(tmp_path / "data" / "storage")  # nothing went to the local default
    finally:
        svc.down()  # serve and the Ray head it started (which outlives serve by design)
