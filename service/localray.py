"""A local Ray head for `trainctl serve` when no cluster address is configured: `ray start --head --block`
on 127.0.0.1 in its own process group, with a short temp dir and an explicit RAY_AUTH_MODE (so the head and
our Jobs client agree). Stopped by process group, never by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRayHead:
    proc: subprocess.Popen[bytes]
    gcs_address: str
    dashboard_url: str
    temp_dir: str

    @classmethod
    def start(cls, num_cpus: int, auth_mode: str, timeout_s: float = 120) -> LocalRayHead:
        # Ray's unix socket paths must stay under 107 characters: a short dir under /tmp.
        temp_dir = tempfile.mkdtemp(prefix="tcray", dir="/tmp")
        port, dash = free_port(), free_port()
        env = {**os.environ, "RAY_AUTH_MODE": auth_mode, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
               f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
               # Ray's defaults for these are fixed ports (52365, 10001): with another head on the machine our
               # dashboard agent could not listen, and a head without one refuses every job submission.
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        log_path = os.path.join(temp_dir, "ray-start.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        head = cls(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                head.stop()
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(head.dashboard_url + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        return head
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # token auth: the dashboard is up and asks for the token
                    return head
                time.sleep(0.5)
            except OSError:
                time.sleep(0.5)
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        head.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout_s:.0f}s:\n{tail}")

    def stop(self) -> None:
        """SIGTERM the head's process group, wait, then SIGKILL whatever is left of it."""
        stop_process_group(self.proc, grace_s=30)
        try:  # stragglers of the group (workers that ignored SIGTERM)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group led by `proc`, give it `grace_s` to exit, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
