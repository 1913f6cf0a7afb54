"""cluster/gpu.yaml's node types on Ray's fake multi-node provider (one machine, no cloud, no GPU).

`fake_config(gpu_yaml, gcs_port)` derives the autoscaler config from gpu.yaml itself: every worker node type
with the same min/max workers and resources, except that each GPU becomes the custom resource `fake_gpu`
(there is no CUDA here, and a `GPU` resource would make Ray Train set up CUDA); the head type with gpu.yaml's
head resources (`trainctl_driver` included); the same cluster-wide max_workers, upscaling speed and idle
timeout (the tests shorten only the last), and the same autoscaler scorer (spot first). `FakeCluster.start` runs
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` on 127.0.0.1 with free ports and token auth
disabled; the autoscaler then starts each "node" as another raylet on this machine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.server.localray import LocalRayHead, free_port
from tests.plugins.reaper import reap_with_session

FAKE_GPU = "fake_gpu"
HEAD_TYPE = "ray.head.default"  # the name the fake provider gives its head node


def fake_resources(resources: dict[str, float]) -> dict[str, float]:
    """A node type's resources with each GPU as `fake_gpu` (and no GPU entry at all when it has none)."""
    out = {k: v for k, v in resources.items() if k != "GPU"}
    if resources.get("GPU"):
        out[FAKE_GPU] = resources["GPU"]
    return out


def type_marker(name: str) -> str:
    """A resource only nodes of type `name` advertise, so a test can tell which type a node is."""
    return f"nodetype_{name}"


def fake_config(gpu: dict[str, Any], gcs_port: int, idle_timeout_minutes: float | None = None) -> dict[str, Any]:
    types = gpu["available_node_types"]
    head = types[gpu["head_node_type"]]
    node_types: dict[str, Any] = {
        HEAD_TYPE: {"resources": fake_resources(head["resources"]), "node_config": {}, "max_workers": 0}
    }
    for name, node in types.items():
        if name == gpu["head_node_type"]:
            continue
        node_types[name] = {
            "resources": {**fake_resources(node["resources"]), type_marker(name): 1},
            "min_workers": node.get("min_workers", 0),
            "max_workers": node["max_workers"],
            "node_config": {},
        }
    return {
        "cluster_name": gpu["cluster_name"] + "-fake",
        "max_workers": gpu["max_workers"],
        "upscaling_speed": gpu.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": gpu["idle_timeout_minutes"] if idle_timeout_minutes is None else idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Launch `count` nodes per request, as a cloud provider does (the fake one's default is one).
            "launch_multiple": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def autoscaler_env(gpu: dict[str, Any]) -> dict[str, str]:
    """The autoscaler settings gpu.yaml exports before `ray start --head` (the node-type scorer)."""
    found = re.findall(r"export (RAY_AUTOSCALER_[A-Z_]+)=([^;\s]+)", " ".join(gpu["head_start_ray_commands"]))
    return dict(found)


@dataclass
class FakeCluster:
    head: LocalRayHead
    config: dict[str, Any]

    @classmethod
    def start(cls, gpu: dict[str, Any], work_dir: Path, idle_timeout_minutes: float) -> FakeCluster:
        port = free_port()
        config = fake_config(gpu, port, idle_timeout_minutes)
        path = work_dir / "fake-autoscaler.json"
        path.write_text(json.dumps(config, indent=1))
        head_resources = copy.deepcopy(config["available_node_types"][HEAD_TYPE]["resources"])
        cpus = int(head_resources.pop("CPU"))
        head = LocalRayHead.start(
            num_cpus=cpus,
            auth_mode="disabled",
            port=port,
            extra_args=[f"--autoscaling-config={path}", f"--resources={json.dumps(head_resources)}"],
            extra_env={"RAY_FAKE_CLUSTER": "1", **autoscaler_env(gpu)},
        )
        reap_with_session(head.proc.pid)
        return cls(head, config)

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.head.gcs_address, "RAY_AUTH_MODE": "disabled"}

    def leftovers(self) -> list[int]:
        return leftover_fake_node_pids(self.head.temp_dir)

    def stop(self) -> None:
        """The head's process group (the fake nodes' raylets are children of its autoscaler, in the same
        group), then any fake-node process that left it: found by the node ids the provider gives them."""
        self.head.stop(grace_s=5)
        for pid in leftover_fake_node_pids(self.head.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def leftover_fake_node_pids(temp_dir: str) -> list[int]:
    """Processes still running from this cluster's temp dir (raylets, workers of the fake nodes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_until(predicate: Any, timeout_s: float, what: str, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def job_status(client: Any, job_id: str, attempts: int = 5) -> Any:
    """The Ray Jobs API's status of `job_id` (a JobSubmissionClient's), riding out a dropped connection as the
    service does (service/engine/rayjobs.py counts one as Ray being unavailable for now, not as an answer): a
    loaded head's dashboard once closed a connection without answering 1.6 s after a submission (the suite,
    2026-12-07, test_spot_loss)."""
    import requests

    for attempt in range(1, attempts + 1):
        try:
            return client.get_job_status(job_id)
        except requests.ConnectionError:
            if attempt == attempts:
                raise
            time.sleep(1)


def run(cmd: list[str], env: dict[str, str], timeout_s: float = 60) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
