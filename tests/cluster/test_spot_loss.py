"""A lost spot node on Ray's fake multi-node provider (tests/cluster/fakecluster.py, cluster/gpu.yaml's node
types): a real training run (`python -m trainer.run`, through the head's Jobs API with the service's driver
resource) whose 2 workers need `gpu.1xa10g.spot` nodes, one per node; one of them is lost mid-run (`kill -9`
of its raylet, as a spot reclaim leaves it). Ray declares the node dead, Ray Train restarts the group from
the last checkpoint on a new spot node the autoscaler adds, and the run SUCCEEDS with
`checkpoint.max_failures: 0`: the loss is charged to `checkpoint.max_infra_failures` (trainer/infra.py), and
the resumed epoch says which node was lost and where the run resumed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster.checks import REPO
from tests.cluster.fakecluster import FakeCluster, job_status, type_marker, wait_until
from trainer import contract
from trainer.spec import resolve

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.ray,
    pytest.mark.timeout(600),
]

SPOT = "gpu.1xa10g.spot"
EPOCHS = 8
TRAIN_ROWS = 400  # the debug preset trains on 300 of them (val_fraction 0.25)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    gpu = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    cluster = FakeCluster.start(gpu, tmp_path_factory.mktemp("fake"), idle_timeout_minutes=0.5)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), "every process of the fake cluster must be gone"


def _metrics(job_dir: Path) -> list[dict[str, Any]]:
    path = job_dir / contract.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (a fake node's raylet starts its workers), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    for child in children.get(pid, []):
        out += _descendants(child) + [child]
    return out


def _raylet_of(node_id: str) -> int:
    """The pid of the fake node's raylet (its command line names the node id)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "raylet" in cmd.split("\0")[0] and node_id in cmd:
                return int(entry.name)
    raise AssertionError(f"no raylet for node {node_id}")


def test_a_lost_spot_node_resumes_without_charging_the_failure_budgets(
    fake_cluster: FakeCluster, cifar_parquet: Path, tmp_path: Path
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    data = tmp_path / "train.parquet"
    buf = io.BytesIO()
    pq.write_table(pq.read_table(cifar_parquet).slice(0, TRAIN_ROWS), buf)
    data.write_bytes(buf.getvalue())
    spec = resolve(
        "debug",
        {
            "data.train": str(data),
            "data.max_train_images": 300,
            "optim.epochs": EPOCHS,
            "checkpoint.max_failures": 0,
            "checkpoint.max_restarts": 0,
            # one worker per spot node: the node type's own resource, which only its nodes advertise
            "scaling.num_workers": 2,
            "scaling.workers_per_node": 1,
            "scaling.use_gpu": False,
            "scaling.cpus_per_worker": 1,
            "scaling.resources_per_worker": {type_marker(SPOT): 1},
        },
    )
    job_dir = tmp_path / "jobs" / "spot-loss"
    job_dir.mkdir(parents=True)
    (job_dir / contract.SPEC).write_text(spec.model_dump_json())

    client = JobSubmissionClient(fake_cluster.head.dashboard_url)
    started = time.monotonic()
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m trainer.run --job-dir {job_dir}",
        entrypoint_num_cpus=0,
        entrypoint_resources={"trainctl_driver": 1},
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}},
    )

    def status() -> JobStatus:
        return job_status(client, job)

    def failed_early() -> str:
        return f"{status()}: {client.get_job_logs(job)[-4000:]}"

    # After epoch 2 (checkpointed): lose the node of the rank that is not rank 0.
    wait_until(lambda: len(_metrics(job_dir)) >= 2 or status().is_terminal(), 300, "epoch 2")
    before = _metrics(job_dir)
    assert len(before) >= 2, failed_early()
    lost = before[-1]["node_ids"][1]
    assert lost != before[-1]["node_ids"][0], before[-1]["node_ids"]
    lost_at = time.time()
    # A reclaimed spot node takes every process on it at once: its raylet and the workers it started.
    raylet = _raylet_of(lost)
    for pid in [*_descendants(raylet), raylet]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    wait_until(lambda: status().is_terminal(), 420, "the run to end after the lost node")
    total = time.monotonic() - started
    logs = client.get_job_logs(job)
    assert status() == JobStatus.SUCCEEDED, logs[-5000:]
    summary = contract.parse_summary((job_dir / contract.SUMMARY).read_text())
    assert summary is not None and summary.succeeded(), summary

    lines = _metrics(job_dir)
    assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1))
    resumed = [m for m in lines if m["infra_losses"]]
    assert len(resumed) == 1 and resumed[0]["resumed"], lines
    (loss,) = resumed[0]["infra_losses"]
    # The node id when Ray's node-death verdict came first; None when the surviving rank's "peer vanished"
    # error decided it (trainer/infra.py: after its settle, knowing only the peer's address, 127.0.0.1 here).
    assert loss["node_id"] in (lost, None) and loss["host"], loss
    # Resumed from the newest checkpoint at the restart: the one the loss record saw in manifest.json, or the
    # next, when the lost epoch's checkpoint was already in Ray's hands but not yet in the manifest (rank 0
    # writes metrics.jsonl, then the checkpoint, then the manifest: a loss recorded in between sees one less).
    assert 1 <= loss["checkpoint_epoch"] <= loss["resumed_from_epoch"] < loss["lost_at_epoch"], loss
    assert resumed[0]["epoch"] == loss["resumed_from_epoch"] + 1
    assert lost not in resumed[0]["node_ids"] and loss["replacement"] is True, (resumed[0]["node_ids"], loss)
    assert "infrastructure loss 1 of checkpoint.max_infra_failures" in logs
    print(
        f"\nspot loss: node {lost[-8:]} lost after epoch {len(before)}; epoch {resumed[0]['epoch']} (resumed from "
        f"{loss['resumed_from_epoch']}) reported {resumed[0]['time'] - lost_at:.1f} s after the kill; run "
        f"{total:.1f} s; {contract.InfraLoss.model_validate(loss).describe()}"
    )
