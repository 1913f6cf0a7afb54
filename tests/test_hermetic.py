"""Tests never depend on the caller's TRAINCTL_* settings (tests/conftest.py removes them): an operator's
shell with TRAINCTL_DATA_ROOTS, TRAINCTL_DATA_DIR, ... set must not change a single result."""

from __future__ import annotations

import os
import subprocess
import sys

import objstore
from tests.conftest import REPO, caller_settings

# What an operator's shell might hold; each one alone broke tests before conftest removed them.
HOSTILE = {
    "TRAINCTL_DATA_ROOTS": "/nonexistent",
    "TRAINCTL_DATA_DIR": "/nonexistent/data",
    "TRAINCTL_AUTH": "false",
    "TRAINCTL_MAX_CONCURRENT_JOBS": "0",
    "TRAINCTL_STORAGE_RETRY_SECONDS": "0.25",
    "TRAINCTL_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
}


def test_no_caller_setting_is_visible_inside_a_test() -> None:
    assert caller_settings(os.environ) == []
    # Read when objstore is imported, i.e. before any fixture runs: conftest removes it earlier still.
    assert objstore.DEFAULT_RETRY_BUDGET_S != float(HOSTILE["TRAINCTL_STORAGE_RETRY_SECONDS"])


def test_tests_pass_with_an_operators_settings_in_the_shell() -> None:
    """A few tests that read the data roots, the data dir, auth and the queue limit, run by a pytest whose
    environment holds conflicting TRAINCTL_* settings."""
    tests = [
        "tests/test_hermetic.py::test_no_caller_setting_is_visible_inside_a_test",
        "tests/service/test_runner.py::test_submission_contract[sqlite]",
        "tests/service/test_runner.py::test_queue_respects_the_limit_and_order[sqlite]",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests],
        cwd=REPO,
        env={**os.environ, **HOSTILE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
