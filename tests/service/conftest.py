"""Fixtures for the service tests.

Unit tests: `api` = the real app (real SQLite in tmp_path, real local storage) over a FakeRay, driven
through FastAPI's TestClient; its background reconciler is stopped, so tests run `reconcile()` themselves.

End-to-end tests: `service` = a real `trainctl serve` process on a free 127.0.0.1 port attached to the
session's Ray head (tests/plugins/ray_cluster.py), talking real HTTP; see e2e helpers below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.common.settings import Settings, load_settings
from service.engine.runner import Runner
from service.server.app import create_app
from service.server.localray import read_head_record, stop_process_group
from tests.conftest import CIFAR_PARQUET
from tests.plugins.ray_cluster import RayHead
from tests.plugins.reaper import reap_with_session
from tests.ports import stable_port
from tests.service.fakes import FakeRay

TRAINCTL = str(Path(sys.executable).with_name("trainctl"))


# --- unit: the app over a fake Ray ------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    settings: Settings
    ray: FakeRay
    token: str

    @property
    def runner(self) -> Runner:
        return self.client.app.state.trainctl.runner

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def reconcile(self) -> None:
        self.runner.reconcile_once()

    def job_dir(self, job_id: str) -> Path:
        return Path(self.runner.job_dir(job_id))

    def post(self, body: Any, **kw: Any) -> httpx.Response:
        return self.client.post("/v1/jobs", json=body, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)


@pytest.fixture
def make_api(tmp_path: Path, database_url: str) -> Iterator[Any]:
    opened: list[TestClient] = []

    def make(keep_reconciler: bool = False, ray: FakeRay | None = None, **overrides: Any) -> Api:
        settings = load_settings(
            **{
                "data_dir": tmp_path / "data",
                "reconcile_interval_s": 3600,
                "database_url": database_url,
                "ray_address": "http://127.0.0.1:1",
                **overrides,
            }
        )
        ray = ray or FakeRay()
        # raise_server_exceptions=False: see what a client sees (our JSON 500), never a traceback.
        client = TestClient(create_app(settings, ray=ray), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        if not keep_reconciler:  # tests drive reconciliation themselves (Api.reconcile), deterministically
            client.portal.call(client.app.state.trainctl.reconciler.stop)
        token = settings.admin_token_path.read_text().strip() if settings.auth else ""
        return Api(client, settings, ray, token)

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Any) -> Api:
    return make_api()


DEBUG_JOB = {"preset": "debug", "overrides": {"optim.epochs": 2}}


def metrics_line(epoch: int, val_acc: float, images_per_s: float = 100.0) -> str:
    """One metrics.jsonl line as the trainer writes it (every field of trainer.contract.EpochMetrics)."""
    return (
        json.dumps(
            {
                "epoch": epoch,
                "train_loss": 1.0,
                "train_acc": 0.1,
                "val_loss": 1.0,
                "val_acc": val_acc,
                "lr": 0.05,
                "images_per_s": images_per_s,
                "epoch_seconds": 3.0,
                "time": 1e9 + epoch,
            }
        )
        + "\n"
    )


# --- end-to-end: real processes -----------------------------------------------------------------------------


@dataclass
class Service:
    """A `trainctl serve` process (own process group) and how to talk to it."""

    url: str
    data_dir: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    args: tuple[str, ...] = ()  # more `trainctl serve` flags
    _reaped: set[int] = field(default_factory=set)

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def client(self, token: str | None = None, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token or self.token}"}
        )

    def start(self) -> None:
        assert self.proc is None
        self.log_path = self.data_dir.parent / f"serve-{time.time():.0f}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TRAINCTL, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port), *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        reap_with_session(self.proc.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainctl serve exited {self.proc.returncode}:\n{self.log()}")
            head = read_head_record(self.data_dir)
            if head is not None and head.pid not in self._reaped:
                # A local head outlives serve: if pytest dies, stop it too (by its own process group).
                reap_with_session(head.pid)
                self._reaped.add(head.pid)
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"trainctl serve did not answer in 180 s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left: only what we started."""
        if self.proc is None:
            return
        stop_process_group(self.proc, grace_s=20)
        self.proc = None

    def down(self) -> subprocess.CompletedProcess:
        """`trainctl down`: stop this data dir's serve and the local Ray head it started (a no-op without)."""
        done = subprocess.run(
            # the default grace: only an upper bound now that the head shuts down by itself in a few seconds
            [TRAINCTL, "down", "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.stop()
        return done

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path and self.log_path.exists() else ""


_BASETEMP: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _record_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BASETEMP.append(tmp_path_factory.getbasetemp())


def test_data_roots() -> str:
    """TRAINCTL_DATA_ROOTS for test services: the shared dataset's folder and this session's pytest tmp dirs
    (where tests write their small datasets), instead of the default <data dir>/datasets."""
    return ",".join([str(CIFAR_PARQUET.parent), *(str(p) for p in _BASETEMP[:1])])


test_data_roots.__test__ = False  # type: ignore[attr-defined] - a helper, not a test


def service_env(ray_head: RayHead, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in ray_head.env().items() if not k.startswith("TRAINCTL_")}
    env.pop("RAY_ADDRESS", None)  # the service must use what TRAINCTL_RAY_ADDRESS says, nothing else
    env.update(
        {
            "TRAINCTL_RAY_ADDRESS": ray_head.dashboard_url,
            "TRAINCTL_RECONCILE_INTERVAL_S": "0.5",
            "TRAINCTL_DATA_DIR": str(data_dir),
            "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
            "TRAINCTL_DATA_ROOTS": test_data_roots(),
            **extra,
        }
    )
    return env


def start_service(ray_head: RayHead, data_dir: Path, **extra: str) -> Service:
    port = stable_port()  # tests restart services on the same port (tests/ports.py)
    svc = Service(f"http://127.0.0.1:{port}", data_dir, service_env(ray_head, data_dir, **extra), port)
    svc.start()
    return svc


@pytest.fixture(scope="module")
def service(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the e2e module; max 1 concurrent job, so a second submission waits QUEUED."""
    svc = start_service(ray_head, tmp_path_factory.mktemp("svc") / "data", TRAINCTL_MAX_CONCURRENT_JOBS="1")
    try:
        yield svc
    finally:
        _cancel_everything(svc)
        svc.stop()


def _cancel_everything(svc: Service) -> None:
    try:
        with svc.client() as c:
            for job in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
                if job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    c.post(f"/v1/jobs/{job['id']}/cancel")
    except Exception:  # noqa: BLE001 - best effort before stopping
        pass


def wait_for(client: httpx.Client, job_id: str, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {json.dumps(job)[:2000]}")
