"""On a CUDA machine: the trainer on a GPU, end to end through `python -m trainer.run` (a private local Ray).

Marked `gpu`; skipped where CUDA is absent (CI, the 2-core dev machine). bench/gpu_check.sh runs them with
`--noconftest` on a machine that has torch and CUDA but only the Ray of .gpu/ray-site-cp312.tar.xz, so this
file needs no fixture of tests/conftest.py. The parquet: TRAINCTL_TEST_PARQUET, else ../shared beside the
checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.spec import resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
# The debug model on 4,096 images: 3 epochs land far above chance; compile makes the first one slow.
SMALL = {
    "data.max_train_images": 4096,
    "data.val_fraction": 0.1,
    "optim.epochs": 3,
    "optim.batch_size": 256,
    "compile": "default",
    "checkpoint.keep_best": 1,
    # the debug preset pins 2 CPU workers; these are the defaults every other preset runs with
    "scaling.num_workers": "auto",
    "scaling.use_gpu": None,
    "scaling.cpus_per_worker": "auto",
}


@pytest.fixture(scope="module")
def parquet() -> Path:
    path = Path(os.environ.get("TRAINCTL_TEST_PARQUET") or REPO.parent / "shared/datasets/cifar10-jpeg/train.parquet")
    if not path.exists():
        pytest.skip(f"{path} not present (set TRAINCTL_TEST_PARQUET)")
    return path


def run_job(job_dir: Path, overrides: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(resolve("debug", overrides).to_json())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray, not a stray one
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def cuda_run(request, parquet, tmp_path_factory) -> tuple[str, Path]:
    job_dir = tmp_path_factory.mktemp("gpu") / f"cuda-{request.param}"
    proc = run_job(job_dir, {**SMALL, "data.train": str(parquet), "precision": request.param})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return request.param, job_dir


def test_the_default_scaling_trains_on_the_gpu_with_compile(cuda_run):
    precision, job_dir = cuda_run
    metrics = lines(job_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    name = torch.cuda.get_device_name(0)
    assert metrics[-1]["devices"] == [f"cuda:0 {name}"], metrics[-1]  # one GPU here: one worker on it
    assert metrics[-1]["numerics"]["precision"] == precision and metrics[-1]["numerics"]["channels_last"] is True
    assert metrics[-1]["numerics"]["compile"] == "default"  # the mode that ran is recorded
    assert metrics[-1]["val_acc"] > 0.25, metrics  # chance is 0.1
    assert all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN


def test_a_checkpoint_evaluated_offline_on_cuda_reproduces_its_val_acc(cuda_run):
    _, job_dir = cuda_run
    summary = json.loads((job_dir / "summary.json").read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "evaluate",
            "--checkpoint",
            summary["best_checkpoint"],
            "--split",
            "val",
            "--device",
            "cuda",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"].startswith("cuda")
    # Same weights, numerics, layout, batches and device kind: the same predictions, to within one image
    # (cuDNN may pick another convolution algorithm in a new process).
    assert abs(result["accuracy"] - summary["best_val_acc"]) <= 1 / result["n"] + 1e-9, (result, summary)


def test_more_gpu_workers_than_gpus_fails_naming_num_workers(parquet, tmp_path):
    proc = run_job(
        tmp_path / "too-many",
        {**SMALL, "data.train": str(parquet), "compile": "off", "scaling.num_workers": torch.cuda.device_count() + 1},
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "too-many" / "summary.json").read_text())
    assert summary["error_kind"] == "user" and "scaling.num_workers" in summary["error"], summary
