"""Shared fixtures. Session-wide servers live in tests/plugins/ (one module each)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

# Tests never depend on the caller's trainctl settings (an operator's shell may set TRAINCTL_DATA_ROOTS,
# TRAINCTL_DATA_DIR, ...). The test harness's own knobs (TRAINCTL_TEST_*, TRAINCTL_README_SCREENSHOT) stay.
HARNESS_VARS = ("TRAINCTL_TEST_", "TRAINCTL_README_SCREENSHOT")


def caller_settings(environ: Mapping[str, str]) -> list[str]:
    """The TRAINCTL_* settings in `environ` that tests must not see."""
    return [k for k in environ if k.startswith("TRAINCTL_") and not k.startswith(HARNESS_VARS)]


# Removed here, before any test module (or the session's servers) is imported or started: some modules
# read a setting at import time (objstore's retry budget), and subprocesses inherit os.environ.
for _name in caller_settings(os.environ):
    del os.environ[_name]
# Nor on the caller's `trainctl login` profiles: the CLI's config file lives under XDG_CONFIG_HOME, here a fresh
# folder for the session (subprocesses inherit it).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="trainctl-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)

pytest_plugins = ["tests.plugins.ray_cluster", "tests.plugins.s3", "tests.plugins.postgres", "tests.plugins.schedule"]

REPO = Path(__file__).resolve().parents[1]
# TRAINCTL_TEST_CIFAR_PARQUET: where a checkout has no ../shared beside it (a git worktree elsewhere).
CIFAR_PARQUET = Path(
    os.environ.get("TRAINCTL_TEST_CIFAR_PARQUET")
    or REPO.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet"
)


@pytest.fixture(autouse=True)
def _no_caller_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without TRAINCTL_* settings, even ones an earlier test or fixture left behind;
    a test sets what it needs with monkeypatch (undone after it)."""
    for name in caller_settings(os.environ):
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def cifar_parquet() -> Path:
    """The real CIFAR-10 JPEG parquet from ../shared. Absent: skip, except in CI where it must exist."""
    if not CIFAR_PARQUET.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CIFAR_PARQUET} is missing, and CI must have ../shared/datasets")
        pytest.skip(f"{CIFAR_PARQUET} not present (it lives in ../shared beside the checkout)")
    return CIFAR_PARQUET


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job store's URL: every store and API test runs on the embedded SQLite and on a real PostgreSQL
    (a fresh database on the session's server, tests/plugins/postgres.py)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'trainctl.db'}"
    return request.getfixturevalue("postgres_url")
