"""spec tracking (trainer/tracking.py; no Ray): runs logged into a real local MLflow store and a real W&B offline run
(read back from W&B's own files), epochs as metrics.jsonl grows, and a retried attempt continuing the same runs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainer import contract, tracking
from trainer.contract import EpochMetrics, RunState, Summary
from trainer.spec import resolve
from trainer.tracking import log_run
from trainer.tracking_wandb import OFFLINE_ENV

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (mlflow-skinny) is not installed")
HAS_WANDB = importlib.util.find_spec("wandb") is not None
WANDB_ENV = [*OFFLINE_ENV, "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"]


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker modules set MLflow's and W&B's variables in the (driver) process: undone after each test."""
    for var in ["MLFLOW_ALLOW_FILE_STORE", *WANDB_ENV]:
        monkeypatch.setenv(var, os.environ.get(var, ""))


def epoch(e: int, val_acc: float | None = None) -> EpochMetrics:
    return EpochMetrics(
        epoch=e,
        train_loss=2.0 / e,
        train_acc=0.3 * e,
        val_loss=1.0,
        val_acc=0.25 * e if val_acc is None else val_acc,
        lr=0.1,
        images_per_s=500.0,
        epoch_seconds=1.0,
        time=1.7e9 + e,
    )


def write_epochs(job_dir: Path, rows: list[EpochMetrics]) -> None:
    (job_dir / contract.METRICS).write_text(contract.metrics_jsonl(rows))


def finished_run(tmp_path: Path, state: RunState = RunState.SUCCEEDED) -> tuple[Path, Summary]:
    job_dir = tmp_path / "jobs" / "job123"
    checkpoint = job_dir / "epoch_0002"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "checkpoint.pt").write_bytes(b"weights")
    write_epochs(job_dir, [epoch(1), epoch(2)])
    summary = Summary(
        state=state,
        best_val_acc=0.5,
        best_checkpoint=str(checkpoint / "checkpoint.pt"),
        best_checkpoint_epoch=2,
        epochs_completed=2,
    )
    return job_dir, summary


@pytest.mark.parametrize("store", ["sqlite", "directory"])
def test_a_run_is_logged_to_a_local_mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("TRAINCTL_DATA_ROOTS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db" if store == "sqlite" else str(tmp_path / "mlruns")
    spec = resolve("debug", {"optim.epochs": 2, "tracking": {"mlflow": {"tracking_uri": uri, "experiment": "cifar"}}})
    job_dir, summary = finished_run(tmp_path)
    run_id = log_run(spec, str(job_dir), summary)["mlflow"]
    client = MlflowClient(tracking_uri=uri if store == "sqlite" else f"file://{uri}")
    run = client.get_run(run_id)
    assert run.info.run_name == "job123" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cifar"
    assert run.data.params["optim.epochs"] == "2" and run.data.params["model.se"] == str(spec.model.se)
    assert not any(k.startswith(("tracking.", "notify.")) for k in run.data.params)
    history = client.get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert run.data.metrics["summary.best_val_acc"] == 0.5
    assert run.data.tags["trainctl.state"] == "succeeded"
    assert [a.path for a in client.list_artifacts(run_id, "best_checkpoint")] == ["best_checkpoint/checkpoint.pt"]


def test_a_broken_tracker_never_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The driver re-checks the data roots the service forwards: a store outside them is not written.
    monkeypatch.setenv("TRAINCTL_DATA_ROOTS", str(tmp_path / "datasets"))
    uri = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    spec = resolve("debug", {"tracking": {"mlflow": {"tracking_uri": uri}}})
    job_dir, summary = finished_run(tmp_path)
    assert log_run(spec, str(job_dir), summary) == {}
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "uri", ["http://mlflow.internal:5000", "sqlite:///relative.db", "relative/dir", "databricks", "s3://b/mlruns"]
)
def test_only_local_stores_are_accepted(uri: str) -> None:
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"tracking": {"mlflow": {"tracking_uri": uri}}})
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == ["tracking.mlflow.tracking_uri"]


def test_spec_without_tracking_logs_nothing(tmp_path: Path) -> None:
    job_dir, summary = finished_run(tmp_path)
    assert log_run(resolve("debug"), str(job_dir), summary) == {}
    assert json.loads(summary.model_dump_json())["state"] == "succeeded"


@pytest.mark.skipif(not HAS_WANDB, reason="the wandb extra is not installed")
def test_epochs_are_logged_as_they_come_and_a_retry_continues_the_same_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from tests.trainer.wandb_files import read_offline_runs

    monkeypatch.delenv("TRAINCTL_DATA_ROOTS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    spec = resolve(
        "debug",
        {
            "optim.epochs": 3,
            "tracking": {"mlflow": {"tracking_uri": uri}, "wandb": {"project": "cifar-runs"}},
            "notify": {"webhook": "https://hooks.example.com/x?token=s3cret"},
        },
    )
    job_dir, failed = finished_run(tmp_path, RunState.FAILED)
    client = MlflowClient(tracking_uri=uri)

    # Attempt 1: params at the start, each epoch as it appears, then it fails.
    write_epochs(job_dir, [])
    session = tracking.start(spec, str(job_dir), follow=False)
    assert session is not None and set(session.trackers) == {"mlflow", "wandb"}
    run_id = session.trackers["mlflow"].run_id
    assert client.get_run(run_id).data.params["optim.epochs"] == "3"
    for rows in ([epoch(1)], [epoch(1), epoch(2)]):
        write_epochs(job_dir, rows)
        session.poll()
        assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [r.epoch for r in rows]
    assert session.finish(failed) == {"mlflow": run_id, "wandb": "job123"}
    assert client.get_run(run_id).info.status == "FAILED"
    state = json.loads((job_dir / tracking.STATE).read_text())
    assert state["mlflow"] == {"run_id": run_id, "last_epoch": 2} and state["wandb"]["last_epoch"] == 2

    # Attempt 2 resumes from epoch 1's checkpoint: epoch 2 is redone, then 3; followed by the thread this time.
    session = tracking.start(spec, str(job_dir), follow=False)
    assert session is not None and session.trackers["mlflow"].run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    write_epochs(job_dir, [epoch(1), epoch(2, val_acc=0.9), epoch(3)])
    session.follow(interval_s=0.05)
    session.finish(failed.model_copy(update={"state": RunState.SUCCEEDED}))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc")] == [(1, 0.25), (2, 0.5), (3, 0.75)]

    # W&B: two offline-run folders (one per attempt) of one run, read back from W&B's own transaction logs.
    # (Two attempts within one second: W&B names the second folder offline-run-<same time>-job123-1.)
    folders = sorted((job_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    offline = read_offline_runs(folders)
    assert offline.run_ids == {"job123"} and offline.projects == {"cifar-runs"}
    assert offline.config["optim.epochs"] == "3" and offline.config["model.se"] == str(spec.model.se)
    assert not any(k.startswith(("tracking.", "notify.")) for k in offline.config)
    assert [(row["_step"], row["val_acc"]) for row in offline.history] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert offline.summary["best_val_acc"] == 0.5 and offline.summary["state"] == "succeeded"
    # Each attempt's end logs its best checkpoint (W&B keeps one version per distinct file) and its exit code.
    assert offline.artifacts == ["job123-best"] * 2 and offline.exit_codes == [1, 0]
    assert "s3cret" not in "".join(p.read_text(errors="replace") for p in job_dir.rglob("*") if p.is_file())
    # W&B's own config, cache and staging dirs are inside the run's folder, not the driver's home.
    assert all(os.environ[v].startswith(str(job_dir / "wandb" / ".local")) for v in WANDB_ENV if v.endswith("_DIR"))


@pytest.mark.skipif(not HAS_WANDB, reason="the wandb extra is not installed")
def test_a_wandb_dir_outside_the_data_roots_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINCTL_DATA_ROOTS", str(tmp_path / "datasets"))
    spec = resolve("debug", {"tracking": {"wandb": {"dir": str(tmp_path / "elsewhere")}}})
    job_dir, summary = finished_run(tmp_path)
    assert log_run(spec, str(job_dir), summary) == {}
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("wandb", "field"),
    [
        ({"mode": "online"}, "tracking.wandb.mode"),
        ({"project": "p" * 129}, "tracking.wandb.project"),
        ({"project": "team/proj"}, "tracking.wandb.project"),
        ({"dir": "relative/wandb"}, "tracking.wandb.dir"),
        ({"dir": "/data/../etc"}, "tracking.wandb.dir"),
        ({"entity": "someone"}, "tracking.wandb.entity"),
    ],
)
def test_bad_wandb_sections_name_the_field(wandb: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"tracking": {"wandb": wandb}})
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [field]


def test_an_offline_run_written_for_an_s3_job_dir_is_copied_there(tmp_path: Path) -> None:
    # With an S3 job dir the run is written to a local scratch dir, then copied file by file (objstore, here
    # onto a local path) without W&B's own cache, and the scratch dir removed.
    from trainer.tracking_wandb import _upload, run_root

    scratch, upload_to = run_root(resolve("debug", {"tracking": {"wandb": {}}}).tracking.wandb, "s3://bucket/jobs/j1")
    assert upload_to == "s3://bucket/jobs/j1" and Path(scratch).is_dir()
    run_file = Path(scratch) / "wandb" / "offline-run-20261206_000000-j1" / "run-j1.wandb"
    run_file.parent.mkdir(parents=True)
    run_file.write_bytes(b":W&B")
    (Path(scratch) / "wandb" / ".local" / "cache").mkdir(parents=True)
    (Path(scratch) / "wandb" / ".local" / "cache" / "x").write_text("cache")
    _upload(Path(scratch) / "wandb", str(tmp_path / "job" / "wandb"))
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        Path("job/wandb/offline-run-20261206_000000-j1/run-j1.wandb")
    ]
    assert not Path(scratch).exists()
