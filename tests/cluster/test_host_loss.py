"""A worker host crashes mid-run (every process of it killed at once) on the emulated on-prem cluster
(tests/cluster/onprem_cluster.py: `ray up` of cluster/onprem.yaml, a head and 3 worker hosts, 1 CPU each,
data and checkpoints in S3): the job, submitted through trainctl's API on the head with
`checkpoint.max_failures: 0` and `checkpoint.max_restarts: 0`, still SUCCEEDS: Ray marks the host dead and
Ray Train restarts the worker group from the last checkpoint on the hosts left (two worker hosts are kept
running: `min_workers: 2`, see the fixture for why not a spare started on demand) — an infrastructure loss,
charged to `checkpoint.max_infra_failures` (trainer/infra.py), never to the job's own budgets. Every epoch
is in metrics.jsonl exactly once, and the job's view says which host was lost, at which epoch, and from
which checkpoint it resumed.

Prints the recovery time (the crash → the next epoch reported) for docs/scaling.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.onprem_cluster import BUCKET, TERMINAL, OnPrem, onprem_cluster
from trainer import contract

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(900),  # above Ray's 300 s wait for a host that never joins
]

EPOCHS = 6
CRASH_AFTER_EPOCH = 2  # a checkpoint exists (checkpoint.every_epochs 1) and epochs remain


@pytest.fixture(scope="module")
def onprem(cifar_parquet: Path) -> Iterator[OnPrem]:
    # The spare worker host replaces the crashed one: Ray 2.60's local provider first hands the replacement
    # launch the crashed host's own address (the lowest terminated one); cluster/onprem.yaml's
    # RAY_AUTOSCALER_RECONCILE_REQUEST_STATUS_TIMEOUT_S re-requests that stuck launch after 30 s, on the spare.
    with onprem_cluster(cifar_parquet) as cluster:
        yield cluster


def _job_file(onprem: OnPrem, job_id: str, name: str) -> str:
    """A file of the job's directory, read straight from S3 (the API's metrics view folds repeated epochs)."""
    with onprem.s3.filesystem().open_input_stream(f"{BUCKET}/trainctl/jobs/{job_id}/{name}") as f:
        return bytes(f.read()).decode()


def _wait(c: httpx.Client, job_id: str, until: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return dict(job)
        if job["state"] in TERMINAL or time.monotonic() > deadline:
            log = c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 120}).text
            pytest.fail(f"{what}: job {job['state']} ({job.get('message')}), epoch {job['progress']}\n{log[-6000:]}")
        time.sleep(0.5)


def test_a_crashed_worker_host_is_replaced_and_the_job_succeeds_without_its_failure_budgets(onprem: OnPrem) -> None:
    started = time.monotonic()
    hosts = {h.address: h for h in onprem.hosts.hosts}
    head = onprem.hosts.hosts[0].address
    with onprem.client() as c:
        body = {
            "preset": "debug",
            "overrides": {
                "data.train": f"s3://{BUCKET}/datasets/train.parquet",
                "optim.epochs": EPOCHS,
                "checkpoint.max_failures": 0,
                "checkpoint.max_restarts": 0,
            },
        }
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = _wait(c, job_id, lambda j: j["progress"]["epoch"] >= CRASH_AFTER_EPOCH, 400, "no epoch before the crash")
        # DDP on 2 hosts; crash one that is not the head (the head holds the API, the driver and the GCS).
        addresses = [d.rsplit(" on ", 1)[1] for d in job["devices"]]
        victims = [a for a in addresses if a != head]
        assert len(set(addresses)) == 2 and victims, job["devices"]
        victim = victims[0]
        manifest = contract.parse_manifest(_job_file(onprem, job_id, contract.MANIFEST))
        assert manifest is not None and (manifest.latest_epoch or 0) >= 1, "no checkpoint before the crash"
        checkpoint_before = manifest.latest_epoch or 0
        crashed_at = time.time()
        hosts[victim].crash()
        assert not hosts[victim].pids(), "the crashed host still has processes"

        job = _wait(c, job_id, lambda j: j["state"] == "SUCCEEDED", 600, "the job did not survive the host crash")
        finished = time.monotonic() - started

    # Not charged to the job's own budgets: one attempt (max_restarts 0), one run (max_failures 0).
    assert job["attempts"] == 1, job["attempt_log"]
    # Every epoch exactly once in metrics.jsonl (the redone epochs' stale lines were dropped).
    lines = [json.loads(line) for line in _job_file(onprem, job_id, contract.METRICS).splitlines() if line.strip()]
    assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1)), [m["epoch"] for m in lines]
    # The resume came from the last checkpoint: the first epoch after it is marked, and carries the loss.
    resumed = [m for m in lines if m["infra_losses"]]
    assert len(resumed) == 1 and resumed[0]["resumed"], lines
    (loss,) = resumed[0]["infra_losses"]
    assert loss["host"] == victim, loss
    # From the newest checkpoint at the restart: the one the loss record saw in manifest.json, or the next when
    # it was in Ray's hands but not yet in the manifest (see test_spot_loss.py)
    assert checkpoint_before <= loss["checkpoint_epoch"] <= loss["resumed_from_epoch"] < loss["lost_at_epoch"], loss
    assert resumed[0]["epoch"] == loss["resumed_from_epoch"] + 1
    assert loss["lost_at_epoch"] > loss["checkpoint_epoch"], loss
    # A host the first run did not use replaces the crashed one.
    after = {d.rsplit(" on ", 1)[1] for d in resumed[0]["devices"]}
    assert victim not in after and after - set(addresses), (addresses, after)
    assert loss["replacement"] is True
    # The job's view says what happened.
    expected = (
        f"worker host {victim} lost at epoch {loss['lost_at_epoch']}; resumed from epoch "
        f"{loss['resumed_from_epoch']} on a replacement host"
    )
    assert job["infra_losses"] == [expected], job
    recovery = resumed[0]["time"] - crashed_at
    print(
        f"\nhost-loss figures: crashed {victim} after epoch {CRASH_AFTER_EPOCH} was reported; next epoch "
        f"(epoch {resumed[0]['epoch']}, resumed from {loss['resumed_from_epoch']}) reported {recovery:.1f} s after "
        f"the crash; epochs took {[round(m['epoch_seconds'], 1) for m in lines]} s; submit → SUCCEEDED "
        f"{finished:.1f} s; view: {job['infra_losses']}"
    )
