"""cluster/gpu.yaml's node types, exercised on Ray's fake multi-node provider (tests/cluster/fakecluster.py):
the autoscaler config is generated from gpu.yaml by the test, and jobs submitted through the head's Jobs API
(with the service's driver resource) must get the node types gpu.yaml means them to get:

- 2 workers x 1 GPU, one per node      -> two 1-GPU nodes (`gpu.1xa10g` or its spot twin);
- 4 workers x 1 GPU, all on one node   -> one `gpu.4xa10g` node;
- every driver on the head (`trainctl_driver`); the workers' nodes gone after the idle timeout.

What differs from a cloud run is in docs/scaling.md ("gpu.yaml's node types on one machine").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.checks import REPO
from tests.cluster.fakecluster import (
    FAKE_GPU,
    HEAD_TYPE,
    FakeCluster,
    fake_config,
    job_status,
    type_marker,
    wait_until,
)
from trainer.placement import Placement, placement_strategy, worker_resources
from trainer.spec import JobSpec, ScalingSpec

GPU_YAML = REPO / "cluster" / "gpu.yaml"
DRIVER = Path(__file__).with_name("fake_driver.py")
IDLE_TIMEOUT_MINUTES = 0.1  # gpu.yaml's 10 minutes, shortened: the one value the test changes


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return yaml.safe_load(GPU_YAML.read_text())


# --- the generated config and the mapping (no Ray) ------------------------------------------------------------


def test_fake_config_is_gpu_yaml_with_fake_gpus(gpu: dict[str, Any]) -> None:
    config = fake_config(gpu, gcs_port=6400)
    types = config["available_node_types"]
    workers = {n: t for n, t in gpu["available_node_types"].items() if n != gpu["head_node_type"]}
    assert set(types) == {HEAD_TYPE, *workers}
    for name, node in workers.items():
        fake = types[name]
        assert (fake["min_workers"], fake["max_workers"]) == (node.get("min_workers", 0), node["max_workers"])
        assert fake["resources"][FAKE_GPU] == node["resources"]["GPU"] and "GPU" not in fake["resources"]
        assert fake["resources"]["CPU"] == node["resources"]["CPU"] and fake["resources"][type_marker(name)] == 1
    head = gpu["available_node_types"][gpu["head_node_type"]]["resources"]
    assert types[HEAD_TYPE]["resources"] == {"CPU": head["CPU"], "trainctl_driver": head["trainctl_driver"]}
    assert config["idle_timeout_minutes"] == gpu["idle_timeout_minutes"]
    assert (config["max_workers"], config["upscaling_speed"]) == (gpu["max_workers"], gpu["upscaling_speed"])
    assert config["provider"]["gcs_address"] == "127.0.0.1:6400"
    assert fake_config(gpu, 6400, idle_timeout_minutes=0.1)["idle_timeout_minutes"] == 0.1


def test_spot_first_then_on_demand(gpu: dict[str, Any]) -> None:
    """The spot type is the twin of an on-demand type; gpu.yaml's scorer (loaded by name, as Ray's autoscaler
    does) picks it while it launches, and the on-demand type once a spot launch has failed — where Ray's
    default scorer keeps asking for spot."""
    from functools import partial

    from ray.autoscaler._private.loader import load_function_or_class
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilityRecord,
        NodeAvailabilitySummary,
        UnavailableNodeInformation,
    )
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    types = gpu["available_node_types"]
    spot = [
        n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert spot == ["gpu.1xa10g.spot"]
    on_demand = "gpu.1xa10g"
    assert types[on_demand]["resources"] == types[spot[0]]["resources"]
    assert types[on_demand]["node_config"]["InstanceType"] == types[spot[0]]["node_config"]["InstanceType"]
    assert "InstanceMarketOptions" not in types[on_demand]["node_config"]

    from tests.cluster.fakecluster import autoscaler_env

    scorer = load_function_or_class(autoscaler_env(gpu)["RAY_AUTOSCALER_UTILIZATION_SCORER"])
    demand = [{"CPU": 1, "GPU": 1}] * 2
    failed = NodeAvailabilitySummary(
        node_availabilities={
            spot[0]: NodeAvailabilityRecord(
                spot[0], False, time.time(), UnavailableNodeInformation("InsufficientInstanceCapacity", "no spot")
            )
        }
    )

    def pick(score: Any, summary: NodeAvailabilitySummary) -> dict[str, int]:
        added, _ = get_nodes_for(
            types, {}, gpu["head_node_type"], 5, demand, partial(score, node_availability_summary=summary)
        )
        return dict(added)

    assert pick(scorer, NodeAvailabilitySummary(node_availabilities={})) == {spot[0]: 2}
    assert pick(scorer, failed) == {on_demand: 2}
    assert pick(_default_utilization_scorer, failed) == {spot[0]: 2}  # why the scorer exists


def test_the_service_knows_the_largest_node_type(gpu: dict[str, Any]) -> None:
    """TRAINCTL_MAX_GPUS_PER_NODE (what the API refuses beyond) is the largest GPU node type's GPUs, in gpu.yaml
    and in the Kubernetes ConfigMap alike."""
    most = max(int(t["resources"].get("GPU", 0)) for t in gpu["available_node_types"].values())
    serve = " ".join(gpu["head_start_ray_commands"])
    assert re.findall(r"TRAINCTL_MAX_GPUS_PER_NODE=(\d+)", serve) == [str(most)]
    settings = yaml.safe_load((REPO / "cluster" / "kuberay" / "settings.yaml").read_text())["data"]
    assert settings["TRAINCTL_MAX_GPUS_PER_NODE"] == str(most)


@pytest.mark.parametrize(
    "scaling, bundle, strategy",
    [
        ({"num_workers": 2, "workers_per_node": 1}, {"CPU": 1, "GPU": 1}, "STRICT_SPREAD"),
        ({"num_workers": 4, "workers_per_node": 4}, {"CPU": 1, "GPU": 1}, "STRICT_PACK"),
        ({"num_workers": 1, "gpus_per_worker": 4}, {"CPU": 1, "GPU": 4}, "PACK"),
        ({"num_workers": 2, "resources_per_worker": {"slot": 1}}, {"CPU": 1, "GPU": 1, "slot": 1}, "PACK"),
    ],
)
def test_scaling_maps_to_ray_bundles_and_strategy(scaling: dict, bundle: dict, strategy: str) -> None:
    spec = ScalingSpec(**scaling, use_gpu=True, cpus_per_worker=1)
    where = Placement(num_workers=spec.num_workers, use_gpu=True, cpus_per_worker=1, reason="")
    assert worker_resources(spec, where) == bundle
    assert placement_strategy(spec) == strategy
    cpu = Placement(num_workers=1, use_gpu=False, cpus_per_worker=2, reason="")
    assert "GPU" not in worker_resources(spec, cpu)


@pytest.mark.parametrize("scaling", [{"workers_per_node": 3, "num_workers": 4}, {"workers_per_node": 2}])
def test_workers_per_node_must_be_one_or_all(scaling: dict) -> None:
    with pytest.raises(ValueError, match=r"scaling\.workers_per_node"):
        JobSpec.model_validate({"scaling": scaling, "optim": {"batch_size": 64}})


# --- on the fake multi-node cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_cluster(gpu: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    cluster = FakeCluster.start(gpu, tmp_path_factory.mktemp("fake"), idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), "every process of the fake cluster must be gone"


def run_job(cluster: FakeCluster, scaling: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    """Submit the placement driver as a Ray job the way the service does (the driver resource), wait, and
    return what it printed."""
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.head.dashboard_url)
    job = client.submit_job(
        entrypoint=f"{sys.executable} {DRIVER} '{json.dumps(scaling)}'",
        entrypoint_num_cpus=0,
        entrypoint_resources={"trainctl_driver": 1},
    )
    status = wait_until(
        lambda: (s := job_status(client, job)) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and s,
        timeout_s,
        f"job {scaling}",
    )
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    (line,) = [ln for ln in logs.splitlines() if ln.startswith("RESULT ")]
    return dict(json.loads(line[len("RESULT ") :]))


def node_types(cluster: FakeCluster) -> dict[str, str]:
    """node id -> gpu.yaml node type (or the head) for the live nodes."""
    import ray

    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            markers = [r[len("nodetype_") :] for r in node["Resources"] if r.startswith("nodetype_")]
            out[node["NodeID"]] = markers[0] if markers else HEAD_TYPE
    return out


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_jobs_get_the_node_types_gpu_yaml_means(fake_cluster: FakeCluster, gpu: dict[str, Any]) -> None:
    import ray

    ray.init(address=fake_cluster.head.gcs_address, log_to_driver=False)
    try:
        assert set(node_types(fake_cluster).values()) == {HEAD_TYPE}, "the cluster starts with its head only"
        started = time.monotonic()
        one_per_node = run_job(
            fake_cluster, {"num_workers": 2, "use_gpu": True, "workers_per_node": 1, "cpus_per_worker": 1}
        )
        spread_s = time.monotonic() - started
        types = node_types(fake_cluster)
        assert types[one_per_node["driver_node"]] == HEAD_TYPE
        assert len(set(one_per_node["worker_nodes"])) == 2
        # 1-GPU nodes, never the 4-GPU type: gpu.1xa10g.spot, preferred on the tie (test_spot_first_then_on_demand),
        # or its on-demand twin (a run with the fake provider launching one node per request got one of each).
        spread_types = sorted(types[n] for n in one_per_node["worker_nodes"])
        assert set(spread_types) <= {"gpu.1xa10g.spot", "gpu.1xa10g"} and "gpu.1xa10g.spot" in spread_types

        started = time.monotonic()
        one_node = run_job(
            fake_cluster, {"num_workers": 4, "use_gpu": True, "workers_per_node": 4, "cpus_per_worker": 1}
        )
        pack_s = time.monotonic() - started
        types = node_types(fake_cluster)
        assert types[one_node["driver_node"]] == HEAD_TYPE
        assert len(set(one_node["worker_nodes"])) == 1
        assert types[one_node["worker_nodes"][0]] == "gpu.4xa10g"
        assert one_node["strategy"] == "STRICT_PACK" and one_node["bundle"] == {"CPU": 1.0, FAKE_GPU: 1.0}

        # Idle workers go: only the head is left once the idle timeout has passed (plus the autoscaler's
        # 5 s update period and a loaded machine's slack).
        idle = time.monotonic()
        wait_until(lambda: set(node_types(fake_cluster).values()) == {HEAD_TYPE}, 120, "idle workers to go")
        gone_s = time.monotonic() - idle
        print(
            f"\nfake cluster: {spread_types} placed in {spread_s:.1f}s, gpu.4xa10g in {pack_s:.1f}s (job "
            f"submit -> result), idle nodes gone {gone_s:.1f}s after the last job "
            f"(idle_timeout_minutes={IDLE_TIMEOUT_MINUTES})"
        )
    finally:
        ray.shutdown()
