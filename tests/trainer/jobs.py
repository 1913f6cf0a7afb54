"""Helpers to create job dirs and run `python -m trainer.run` against the session's Ray head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer import contract
from trainer.spec import resolve

# A paced job (contract.STEP_PAUSE_ENV) for a test whose fault must land while the job still runs: 512 images
# are 8 steps an epoch for the debug preset's 2 workers, and a pause of PACE_S after each makes an epoch of ~2 s,
# as 2,048 unpaced images did, with a quarter of their training.
PACED = {"data.max_train_images": 512}
PACE_S = 0.25

# One Ray Train worker, for the runs whose subject is not DDP (the service, the dashboard page, storage, a
# searcher's values): a second worker is a second process importing torch and Ray Train, and a debug run costs
# 20.5 CPU-s with 2 workers against 16.0 with 1 (`bench/ray_overhead.py --configs session,one-worker`) on a suite
# that is CPU-bound on 2 cores. The runs whose subject is DDP keep the debug preset's 2 workers:
# test_job_runs_to_success, tests/trainer/test_run.py, the ASHA test, test_faults.py and the multi-node tests.
ONE_WORKER = {"scaling.num_workers": 1}


def paced(env: dict[str, str], pause_s: float = PACE_S) -> dict[str, str]:
    """`env` for a driver whose every rank sleeps `pause_s` after each optimizer step."""
    return {**env, contract.STEP_PAUSE_ENV: str(pause_s)}


def make_job_dir(root: Path, name: str, overrides: dict[str, Any]) -> Path:
    job_dir = root / name
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(resolve("debug", overrides).to_json())
    return job_dir


def start_run(job_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(job_dir.parent / f"{job_dir.name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run(job_dir: Path, env: dict[str, str], timeout: float = 300) -> int:
    proc = start_run(job_dir, env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_tail(job_dir: Path) -> str:
    log = job_dir.parent / f"{job_dir.name}.log"
    return log.read_text()[-4000:] if log.exists() else ""


def wait_for_checkpoint(proc: subprocess.Popen, job_dir: Path, epoch: int, timeout: float = 240) -> None:
    """Wait until the run's manifest lists a checkpoint of `epoch` or later (or the run ends)."""
    manifest = job_dir / "manifest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["latest_epoch"] >= epoch:
            return
        time.sleep(0.2)
