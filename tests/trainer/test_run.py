"""End to end through a real Ray cluster: `python -m trainer.run` on the real CIFAR-10 parquet."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.once import once_per_session
from tests.trainer.cifar_files import write_cifar_python, write_kaggle_input
from tests.trainer.jobs import PACED, log_tail, make_job_dir, paced, read_jsonl, run, start_run, wait_for_checkpoint
from trainer import checkpoint as ckpt
from trainer.contract import CheckpointEntry

pytestmark = pytest.mark.ray
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None

# Enough images that 3 epochs of the debug model land far above chance (measured: ~0.29 val_acc).
LEARNS = {"data.max_train_images": 2048, "optim.epochs": 3}


@pytest.fixture(scope="module")
def trained_job(ray_head, cifar_parquet, tmp_path_factory) -> Path:
    """One 2-worker run that the tests below only read: trained once per session, whichever worker asks first."""

    def train(root: Path) -> Path:
        test_dir = write_cifar_python(root / "cifar-test", per_batch=30)
        job_dir = make_job_dir(
            root,
            "learns",
            {
                **LEARNS,
                "data.train": str(cifar_parquet),
                "data.test": str(test_dir),
                "checkpoint.keep_best": 1,
                "tta": "flip",
                # Logged to a real local MLflow store and a W&B offline run (trainer/tracking.py), when the extras
                # are installed.
                "tracking": {
                    **({"mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow/mlflow.db"}} if HAS_MLFLOW else {}),
                    **({"wandb": {"project": "cifar-debug"}} if HAS_WANDB else {}),
                },
            },
        )
        code = run(job_dir, ray_head.env())
        assert code == 0, log_tail(job_dir)
        return job_dir

    return once_per_session(tmp_path_factory, "trained-job", train)


def test_two_worker_ddp_run_learns_and_writes_its_files(trained_job):
    summary = json.loads((trained_job / "summary.json").read_text())
    metrics = read_jsonl(trained_job / "metrics.jsonl")
    assert summary["state"] == "succeeded" and summary["error"] is None
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["val_acc"] > 0.2, metrics  # chance is 0.1
    assert summary["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert summary["epochs_completed"] == 3 and summary["num_parameters"] == 40896
    assert summary["test_acc"] is not None and 0.0 <= summary["test_acc"] <= 1.0
    assert all(len(set(m["node_ids"])) == 1 and len(m["node_ids"]) == 2 for m in metrics)
    for key in ("train_loss", "train_acc", "val_loss", "lr", "images_per_s", "epoch_seconds"):
        assert isinstance(metrics[-1][key], float), key


@pytest.mark.skipif(not HAS_MLFLOW, reason="the mlflow extra (mlflow-skinny) is not installed")
def test_the_run_is_in_mlflow(trained_job):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained_job.parent}/mlflow/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("trainctl").experiment_id])
    assert run.info.run_name == trained_job.name and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert run.data.params["optim.epochs"] == "3"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")] == [
        "best_checkpoint/checkpoint.pt"
    ]


@pytest.mark.skipif(not HAS_WANDB, reason="the wandb extra is not installed")
def test_the_run_is_in_a_wandb_offline_run(trained_job):
    """Read back from W&B's own files: the params, every epoch as rank 0 wrote it (logged while the run went on),
    the summary and the best checkpoint, all in the job's dir."""
    from tests.trainer.wandb_files import read_offline_runs

    metrics = read_jsonl(trained_job / "metrics.jsonl")
    summary = json.loads((trained_job / "summary.json").read_text())
    (folder,) = (trained_job / "wandb").glob(f"offline-run-*-{trained_job.name}")
    offline = read_offline_runs([folder])
    assert offline.run_ids == {trained_job.name} and offline.projects == {"cifar-debug"}
    assert offline.config["optim.epochs"] == "3" and offline.config["data.max_train_images"] == "2048"
    assert [(row["_step"], row["val_acc"]) for row in offline.history] == [(m["epoch"], m["val_acc"]) for m in metrics]
    # Epoch 1 reached W&B before the last epoch ended: logged as the run went, not at its end.
    assert offline.history[0]["_timestamp"] < metrics[-1]["time"], (offline.history[0], metrics[-1]["time"])
    assert offline.summary["best_val_acc"] == summary["best_val_acc"] and offline.summary["state"] == "succeeded"
    assert offline.artifacts == [f"{trained_job.name}-best"] and offline.exit_codes == [0]
    state = json.loads((trained_job / "tracking.json").read_text())
    assert state["wandb"]["last_epoch"] == 3 and state["wandb"]["run_id"] == trained_job.name


def test_the_driver_log_reads_as_the_trainers_lines(trained_job):
    """`trainctl logs` (service/client/logview.py) on this real two-worker run's driver output."""
    from service.client.logview import trainer_lines

    raw = (trained_job.parent / f"{trained_job.name}.log").read_text()
    shown = trainer_lines(raw).splitlines()
    every = trainer_lines(raw, all_ranks=True).splitlines()
    epochs = [line.split(":")[0] for line in shown if line.startswith("epoch ")]
    assert epochs == ["epoch 1", "epoch 2", "epoch 3"], shown
    assert {line[:8] for line in every if "] epoch " in line} == {"[rank 0]", "[rank 1]"}, every
    assert "TrainingReport" in raw and not any("TrainingReport" in line for line in every)
    assert raw.count("devices: ") == 1, [line for line in raw.splitlines() if "devices: " in line]


def test_manifest_checksums_and_retention(trained_job):
    manifest = json.loads((trained_job / "manifest.json").read_text())
    entries = manifest["checkpoints"]
    assert manifest["latest_epoch"] == 3
    # keep_best=1 plus the latest: one or two checkpoints, and exactly those folders on disk
    expected = {e.epoch for e in ckpt.kept([CheckpointEntry.model_validate(e) for e in entries], 1)}
    assert {e["epoch"] for e in entries} == expected and 3 in expected and len(expected) <= 2
    for e in entries:
        data = Path(e["uri"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["size"]
    # Ray Train deletes old checkpoints asynchronously (after the run may have ended): the folders on disk
    # only ever shrink toward the kept ones, so wait (bounded) until they match rather than a fixed 2 s.
    want = {f"epoch_{e:04d}" for e in expected}
    deadline = time.monotonic() + 10
    while True:
        on_disk = {p.name for p in (trained_job / trained_job.name).glob("epoch_*")}
        if on_disk == want or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert on_disk == want


def test_best_checkpoint_reproduces_val_acc_in_a_fresh_process(trained_job):
    summary = json.loads((trained_job / "summary.json").read_text())
    # the defaults (no --data, no --split) evaluate the run's own validation split
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", "--checkpoint", summary["best_checkpoint"], "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert abs(result["accuracy"] - summary["best_val_acc"]) <= 0.005, (result, summary)
    assert set(result["per_class"]) == {
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    }


def test_test_split_each_epoch_and_final_test_acc_reproduces_to_the_image(trained_job):
    summary = json.loads((trained_job / "summary.json").read_text())
    metrics = read_jsonl(trained_job / "metrics.jsonl")
    assert all(isinstance(m["test_acc"], float) and isinstance(m["test_loss"], float) for m in metrics)
    assert summary["final_test_acc"] == metrics[-1]["test_acc"]
    assert summary["best_checkpoint_rule"] == "val_acc"  # the run has a validation split
    best = next(m for m in metrics if m["epoch"] == summary["best_checkpoint_epoch"])
    assert summary["best_checkpoint_test_acc"] == best["test_acc"] == summary["test_acc"]
    final = max(json.loads((trained_job / "manifest.json").read_text())["checkpoints"], key=lambda e: e["epoch"])
    assert final["epoch"] == 3
    # `evaluate --split test` without --data: the run's own test split (data.test), in a fresh process
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", "--checkpoint", final["uri"], "--split", "test", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 30 and round(result["accuracy"] * 30) == round(summary["final_test_acc"] * 30)

    # tta: flip — the final pass reports the best checkpoint's flip-TTA accuracy beside the plain one, and
    # `evaluate --tta flip` reproduces it in a fresh process
    assert summary["best_checkpoint_tta"] == "flip" and 0.0 <= summary["best_checkpoint_tta_acc"] <= 1.0
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", "--checkpoint", summary["best_checkpoint"]]
        + ["--split", "test", "--tta", "flip", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert round(result["accuracy"] * 30) == round(summary["best_checkpoint_test_acc"] * 30)
    assert result["tta"]["accuracy"] == summary["best_checkpoint_tta_acc"]


def test_predict_writes_kaggle_csv(trained_job, tmp_path):
    summary = json.loads((trained_job / "summary.json").read_text())
    pkl = write_kaggle_input(tmp_path / "test.pkl", n=12)
    out = tmp_path / "pred.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "predict",
            "--checkpoint",
            summary["best_checkpoint"],
            "--input",
            str(pkl),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Labels"] and len(rows) == 13
    assert [int(r[0]) for r in rows[1:]] == list(range(100, 112))
    assert all(0 <= int(r[1]) <= 9 for r in rows[1:])
    # the CIFAR-10 python layout (N×3072 CHW rows, no ids), e.g. test_batch: ids 1..N
    batch = tmp_path / "test_batch"
    write_cifar_python(tmp_path / "cifar", per_batch=7)
    batch.write_bytes((tmp_path / "cifar" / "test_batch").read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "predict",
            "--checkpoint",
            summary["best_checkpoint"],
            "--input",
            str(batch),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(out.open()))
    assert len(rows) == 8 and [int(r[0]) for r in rows[1:]] == list(range(1, 8))


def test_corrupt_checkpoint_is_detected(trained_job, tmp_path):
    summary = json.loads((trained_job / "summary.json").read_text())
    damaged = tmp_path / "checkpoint.pt"
    data = bytearray(Path(summary["best_checkpoint"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointCorrupt, match="does not match"):
        ckpt.load(str(damaged), summary["best_checkpoint_sha256"])


def test_killed_run_resumes_from_its_checkpoint(ray_head, cifar_parquet, tmp_path):
    job_dir = make_job_dir(tmp_path, "resume", {"data.train": str(cifar_parquet), "optim.epochs": 5, **PACED})
    proc = start_run(job_dir, paced(ray_head.env()))
    wait_for_checkpoint(proc, job_dir, epoch=2)
    assert proc.poll() is None, "the run finished before it could be stopped: " + log_tail(job_dir)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its Ray Train workers die with it
    proc.wait()
    stopped_at = json.loads((job_dir / "manifest.json").read_text())["latest_epoch"]
    assert stopped_at < 5

    assert run(job_dir, ray_head.env()) == 0, log_tail(job_dir)  # unpaced: nothing to outlive now
    metrics = read_jsonl(job_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]  # every epoch exactly once
    resumed = [m["epoch"] for m in metrics if m["resumed"]]
    # it continued right after the last checkpoint the manifest recorded: no finished epoch was lost
    assert resumed == [stopped_at + 1], (resumed, stopped_at)
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded" and summary["epochs_completed"] == 5


def test_bad_data_fails_fast_as_a_user_error(ray_head, tmp_path):
    job_dir = make_job_dir(tmp_path, "baddata", {"data.train": str(tmp_path / "missing.parquet")})
    assert run(job_dir, ray_head.env(), timeout=120) == 2
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["state"] == "failed" and summary["error_kind"] == "user"
    assert "missing.parquet" in summary["error"]


def test_forwarded_env_leaves_out_what_the_ray_job_already_sets(monkeypatch):
    # A Ray Job's driver refuses a ray.init runtime_env that repeats one of the job's own env vars.
    from trainer.run import forwarded_env

    monkeypatch.setenv("TRAINCTL_S3_ENDPOINT", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert {"TRAINCTL_S3_ENDPOINT", "AWS_REGION"} <= set(forwarded_env())
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"env_vars": {"TRAINCTL_S3_ENDPOINT": "http://127.0.0.1:8333"}}, "metadata": {}}),
    )
    env = forwarded_env()
    assert "TRAINCTL_S3_ENDPOINT" not in env and env["AWS_REGION"] == "eu-west-1"


def test_forwarded_env_holds_no_secret(monkeypatch):
    # Ray shows a job's runtime env on its dashboard: credentials reach workers through the AWS chain on the
    # nodes (instance profile, or the Ray processes' own environment), never through it.
    from trainer.run import forwarded_env

    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAKEY",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "sess",
        "TRAINCTL_TOKEN": "tc_admin",
        "TRAINCTL_ADMIN_TOKEN": "tc_admin2",
        "AWS_PROFILE": "prod",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TRAINCTL_S3_ENDPOINT", "http://127.0.0.1:8333")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = forwarded_env()
    assert env["TRAINCTL_S3_ENDPOINT"] == "http://127.0.0.1:8333"
    assert not set(secrets) & set(env) and not set(secrets.values()) & set(env.values())


def test_every_rank_names_its_device_and_the_numerics_are_recorded(trained_job):
    metrics = read_jsonl(trained_job / "metrics.jsonl")
    for m in metrics:
        # the debug preset: 2 CPU workers, 1 CPU each → one thread each
        assert len(m["devices"]) == 2 and all(d.startswith("cpu (1 threads, ") for d in m["devices"]), m["devices"]
        # precision pinned to fp32 by the preset; the layout (auto) was timed on the job's own model and batch
        n = m["numerics"]
        assert n["precision"] == "fp32" and n["chosen_by"] == "measured", n
        assert set(n["images_per_s"]) == {"fp32", "fp32+channels_last"} and n["channels_last"] in (True, False)
    state = ckpt.load(json.loads((trained_job / "summary.json").read_text())["best_checkpoint"])
    assert state["numerics"] == {"precision": "fp32", "channels_last": metrics[0]["numerics"]["channels_last"]}
