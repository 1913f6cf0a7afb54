"""spec `tracking.mlflow` (the `mlflow` extra): one MLflow run per job, through MLflow's client (trainer/tracking.py
says when each part is logged).

The store is local (the service checks it lies under the data roots, and the driver checks again with the roots
the service forwards): `sqlite:////ABS/PATH.db` (MLflow's recommended store), or a directory (MLflow's file
store, which MLflow 3 keeps only behind MLFLOW_ALLOW_FILE_STORE: set here for that one store).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import objstore
from trainer.contract import EpochMetrics, Summary
from trainer.dataroots import allowed_roots
from trainer.spec import MlflowSpec, mlflow_store_path
from trainer.tracking import numeric_metrics, summary_figures

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("trainer.tracking")

PARAMS_PER_CALL = 100  # MLflow's limit per log_batch call
METRICS_PER_CALL = 1000
DONE_KEY = "train_loss"  # every epoch has it: its history says which epochs this run already has


class MlflowRun:
    def __init__(self, client: MlflowClient, run_id: str, where: str) -> None:
        self.client = client
        self.run_id = run_id
        self.where = where

    def log_epochs(self, rows: list[EpochMetrics]) -> None:
        from mlflow.entities import Metric

        points = [
            Metric(key, value, int(row.time * 1000), row.epoch)
            for row in rows
            for key, value in numeric_metrics(row).items()
        ]
        for i in range(0, len(points), METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=points[i : i + METRICS_PER_CALL])

    def finish(self, summary: Summary, job_dir: str) -> None:
        from mlflow.entities import Metric

        figures = summary_figures(summary)
        self.client.log_batch(self.run_id, metrics=[Metric(f"summary.{k}", v, 0, 0) for k, v in figures.items()])
        self.client.set_tag(self.run_id, "trainctl.state", summary.state.value)
        if summary.best_checkpoint is not None:
            self.client.set_tag(self.run_id, "trainctl.best_checkpoint", summary.best_checkpoint)
            checkpoint = summary.best_checkpoint.rsplit("/", 1)[0]  # the best epoch's checkpoint directory
            if not objstore.is_s3(checkpoint) and Path(checkpoint).is_dir():
                self.client.log_artifacts(self.run_id, checkpoint, "best_checkpoint")
        self.client.set_terminated(self.run_id, "FINISHED" if summary.succeeded() else "FAILED")
        log.info("logged to MLflow %s, run %s", self.where, self.run_id)


def open_run(
    spec: MlflowSpec, job_id: str, job_dir: str, params: dict[str, str], run_id: str | None
) -> tuple[MlflowRun, int]:
    """The job's MLflow run: `run_id`'s (a retried attempt) when the store still has it, else a new one with
    the params; and the last epoch it already has (0: none)."""
    store = mlflow_store_path(spec.tracking_uri)
    roots = allowed_roots()
    if roots is not None and not objstore.within_any(store, roots):
        raise PermissionError(f"{spec.tracking_uri} is outside the data roots ({', '.join(roots)})")
    uri = spec.tracking_uri
    if not uri.startswith("sqlite:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store unless told
        uri = "file://" + str(Path(objstore.normalise(store)))
    else:
        Path(store).parent.mkdir(parents=True, exist_ok=True)

    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")  # (set_terminated ended the failed attempt)
            history = client.get_metric_history(run_id, DONE_KEY)
            log.info("tracking: continuing MLflow run %s", run_id)
            return MlflowRun(client, run_id, spec.tracking_uri), max((m.step for m in history), default=0)
        except MlflowException as exc:
            log.warning("tracking: MLflow run %s is gone (%s): a new run", run_id, exc)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # A database store's default artifact root is ./mlruns of whichever process asks: keep them beside it.
        artifacts = str(Path(store).parent / "mlflow-artifacts") if uri.startswith("sqlite:") else None
        experiment_id = client.create_experiment(spec.experiment, artifact_location=artifacts)
    run = client.create_run(
        experiment_id, run_name=job_id, tags={"trainctl.job_id": job_id, "trainctl.job_dir": job_dir}
    )
    new_id = run.info.run_id
    pairs = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(pairs), PARAMS_PER_CALL):
        client.log_batch(new_id, params=pairs[i : i + PARAMS_PER_CALL])
    return MlflowRun(client, new_id, spec.tracking_uri), 0
