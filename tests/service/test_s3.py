"""The service over real S3 storage (the session's SeaweedFS server) and a fake Ray: spec.json, progress,
checkpoint streaming, deletion and the storage health check all go through s3:// URIs."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest

import objstore
from tests.service.conftest import DEBUG_JOB, metrics_line

pytestmark = pytest.mark.s3


def test_service_on_s3(make_api, s3_bucket_uri: str, s3_server) -> None:
    api = make_api(storage=s3_bucket_uri)
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    job_dir = objstore.join(s3_bucket_uri, "jobs", job_id)
    assert json.loads(objstore.read_text(objstore.join(job_dir, "spec.json")))["optim"]["epochs"] == 2
    fake = api.ray.jobs[f"{job_id}-1"]
    assert shlex.split(fake.entrypoint)[-1] == job_dir
    assert "TRAINCTL_S3_ENDPOINT" in fake.env_vars
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(fake.env_vars)  # secrets stay put

    objstore.write_text(objstore.join(job_dir, "metrics.jsonl"), metrics_line(1, 0.2) + metrics_line(2, 0.4))
    payload = bytes(range(256)) * 12_000  # ~3 MB: several 1 MiB chunks
    ckpt = objstore.join(job_dir, job_id, "epoch_0002", "checkpoint.pt")
    objstore.write_bytes(ckpt, payload)
    sha = hashlib.sha256(payload).hexdigest()
    objstore.write_text(
        objstore.join(job_dir, "manifest.json"),
        json.dumps(
            {
                "checkpoints": [{"epoch": 2, "val_acc": 0.4, "uri": ckpt, "sha256": sha, "size": len(payload)}],
                "latest_epoch": 2,
            }
        ),
    )
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "RUNNING" and job["progress"]["epoch"] == 2 and job["best_val_acc"] == 0.4
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 200 and r.headers["x-checkpoint-sha256"] == sha and r.content == payload

    # a corrupted object in the bucket (same size, one byte flipped) is refused, never streamed
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0xFF
    objstore.write_bytes(ckpt, bytes(damaged))
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 502 and r.json()["error"]["code"] == "checkpoint_corrupt", r.text
    objstore.write_bytes(ckpt, payload)

    assert api.get("/healthz").json()["checks"]["storage"]["ok"]
    s3_server.stop()
    try:
        resp = api.get("/healthz")
        assert resp.status_code == 503 and resp.json()["down"] == ["storage"]
    finally:
        s3_server.start()

    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 204
    assert not objstore.exists(objstore.join(job_dir, "spec.json"))
    assert not objstore.exists(ckpt)
