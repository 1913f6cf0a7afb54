"""Multi-node on one machine (issue 6): a Ray head plus 2 worker nodes (`ray.cluster_utils.Cluster`), S3
storage (the session's SeaweedFS), a real `trainctl serve` talking to the head's Jobs API.

- The head advertises `trainctl_driver` and no `trainslot`; each worker node has 2 CPUs and one `trainslot`.
  Jobs ask for `scaling.resources_per_worker={"trainslot": 1}`, so the 2 DDP ranks land on different worker
  nodes, and the service pins every driver to the head (`TRAINCTL_ENTRYPOINT_RESOURCES`), so losing a worker
  node is a worker failure, never a driver failure.
- Run 1: a debug job → SUCCEEDED, its metrics name two distinct worker nodes.
- Run 2: a longer job; once a checkpoint is in the manifest, one worker node is killed (no graceful
  shutdown) and a replacement added → Ray Train restarts the worker group from the latest checkpoint, inside
  the same driver, and the job SUCCEEDS with every epoch once and a resumed epoch after the loss.

The cluster, the service and the environment changes are this module's own and are undone at the end: no
RAY_ADDRESS is left pointing at this cluster, and Ray's "current cluster" file is put back as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.plugins.ray_cluster import RayHead, free_port
from tests.plugins.s3 import S3Server
from tests.service.conftest import Service, start_service, wait_for

pytestmark = pytest.mark.ray

DRIVER_RESOURCE = "trainctl_driver"
SLOT = "trainslot"
HEAD_CPUS = 2
WORKER_CPUS = 2
STEP_PAUSE_S = 0.2  # after each optimizer step, on every rank of every job of this module's service
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class MultiNode:
    cluster: Any  # ray.cluster_utils.Cluster
    head: RayHead
    service: Service
    storage: str  # s3://bucket/prefix
    s3: S3Server
    temp_dir: str

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def worker_nodes(self) -> dict[str, Any]:
        return {n.node_id: n for n in self.cluster.worker_nodes}

    def add_worker(self) -> Any:
        return self.cluster.add_node(
            num_cpus=WORKER_CPUS, resources={SLOT: 1}, node_ip_address="127.0.0.1", temp_dir=self.temp_dir
        )

    def ray_job(self, submission_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.head.dashboard_url}/api/jobs/{submission_id}", timeout=10) as r:
            return json.loads(r.read())

    def raw_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """metrics.jsonl exactly as the trainer wrote it to S3 (the API de-duplicates epochs; this does not)."""
        path = self.storage.removeprefix("s3://") + f"/jobs/{job_id}/metrics.jsonl"
        with self.s3.filesystem().open_input_stream(path) as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def _wait_dashboard(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray dashboard at {url} did not answer in {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def multinode(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    from ray.cluster_utils import Cluster

    if not s3_server.running:
        s3_server.start()
    address_file = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")  # Cluster rewrites, then deletes it
    saved_address = address_file.read_text() if address_file.exists() else None
    temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: unix socket paths stay < 107 chars
    storage = f"s3://mn-{os.urandom(6).hex()}/trainctl"
    cluster = service = gcs_address = None
    with pytest.MonkeyPatch.context() as mp:
        # Every node process inherits this environment: token auth off (Ray 2.60 would pick one by itself),
        # no usage stats, and S3 credentials "configured on the cluster" as on a real one (the service
        # forwards only the endpoint and region).
        mp.setenv("RAY_AUTH_MODE", "disabled")
        # Keep every Ray process on 127.0.0.1. Before connecting, Ray turns a "127.0.0.1" GCS address into
        # this machine's outward IP (`ray start --node-ip-address=127.0.0.1` switches to that IP too), but a
        # Cluster node's GCS listens on 127.0.0.1 only, so the head's job agent, the job drivers and the
        # workers would never reach it (a submission hangs 5 min, then 504). With this flag Ray's
        # "node IP" is the loopback address.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)  # the session head's, if another module started it
        for key, value in s3_server.s3_env().items():
            mp.setenv(key, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            dash = free_port()
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": HEAD_CPUS,
                    "resources": {DRIVER_RESOURCE: 4},
                    "node_ip_address": "127.0.0.1",
                    "include_dashboard": True,
                    "dashboard_host": "127.0.0.1",
                    "dashboard_port": dash,
                    "dashboard_agent_listen_port": free_port(),
                    "temp_dir": temp_dir,
                },
            )
            gcs_address = cluster.address
            # A job's supervisor tells the driver which cluster to join by reading `ray_current_cluster` in
            # the node's temp dir; Cluster writes it only to /tmp/ray, and without it Ray falls back to
            # whatever GCS process `ps` shows first: another test session's cluster, on a shared machine.
            Path(temp_dir, "ray_current_cluster").write_text(gcs_address)
            head = RayHead(gcs_address, f"http://127.0.0.1:{dash}", temp_dir)
            mn = MultiNode(cluster, head, None, storage, s3_server, temp_dir)  # type: ignore[arg-type]
            mn.add_worker()
            mn.add_worker()
            cluster.wait_for_nodes(timeout=60)
            _wait_dashboard(head.dashboard_url)
            service = start_service(
                head,
                tmp_path_factory.mktemp("mn") / "data",
                TRAINCTL_STORAGE=storage,
                TRAINCTL_S3_ENDPOINT=s3_server.endpoint,
                TRAINCTL_MAX_CONCURRENT_JOBS="1",
                TRAINCTL_ENTRYPOINT_RESOURCES=json.dumps({DRIVER_RESOURCE: 1}),
                # Paced jobs (contract.STEP_PAUSE_ENV): the node-loss and elastic runs must still be running
                # when a node goes or comes, which a few paced steps per epoch do on little CPU.
                TRAINCTL_STEP_PAUSE_S=str(STEP_PAUSE_S),
            )
            mn.service = service
            yield mn
        finally:
            if service is not None:
                service.stop()
            if cluster is not None:
                cluster.shutdown()
            if saved_address is not None:
                address_file.parent.mkdir(parents=True, exist_ok=True)
                address_file.write_text(saved_address)
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert gcs_address is None or os.environ.get("RAY_ADDRESS") != gcs_address


def _job_body(parquet: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "preset": "debug",
        "overrides": {
            "data.train": str(parquet),
            "optim.epochs": 2,
            "scaling.num_workers": 2,
            "scaling.resources_per_worker": {SLOT: 1},
            **overrides,
        },
    }


def _explain(mn: MultiNode, c: httpx.Client, job_id: str) -> str:
    """What to print when a job did not do what it should: its driver log and the service's log."""
    service_log = "\n".join(line for line in mn.service.log().splitlines() if '"GET /' not in line)
    return (
        f"--- job log:\n{c.get(f'/v1/jobs/{job_id}/logs', params={'tail': 80}).text}\n"
        f"--- service log:\n{service_log[-3000:]}"
    )


def _expect_success(mn: MultiNode, c: httpx.Client, job: dict[str, Any]) -> None:
    if job["state"] != "SUCCEEDED":  # pytest.fail: the full logs, not a truncated assertion message
        pytest.fail(f"job {job['id']} ended {job['state']}: {job.get('message')}\n{_explain(mn, c, job['id'])}")


def test_debug_job_runs_on_two_worker_nodes(multinode: MultiNode, cifar_parquet: Path) -> None:
    mn = multinode
    with mn.service.client() as c:
        resp = c.post("/v1/jobs", json=_job_body(cifar_parquet))
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = wait_for(c, job_id, lambda j: j["state"] in TERMINAL, 420, "the debug job to end")
        _expect_success(mn, c, job)
        assert job["attempts"] == 1

        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        assert [m["epoch"] for m in metrics] == [1, 2]
        workers = set(mn.worker_nodes())
        for m in metrics:
            assert len(m["node_ids"]) == 2 and len(set(m["node_ids"])) == 2, m["node_ids"]
            assert set(m["node_ids"]) <= workers and mn.head_node_id not in m["node_ids"], (
                m["node_ids"],
                workers,
                mn.head_node_id,
            )
        # The driver ran on the head (pinned by TRAINCTL_ENTRYPOINT_RESOURCES), the ranks on the workers.
        assert mn.ray_job(f"{job_id}-1")["driver_node_id"] == mn.head_node_id
        print(f"\nrun 1: job {job_id} ranks on nodes {metrics[-1]['node_ids']}, driver on head {mn.head_node_id}")


def test_worker_node_loss_resumes_from_checkpoint(multinode: MultiNode, cifar_parquet: Path) -> None:
    mn = multinode
    epochs = 6
    with mn.service.client() as c:
        resp = c.post(
            # 8 steps an epoch, each followed by STEP_PAUSE_S: ~2 s epochs, as 2,048 unpaced images took
            "/v1/jobs",
            json=_job_body(cifar_parquet, **{"optim.epochs": epochs, "data.max_train_images": 512}),
        )
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]

        # Wait until at least one epoch is checkpointed (in the manifest: fully uploaded).
        deadline = time.monotonic() + 420
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] not in TERMINAL, (job, _explain(mn, c, job_id))
            cps = c.get(f"/v1/jobs/{job_id}/checkpoints").json().get("checkpoints") or []
            if cps:
                break
            assert time.monotonic() < deadline, f"no checkpoint in time: {job}"
            time.sleep(0.2)
        before = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        checkpointed = max(cp["epoch"] for cp in cps)
        assert before and before[-1]["epoch"] < epochs, "the job ended before a node could be removed"
        victim_id = before[-1]["node_ids"][0]  # rank 0's node: the one that writes checkpoints and metrics
        victim = mn.worker_nodes()[victim_id]

        removed_at = time.time()
        mn.cluster.remove_node(victim, allow_graceful=False)
        replacement = mn.add_worker()
        print(
            f"\nrun 2: removed node {victim_id} (rank 0) after epoch {before[-1]['epoch']} "
            f"(checkpointed: {checkpointed}); replacement {replacement.node_id}"
        )

        job = wait_for(c, job_id, lambda j: j["state"] in TERMINAL, 480, "the job to end after the node loss")
        _expect_success(mn, c, job)
        assert job["attempts"] == 1, job  # recovered inside the same driver: the driver was on the head

        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        raw = mn.raw_metrics(job_id)
        assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
        assert [m["epoch"] for m in raw] == list(range(1, epochs + 1))  # every epoch exactly once
        resumed = [m for m in raw if m["resumed"]]
        assert resumed, raw
        first = resumed[0]
        started = first["time"] - first["epoch_seconds"]
        assert started > removed_at, (first, removed_at)  # resumed after the loss ...
        assert first["epoch"] > 1 and first["epoch"] >= checkpointed + 1, first  # ... from a checkpoint
        assert victim_id not in first["node_ids"] and len(set(first["node_ids"])) == 2, first["node_ids"]
        assert replacement.node_id in first["node_ids"], (first["node_ids"], replacement.node_id)
        print(
            f"run 2: resumed at epoch {first['epoch']} on {first['node_ids']}; recovery (node removal → "
            f"first resumed epoch start) {started - removed_at:.1f} s; job {job_id} SUCCEEDED"
        )


def test_elastic_job_grows_and_shrinks_and_keeps_the_recipe(multinode: MultiNode, cifar_parquet: Path) -> None:
    """Elastic workers (issue 29 item 1): `scaling.num_workers {min: 1, max: 3}` starts on the 2 worker nodes
    there are; a third node arrives after the first checkpoint and, within the short resize interval, Ray Train
    restarts the group on 3 from the latest checkpoint; once an epoch ran on 3, that node is lost (removed
    ungracefully) and the group goes on with the 2 left, again from the latest checkpoint. Every epoch's
    global batch, step count and lr equal a fixed run's at that step (docs/scaling.md, "Elastic workers"),
    and the job view shows 2 → 3 → 2 workers."""
    from trainer.schedule import lr_factor
    from trainer.spec import resolve

    mn = multinode
    # Epochs of ~3 s, 20 of them: a resize (Ray's check, the group's restart, the data loaded again) takes
    # ~20 s, so shorter runs end before they grow. 12 paced steps (STEP_PAUSE_S) make such an epoch on a sixth
    # of the CPU that 3,072 images (48 unpaced steps) took.
    epochs = 20
    overrides = {
        "data.max_train_images": 576,
        "optim.epochs": epochs,
        "optim.batch_size": 48,  # divided by 1, 2 and 3
        "schedule.kind": "cosine",  # an lr that moves every step: a jump at a resize would show
        "scaling.num_workers": {"min": 1, "max": 3},
        "scaling.resize_interval_s": 1,
    }
    spec = resolve("debug", {**_job_body(cifar_parquet)["overrides"], **overrides})
    assert spec.data.max_train_images is not None  # the validation split comes on top (trainer/data.py)
    steps_per_epoch = math.ceil(spec.data.max_train_images / spec.optim.batch_size)  # a fixed run's, at any size
    added = None
    lost = False
    started = time.monotonic()
    try:
        with mn.service.client() as c:
            resp = c.post("/v1/jobs", json=_job_body(cifar_parquet, **overrides))
            assert resp.status_code == 201, resp.text
            job_id = resp.json()["id"]
            deadline = time.monotonic() + 300
            while not (c.get(f"/v1/jobs/{job_id}/checkpoints").json().get("checkpoints") or []):
                job = c.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] not in TERMINAL, (job, _explain(mn, c, job_id))
                assert time.monotonic() < deadline, f"no checkpoint in time: {job}"
                time.sleep(0.2)
            added = mn.add_worker()
            grown_at = time.time()
            deadline = time.monotonic() + 300
            while not any(m.get("workers") == 3 for m in mn.raw_metrics(job_id)):
                job = c.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] not in TERMINAL, ("ended before it grew", job, _explain(mn, c, job_id))
                assert time.monotonic() < deadline, f"no epoch on 3 workers in time: {job}"
                time.sleep(0.2)
            mn.cluster.remove_node(added, allow_graceful=False)  # the third node is lost mid-run
            lost = True
            job = wait_for(c, job_id, lambda j: j["state"] in TERMINAL, 420, "the elastic job to end")
            _expect_success(mn, c, job)
            assert job["attempts"] == 1, job  # grown and shrunk inside the same driver: no resubmission
            raw = mn.raw_metrics(job_id)
            view = c.get(f"/v1/jobs/{job_id}").json()
    finally:
        if added is not None and not lost:
            mn.cluster.remove_node(added)  # leave the module's cluster as it was: two worker nodes
    assert [m["epoch"] for m in raw] == list(range(1, epochs + 1)), raw  # every epoch exactly once
    counts = [m["workers"] for m in raw]
    grown = counts.index(3)  # epochs 1..grown ran on 2
    shrunk = grown + counts[grown:].index(2)  # epochs grown+1..shrunk ran on 3
    assert counts == [2] * grown + [3] * (shrunk - grown) + [2] * (epochs - shrunk), counts
    for m in raw:  # the rule: what a fixed run has at that step, whatever the worker count
        assert m["global_batch"] == 48 and m["global_step"] == m["epoch"] * steps_per_epoch, m
        expected_lr = spec.optim.lr * lr_factor(spec.schedule, m["global_step"], steps_per_epoch, spec.optim.epochs)
        assert m["lr"] == pytest.approx(expected_lr, rel=1e-9), (m["epoch"], m["lr"], expected_lr)
        assert len(m["node_ids"]) == m["workers"]
    first_on_3, first_after_loss = raw[grown], raw[shrunk]
    assert first_on_3["resumed"] and added.node_id in first_on_3["node_ids"], first_on_3
    assert first_after_loss["resumed"] and added.node_id not in first_after_loss["node_ids"], first_after_loss
    assert view["workers"] == [
        {"first_epoch": 1, "last_epoch": grown, "workers": 2},
        {"first_epoch": grown + 1, "last_epoch": shrunk, "workers": 3},
        {"first_epoch": shrunk + 1, "last_epoch": epochs, "workers": 2},
    ], view["workers"]
    resize_s = first_on_3["time"] - first_on_3["epoch_seconds"] - grown_at
    print(
        f"\nelastic: job {job_id} workers per epoch {counts}; node added → first epoch on 3 workers started "
        f"{resize_s:.1f} s later; test {time.monotonic() - started:.0f} s"
    )
