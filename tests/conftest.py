"""Shared fixtures. Session-wide servers live in tests/plugins/ (one module each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.plugins.ray_cluster", "tests.plugins.s3", "tests.plugins.postgres"]

REPO = Path(__file__).resolve().parents[1]
# TRAINCTL_TEST_CIFAR_PARQUET: where a checkout has no ../shared beside it (a git worktree elsewhere).
CIFAR_PARQUET = Path(
    os.environ.get("TRAINCTL_TEST_CIFAR_PARQUET")
    or REPO.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet"
)


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
