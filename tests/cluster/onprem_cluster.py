"""The on-prem cluster the cluster tests share: cluster/onprem.yaml brought up for real with Ray's cluster
launcher (`ray up`, local provider, SSH) onto emulated hosts (tests/hosts.py), S3 (SeaweedFS) on the hosts'
bridge address, and trainctl's own API on the head, reached through an SSH tunnel as a user would.

Each test module that needs it makes its own (`onprem_cluster()` in a module fixture): a test that crashes or
partitions a host leaves the cluster changed, so modules never share one. Only the host addresses, the SSH user
and key, the hosts' size, the install path and the idle timeout are substituted into the file; the S3 endpoint
and keys reach the hosts in ~/.trainctl/cluster.env through its file_mounts, as on real machines.

Needs root (namespaces): skipped with the reason elsewhere, failed under CI=true.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster.checks import REPO
from tests.hosts import Hosts, HostsUnavailable, why_unavailable
from tests.plugins.ray_cluster import LEAN_RAY_ENV
from tests.plugins.s3 import S3Server, start_server

CLUSTER_YAML = REPO / "cluster" / "onprem.yaml"
DOWN_SCRIPT = REPO / "cluster" / "onprem-down.sh"
CLUSTER_NAME = "trainctl-onprem"
BUCKET = "trainctl-onprem"
TRAIN_ROWS = 640  # the debug preset trains on 512 of them
N_WORKER_HOSTS = 3  # a 2-rank job needs 1 beside the head; one more for a replacement, one spare
IDLE_TIMEOUT_MIN = 0.5
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substituted_config(hosts: Hosts, min_workers: int = 0) -> dict[str, Any]:
    """cluster/onprem.yaml with the values a lab edits set for the emulated hosts; commands unchanged except
    the install path."""
    text = CLUSTER_YAML.read_text().replace("/opt/trainctl/venv", sys.prefix)
    config = yaml.safe_load(text)
    head, *workers = hosts.hosts
    config["provider"]["head_ip"] = head.address
    config["provider"]["worker_ips"] = [w.address for w in workers]
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    config["available_node_types"]["local.cluster.node"]["resources"] = {"CPU": 1}
    config["available_node_types"]["local.cluster.node"]["min_workers"] = min_workers
    config["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    return config


@dataclass
class OnPrem:
    hosts: Hosts
    s3: S3Server
    config_path: Path
    storage: str
    api_url: str
    token: str
    tunnel: subprocess.Popen[bytes]
    timings: dict[str, float]

    def launcher(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.hosts.run(list(argv), timeout=timeout, env=launcher_env())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def ray_processes(self) -> dict[str, list[str]]:
        """Ray / trainctl / storage processes on each host, by address."""
        found: dict[str, list[str]] = {}
        for host in self.hosts.hosts:
            names = []
            for pid in host.pids():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                # The host itself (unshare, its sshd init and SSH sessions): their argv names the harness's dir.
                if (host.proc is not None and pid == host.proc.pid) or cmd.startswith(("sshd", "/usr/sbin/sshd")):
                    continue
                if re.search(r"ray|raylet|gcs_server|trainctl|weed|trainer\.run", cmd):
                    names.append(cmd[:120])
            found[host.address] = names
        return found

    def provider_state(self) -> dict[str, Any]:
        """The local provider's cluster state on the head: {address: {"state": "running"|"terminated", ...}}."""
        out = self.hosts.ssh(self.hosts.hosts[0], f"cat /tmp/ray/cluster-{CLUSTER_NAME}.state")
        try:
            return dict(json.loads(out.stdout))
        except ValueError:
            return {}

    def alive_worker_hosts(self) -> list[str]:
        return [a for a, procs in self.ray_processes().items() if procs and a != self.hosts.hosts[0].address]


def launcher_env() -> dict[str, str]:
    """The launcher's environment: the install on PATH, nothing of this test session's Ray or S3 settings."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def check(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _upload_dataset(s3: S3Server, parquet: Path) -> str:
    table = pq.read_table(parquet).slice(0, TRAIN_ROWS)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with s3.filesystem().open_output_stream(f"{BUCKET}/datasets/train.parquet") as f:
        f.write(buf.getvalue())
    return f"s3://{BUCKET}/datasets/train.parquet"


def _wait_api(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the trainctl API on the head did not answer through the tunnel in {timeout_s} s")
        time.sleep(0.5)


@contextmanager
def onprem_cluster(cifar_parquet: Path, min_workers: int = 0) -> Iterator[OnPrem]:
    """Emulated hosts (a head and N_WORKER_HOSTS workers, 1 CPU each), S3 on their bridge, `ray up` of
    cluster/onprem.yaml, and trainctl's API on the head through an SSH tunnel; all of it gone afterwards.
    `min_workers`: worker hosts the autoscaler keeps running. Skips (fails under CI=true) where emulated
    hosts cannot run."""
    if reason := why_unavailable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the cluster tests: {reason}")
        pytest.skip(reason)
    ssh_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    try:
        hosts = Hosts.up(1 + N_WORKER_HOSTS, ssh_env=ssh_env, cpus=1)
    except HostsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the cluster tests: {exc}")
        pytest.skip(str(exc))
    s3 = tunnel = None
    env = launcher_env()
    timings: dict[str, float] = {}
    try:
        s3 = start_server(ip=hosts.bridge_address)  # the hosts' S3: reachable on their network only
        data_uri = _upload_dataset(s3, cifar_parquet)
        storage = f"s3://{BUCKET}/trainctl"
        cluster_env = "".join(
            f"{k}={v}\n"
            for k, v in {
                "TRAINCTL_STORAGE": storage,
                "TRAINCTL_DATA_ROOTS": data_uri.rsplit("/", 1)[0],
                **s3.s3_env(),
                **LEAN_RAY_ENV,  # the emulated hosts' Ray too (a site's cluster.env may carry any such setting)
            }.items()
        )
        config_path = hosts.run_dir / "onprem.yaml"
        config_path.write_text(yaml.safe_dump(substituted_config(hosts, min_workers), sort_keys=False))
        setup = (
            "ray get-auth-token --generate > /dev/null && mkdir -p ~/.trainctl && umask 077 && "
            f"printf %s {_shq(cluster_env)} > ~/.trainctl/cluster.env"
        )
        check(hosts.run(["bash", "-c", setup], env=env), "the launcher's token and cluster.env")
        check(
            hosts.run([sys.executable, "-m", "service.server.clustercheck", str(config_path)], env=env), "clustercheck"
        )
        t0 = time.monotonic()
        check(hosts.run(["ray", "up", "-y", "--no-config-cache", str(config_path)], timeout=600, env=env), "ray up")
        timings["ray_up_s"] = time.monotonic() - t0
        port = free_port()
        head = hosts.hosts[0]
        tunnel = subprocess.Popen(
            hosts.ssh_argv(head, "sleep infinity", extra=["-N", "-L", f"127.0.0.1:{port}:127.0.0.1:8000"])[:-1],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_api(url, 60)
        # As the docs say: the admin token from the head, through the launcher.
        out = check(
            hosts.run(["ray", "exec", str(config_path), "cat ~/trainctl-data/admin-token"], env=env), "ray exec"
        )
        # ray exec's output also carries SSH's "Shared connection to ... closed." (it runs `ssh -tt`).
        tokens = [line.strip() for line in out.splitlines() if re.fullmatch(r"\S{20,}", line.strip())]
        assert tokens, f"no admin token in the output of ray exec:\n{out[-2000:]}"
        token = tokens[-1]
        yield OnPrem(hosts, s3, config_path, storage, url, token, tunnel, timings)
    finally:
        try:
            if tunnel is not None:
                tunnel.kill()
                tunnel.wait(timeout=10)
            if (hosts.run_dir / "onprem.yaml").exists():
                hosts.run(["sh", str(DOWN_SCRIPT), str(hosts.run_dir / "onprem.yaml")], timeout=180, env=env)
        finally:
            if s3 is not None:
                s3.stop()
            hosts.down()


def _shq(text: str) -> str:
    return shlex.quote(text)
