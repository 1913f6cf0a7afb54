"""`pip install trainctl-ray` is the client only: a fresh venv gets the CLI and HTTP client without torch, Ray or
the control plane's packages, and that CLI validates a spec locally and reads a job from a served app."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.common.settings import load_settings
from service.server.app import create_app
from tests.once import once_per_session
from tests.service.fakes import FakeRay
from tests.service.loopback import serve_on_loopback

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.install


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with this checkout installed as a user would; built once per session (tests/once.py): the
    tests only run its `trainctl`, and pip's install is ~30 s of CPU."""
    return once_per_session(tmp_path_factory, "client-venv", _install_the_client)


def _install_the_client(folder: Path) -> Path:
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # A regular (non-editable) install of this checkout, no extras: what `pip install trainctl-ray` gets.
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", str(REPO)],
        check=True,
        timeout=600,
    )
    return venv


@pytest.fixture
def served_app(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The real app over HTTP on a free loopback port (Ray faked: this test is about the client)."""
    settings = load_settings(data_dir=tmp_path / "data", ray_address="http://127.0.0.1:1", reconcile_interval_s=3600)
    with serve_on_loopback(create_app(settings, ray=FakeRay())) as url:
        yield url, settings.admin_token_path.read_text().strip()


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "trainctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(venv.parent)},
    )


def test_client_install_has_no_torch_ray_or_server(client_venv: Path) -> None:
    for module in ("torch", "ray", "fastapi", "sqlalchemy", "pyarrow"):
        probe = subprocess.run(
            [str(client_venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True, timeout=60
        )
        assert probe.returncode != 0, f"the client-only install pulled in {module}"
    assert run(client_venv, "--help").returncode == 0
    version = run(client_venv, "--version")
    assert version.returncode == 0 and version.stdout.startswith("trainctl ")
    assert "unknown" not in version.stdout  # found under its distribution name, trainctl-ray
    completion = run(client_venv, "completion", "bash")  # shtab is a dependency of the client
    assert completion.returncode == 0 and "_shtab_trainctl" in completion.stdout, completion.stderr


def test_client_validates_a_spec_locally(client_venv: Path) -> None:
    ok = run(client_venv, "submit", "--preset", "debug", "--set", "optim.epochs=2", "--dry-run", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["optim"]["epochs"] == 2
    bad = run(client_venv, "submit", "--preset", "debug", "--set", "optim.lr=-1", "--dry-run")
    assert bad.returncode == 8 and "optim.lr" in bad.stderr and "nothing was submitted" in bad.stderr


def test_client_reads_a_job_from_a_served_app(client_venv: Path, served_app: tuple[str, str]) -> None:
    url, token = served_app
    created = httpx.post(
        f"{url}/v1/jobs",
        json={"preset": "debug", "overrides": {"optim.epochs": 1}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    status = run(client_venv, "status", job_id, "--url", url, "--token", token, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == job_id
    denied = run(client_venv, "status", job_id, "--url", url, "--token", "wrong")
    assert denied.returncode == 7 and "401" not in denied.stdout
