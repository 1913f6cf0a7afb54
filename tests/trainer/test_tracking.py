"""spec tracking.mlflow: a finished run logged into a real local MLflow store (trainer/tracking.py; no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainer import contract
from trainer.contract import EpochMetrics, RunState, Summary
from trainer.spec import resolve
from trainer.tracking import log_run

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (mlflow-skinny) is not installed")


def finished_run(tmp_path: Path) -> tuple[Path, Summary]:
    job_dir = tmp_path / "jobs" / "job123"
    checkpoint = job_dir / "epoch_0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.pt").write_bytes(b"weights")
    rows = [
        EpochMetrics(
            epoch=e,
            train_loss=2.0 / e,
            train_acc=0.3 * e,
            val_loss=1.0,
            val_acc=0.25 * e,
            lr=0.1,
            images_per_s=500.0,
            epoch_seconds=1.0,
            time=1.7e9 + e,
        )
        for e in (1, 2)
    ]
    (job_dir / contract.METRICS).write_text("".join(r.model_dump_json() + "\n" for r in rows))
    summary = Summary(
        state=RunState.SUCCEEDED,
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
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # (undone after the test: the module sets it for a file store)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db" if store == "sqlite" else str(tmp_path / "mlruns")
    spec = resolve("debug", {"optim.epochs": 2, "tracking": {"mlflow": {"tracking_uri": uri, "experiment": "cifar"}}})
    job_dir, summary = finished_run(tmp_path)
    run_id = log_run(spec, str(job_dir), summary)
    assert run_id is not None
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
    assert log_run(spec, str(job_dir), summary) is None
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
    assert log_run(resolve("debug"), str(job_dir), summary) is None
    assert json.loads(summary.model_dump_json())["state"] == "succeeded"
