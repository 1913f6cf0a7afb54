"""Shared fixtures. Session-wide servers live in tests/plugins/ (one module each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.plugins.ray_cluster", "tests.plugins.s3"]

REPO = Path(__file__).resolve().parents[1]
# TRAINCTL_TEST_CIFAR_PARQUET: where a checkout has no ../shared beside it (a git worktree elsewhere).
CIFAR_PARQUET = Path(os.environ.get("TRAINCTL_TEST_CIFAR_PARQUET")
                     or REPO.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet")


@pytest.fixture(scope="session")
def cifar_parquet() -> Path:
    """The real CIFAR-10 JPEG parquet from ../shared. Absent: skip, except in CI where it must exist."""
    if not CIFAR_PARQUET.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CIFAR_PARQUET} is missing, and CI must have ../shared/datasets")
        pytest.skip(f"{CIFAR_PARQUET} not present (it lives in ../shared beside the checkout)")
    return CIFAR_PARQUET
