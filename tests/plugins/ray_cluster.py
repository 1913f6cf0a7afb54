"""One real local Ray head per test session, shared by every test that needs Ray.

Started with `ray start --head --block` in its own process group on 127.0.0.1 (dashboard and Jobs API on
127.0.0.1 too), token auth explicitly disabled so the head and every client agree (Ray 2.60 turns it on
by itself otherwise). 6 logical CPUs on this 2-core machine: a 2-worker DDP run, its driver and a Tune
trial's leaked placement group all fit. Stopped by process group at the end, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.plugins.reaper import reap_with_session

RAY_CPUS = 6


@dataclass(frozen=True)
class RayHead:
    address: str          # GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str    # Jobs API
    temp_dir: str

    def env(self) -> dict[str, str]:
        """Environment for a process that should attach to this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_head(num_cpus: int = RAY_CPUS) -> tuple[RayHead, subprocess.Popen]:
    # A short temp dir: Ray's unix socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [_ray_bin(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
           "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
           # Fixed by default (52365, 10001): a second head on this machine (another session's tests) would
           # lose them, and a head whose dashboard agent cannot listen refuses every job submission.
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    log = open(os.path.join(temp_dir, "ray-start.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reap_with_session(proc.pid)
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(head.dashboard_url + "/api/version", timeout=2) as r:
                if r.status == 200:
                    return head, proc
        except OSError:
            time.sleep(0.5)
    stop_head(proc, temp_dir)
    raise RuntimeError(f"Ray head did not come up in 90 s: {Path(log.name).read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    head, proc = start_head()
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.address
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield head
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        stop_head(proc, head.temp_dir)
