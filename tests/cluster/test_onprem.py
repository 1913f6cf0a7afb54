"""cluster/onprem.yaml for real: Ray's cluster launcher (`ray up`, local provider, SSH) onto emulated hosts
(tests/hosts.py: network namespaces on a bridge, each with its own PID/mount namespace, sshd as init, a
private /tmp, /dev/shm and HOME, one logical CPU), S3 (SeaweedFS) on the bridge address, and trainctl's own
API on the head, reached through an SSH tunnel as a user would.

One cluster per module: a head and 3 worker hosts (one spare). Only the host addresses, the SSH user and key,
the hosts' size, the install path and the idle timeout are substituted into the file; the S3 endpoint and
keys reach the hosts in ~/.trainctl/cluster.env through its file_mounts, as on real machines.

Needs root (namespaces): skipped with the reason elsewhere, failed under CI=true.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.onprem_cluster import BUCKET, DOWN_SCRIPT, TERMINAL, OnPrem, check, onprem_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]  # above Ray's 300 s wait for a host that never joins


@pytest.fixture(scope="module")
def onprem(cifar_parquet: Path) -> Iterator[OnPrem]:
    with onprem_cluster(cifar_parquet) as cluster:
        yield cluster


def _job_log(c: httpx.Client, job_id: str) -> str:
    return c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 80}).text


def test_ray_up_scales_out_trains_across_hosts_and_tears_down(onprem: OnPrem) -> None:
    head = onprem.hosts.hosts[0].address
    assert onprem.alive_worker_hosts() == [], "min_workers 0: no worker host runs Ray before a job needs it"
    with onprem.client() as c:
        listed = c.get("/v1/jobs")
        assert listed.status_code == 200, listed.text[:500]
        body = {
            "preset": "debug",
            "overrides": {"data.train": f"s3://{BUCKET}/datasets/train.parquet", "optim.epochs": 2},
        }
        submitted = time.monotonic()
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        # 2 ranks of 1 CPU; the head has 1: the job waits for a worker host, and says so.
        job = c.get(f"/v1/jobs/{job_id}").json()
        seen = [(job["state"], job.get("message"))]
        deadline = time.monotonic() + 120
        while "waiting for resources" not in (job.get("message") or "") and time.monotonic() < deadline:
            if job["state"] in TERMINAL or job["state"] == "RUNNING":
                break
            time.sleep(0.3)
            job = c.get(f"/v1/jobs/{job_id}").json()
            if seen[-1] != (job["state"], job.get("message")):
                seen.append((job["state"], job.get("message")))
        assert job["state"] == "STARTING" and "waiting for resources: needs" in job["message"], (
            seen,
            onprem.ray_processes(),
            _job_log(c, job_id)[-3000:],
        )
        assert "CPU" in job["message"], job
        waiting_message = job["message"]
        # The autoscaler starts Ray on a worker host over SSH.
        added = None
        while time.monotonic() - submitted < 300:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if added is None and onprem.alive_worker_hosts():
                added = time.monotonic() - submitted
            if job["state"] == "RUNNING" or job["state"] in TERMINAL:
                break
            time.sleep(0.5)
        running_after = time.monotonic() - submitted
        while job["state"] not in TERMINAL and time.monotonic() - submitted < 600:
            time.sleep(1)
            job = c.get(f"/v1/jobs/{job_id}").json()
        finished = time.monotonic() - submitted
        if job["state"] != "SUCCEEDED":
            pytest.fail(f"job ended {job['state']}: {job.get('message')}\n{_job_log(c, job_id)}")
        # DDP ran on 2 distinct hosts, each rank's address in its device.
        devices = job["devices"]
        addresses = {d.rsplit(" on ", 1)[1] for d in devices}
        assert len(devices) == 2 and len(addresses) == 2, devices
        assert addresses <= {h.address for h in onprem.hosts.hosts}, devices
        # The best checkpoint, downloaded through the API and verified against its recorded sha256.
        best = c.get(f"/v1/jobs/{job_id}/checkpoints/best")
        assert best.status_code == 200, best.text[:500]
        assert hashlib.sha256(best.content).hexdigest() == best.headers["x-checkpoint-sha256"]
    # The idle worker host is removed after idle_timeout_minutes: the autoscaler terminates it in the local
    # provider's cluster state on the head. (Ray 2.60's local provider only marks it: its Ray processes stay
    # until onprem-down.sh, or until the autoscaler starts Ray there again for the next job.)
    worker_addresses = addresses - {head}
    idle_start = time.monotonic()
    while time.monotonic() - idle_start < 240:
        state = onprem.provider_state()
        if all(state.get(a, {}).get("state") == "terminated" for a in worker_addresses):
            break
        time.sleep(2)
    removed_after = time.monotonic() - idle_start
    assert all(state.get(a, {}).get("state") == "terminated" for a in worker_addresses), state
    print(f"\nRay processes left on the idle-terminated host(s): {onprem.ray_processes()}")
    print(
        f"\nonprem figures: ray up {onprem.timings['ray_up_s']:.1f} s; waiting message {waiting_message!r}; "
        f"worker host Ray up {added if added is None else round(added, 1)} s after submit; RUNNING after "
        f"{running_after:.1f} s; SUCCEEDED after {finished:.1f} s; idle worker gone {removed_after:.1f} s after "
        f"the job; head {head}, devices {devices}"
    )


def test_documented_teardown_leaves_nothing_on_any_host(onprem: OnPrem) -> None:
    """`sh cluster/onprem-down.sh` (docs/scaling.md): no Ray, trainctl or storage process left on any host.
    Runs last in this module: it takes the cluster down."""
    onprem.tunnel.kill()
    check(onprem.launcher("sh", str(DOWN_SCRIPT), str(onprem.config_path), timeout=180), "onprem-down.sh")
    deadline = time.monotonic() + 30
    while any(onprem.ray_processes().values()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(onprem.ray_processes().values()), onprem.ray_processes()
