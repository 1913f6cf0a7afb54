"""Log a finished run to an experiment tracker: spec `tracking.mlflow` (the `mlflow` extra).

At the end of a run (or search) the driver logs, into one MLflow run named after the job: every spec field as a
param (dotted paths), every epoch of metrics.jsonl as metrics at step = epoch, the summary's figures, and the
best checkpoint's files as artifacts under `best_checkpoint/`. It runs after training, from the files the run
wrote, so a tracker that is slow or broken can never slow or fail training: any error here is logged and the
run's outcome stands.

The store is local (the service checks it lies under the data roots, and the driver checks again with the roots
the service forwards): `sqlite:////ABS/PATH.db` (MLflow's recommended store), or a directory (MLflow's file
store, which MLflow 3 keeps only behind MLFLOW_ALLOW_FILE_STORE: set here for that one store).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import objstore
from trainer import contract
from trainer.contract import Summary
from trainer.dataroots import allowed_roots
from trainer.spec import JobSpec, MlflowSpec, mlflow_store_path

log = logging.getLogger("trainer.tracking")

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow's limit; metrics allow 1,000)


def flat_params(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A spec dump as (dotted path, text) pairs; lists and empty dicts stay whole (as JSON-ish text)."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from flat_params(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, str(value)[:MAX_PARAM_CHARS]


def log_run(spec: JobSpec, job_dir: str, summary: Summary) -> str | None:
    """Log the run to the spec's tracker; the MLflow run id, or None (no tracker, or it failed: logged)."""
    tracking = spec.tracking.mlflow if spec.tracking else None
    if tracking is None:
        return None
    try:
        return _log_mlflow(tracking, spec, job_dir, summary)
    except Exception as exc:  # noqa: BLE001 - a tracker never changes the run's outcome
        log.warning("could not log the run to MLflow (%s): %s: %s", tracking.tracking_uri, type(exc).__name__, exc)
        return None


def _log_mlflow(tracking: MlflowSpec, spec: JobSpec, job_dir: str, summary: Summary) -> str:
    store = mlflow_store_path(tracking.tracking_uri)
    roots = allowed_roots()
    if roots is not None and not objstore.within_any(store, roots):
        raise PermissionError(f"{tracking.tracking_uri} is outside the data roots ({', '.join(roots)})")
    uri = tracking.tracking_uri
    if not uri.startswith("sqlite:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store unless told
        uri = "file://" + str(Path(objstore.normalise(store)))
    else:
        Path(store).parent.mkdir(parents=True, exist_ok=True)

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # A database store's default artifact root is ./mlruns of whichever process asks: keep them beside it.
        artifacts = str(Path(store).parent / "mlflow-artifacts") if uri.startswith("sqlite:") else None
        experiment_id = client.create_experiment(tracking.experiment, artifact_location=artifacts)
    job_id = job_dir.rstrip("/").rsplit("/", 1)[-1]
    run = client.create_run(
        experiment_id, run_name=job_id, tags={"trainctl.job_id": job_id, "trainctl.job_dir": job_dir}
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flat_params(spec.model_dump(mode="json", exclude={"tracking", "notify"}))]
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i : i + BATCH])
    metrics_uri = objstore.join(job_dir, contract.METRICS)
    rows = contract.parse_metrics(objstore.read_text(metrics_uri)) if objstore.exists(metrics_uri) else []
    points = [
        Metric(key, float(value), int(row.time * 1000), row.epoch)
        for row in rows
        for key, value in row.model_dump().items()
        if key not in ("epoch", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
    final = {
        k: v
        for k, v in summary.model_dump().items()
        if k.startswith(("best_", "final_", "test_")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    client.log_batch(run_id, metrics=[Metric(f"summary.{k}", float(v), 0, 0) for k, v in final.items()])
    client.set_tag(run_id, "trainctl.state", summary.state.value)
    if summary.best_checkpoint is not None:
        client.set_tag(run_id, "trainctl.best_checkpoint", summary.best_checkpoint)
        checkpoint = summary.best_checkpoint.rsplit("/", 1)[0]  # the best epoch's checkpoint directory
        if not objstore.is_s3(checkpoint) and Path(checkpoint).is_dir():
            client.log_artifacts(run_id, checkpoint, "best_checkpoint")
    client.set_terminated(run_id, "FINISHED" if summary.succeeded() else "FAILED")
    log.info("logged to MLflow %s, experiment %r, run %s", tracking.tracking_uri, tracking.experiment, run_id)
    return run_id
