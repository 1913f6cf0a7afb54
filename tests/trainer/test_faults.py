"""Storage and fault tolerance of a training run, through real Ray and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import objstore
from service.server.localray import LocalRayHead
from tests.plugins.ray_cluster import RayHead
from tests.plugins.reaper import reap_with_session
from tests.trainer.jobs import PACED, log_tail, make_job_dir, paced, read_jsonl, start_run, wait_for_checkpoint
from trainer.spec import resolve

pytestmark = pytest.mark.ray

# The CPUs of the module's S3 head: what the private `RAY_ADDRESS=local` Ray these runs used had (2 cores).
S3_RAY_CPUS = 2


@pytest.fixture(scope="module")
def s3_ray_head(s3_server) -> Iterator[RayHead]:
    """A Ray head of this module's own whose processes (workers included) inherit the S3 credentials from
    its environment. The session head cannot be used: credentials are never forwarded through a runtime env
    (trainer/run.py), and that head was started without them. One head for the module's S3 runs rather than a
    private `RAY_ADDRESS=local` Ray started (and stopped) by each of their drivers: 3 Ray start-ups fewer."""
    local = LocalRayHead.start(num_cpus=S3_RAY_CPUS, auth_mode="disabled", extra_env=s3_server.s3_env())
    reap_with_session(local.proc.pid)
    try:
        yield RayHead(local.gcs_address, local.dashboard_url, local.temp_dir)
    finally:
        local.stop(grace_s=5)  # a throwaway cluster, as the session's


def s3_ray_env(s3_ray_head: RayHead, s3_server) -> dict:
    """A driver on the module's S3 head, with the S3 credentials for its own reads and writes."""
    return {**s3_ray_head.env(), **s3_server.s3_env()}


def s3_job(uri: str, overrides: dict) -> str:
    # half a CPU per worker, as on a private Ray with only this machine's 2 cores (S3_RAY_CPUS)
    spec = resolve("debug", {"scaling.cpus_per_worker": 0.5, **overrides})
    objstore.write_text(objstore.join(uri, "spec.json"), spec.to_json())
    return uri


def s3_jsonl(uri: str) -> list[dict]:
    return [json.loads(x) for x in objstore.read_text(uri).splitlines() if x.strip()]


def test_job_on_s3_with_data_from_the_bucket(s3_ray_head, s3_server, s3_bucket_uri, cifar_parquet):
    data_uri = objstore.join(s3_bucket_uri, "datasets", "train.parquet")
    objstore.write_bytes(data_uri, cifar_parquet.read_bytes())
    job = s3_job(
        objstore.join(s3_bucket_uri, "jobs", "s3job"),
        {"data.train": data_uri, "optim.epochs": 2, "checkpoint.keep_best": 1},
    )
    env = s3_ray_env(s3_ray_head, s3_server)
    out = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--job-dir", job], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(objstore.read_text(objstore.join(job, "summary.json")))
    assert summary["state"] == "succeeded" and summary["best_checkpoint"].startswith("s3://")
    blob = objstore.read_bytes(summary["best_checkpoint"])
    assert hashlib.sha256(blob).hexdigest() == summary["best_checkpoint_sha256"]
    assert [m["epoch"] for m in s3_jsonl(objstore.join(job, "metrics.jsonl"))] == [1, 2]
    # credentials never land in what the job stored
    for name in ("spec.json", "summary.json", "manifest.json", "metrics.jsonl"):
        text = objstore.read_text(objstore.join(job, name))
        assert s3_server.secret_key not in text and s3_server.access_key not in text


def test_killed_worker_is_replaced_and_the_run_resumes(ray_head, cifar_parquet, tmp_path):
    from ray.util.state import list_actors

    job_dir = make_job_dir(tmp_path, "workerkill", {"data.train": str(cifar_parquet), "optim.epochs": 5, **PACED})
    proc = start_run(job_dir, paced(ray_head.env()))
    wait_for_checkpoint(proc, job_dir, epoch=1)
    workers = list_actors(
        address=ray_head.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    assert len(workers) == 2, workers
    killed_at = time.time()
    os.kill(workers[-1].pid, 9)  # one DDP rank dies mid-run
    assert proc.wait(timeout=300) == 0, log_tail(job_dir)
    metrics = read_jsonl(job_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    resumed = [m for m in metrics if m["resumed"]]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= 2, metrics
    recovery = resumed[0]["time"] - resumed[0]["epoch_seconds"] - killed_at
    print(f"worker kill → first resumed epoch started after {recovery:.1f} s")
    # The restarted group is attempt 2 (trainer/fence.py); each epoch's line is its owning attempt's.
    attempts = json.loads((job_dir / "attempts.json").read_text())["attempts"]
    assert [(a["attempt"], a["start_epoch"]) for a in attempts] == [(1, 1), (2, resumed[0]["epoch"])], attempts
    assert [m["attempt"] for m in metrics] == [1 if m["epoch"] < resumed[0]["epoch"] else 2 for m in metrics]
    assert json.loads((job_dir / "summary.json").read_text())["state"] == "succeeded"


@pytest.mark.timeout(900)
def test_storage_outage_fails_the_run_with_a_storage_error_then_recovers(
    s3_ray_head, s3_server, s3_bucket_uri, cifar_parquet
):
    env = {**s3_ray_env(s3_ray_head, s3_server), "TRAINCTL_STORAGE_RETRY_SECONDS": "4"}
    job = s3_job(
        objstore.join(s3_bucket_uri, "jobs", "outage"),
        {
            "data.train": str(cifar_parquet),
            "optim.epochs": 8,
            "data.max_train_images": 2048,
            "checkpoint.max_failures": 1,
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.run", "--job-dir", job],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = objstore.join(job, "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not objstore.exists(metrics):
        time.sleep(0.5)
    assert proc.poll() is None, "run ended before the outage"
    s3_server.stop()
    stopped = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=300)  # never a hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        s3_server.start()
    print(f"storage outage → run failed after {time.monotonic() - stopped:.1f} s")
    assert proc.returncode == 3, output[-4000:]
    # trainer.run's last own line is its JSON summary (a private Ray may flush deduplicated worker logs after it)
    summaries = [json.loads(ln) for ln in output.splitlines() if ln.startswith('{"state"')]
    assert summaries and summaries[-1]["state"] == "failed", output[-4000:]
    # storage is back: a new job on the same bucket succeeds
    again = s3_job(
        objstore.join(s3_bucket_uri, "jobs", "after-outage"), {"data.train": str(cifar_parquet), "optim.epochs": 1}
    )
    out = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--job-dir", again], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:]
