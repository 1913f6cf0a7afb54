"""spec `tracking.wandb` (the `wandb` extra): one W&B run per job, kept OFFLINE in files (trainer/tracking.py says
when each part is logged).

Offline only: the driver never talks to a W&B server. WANDB_MODE=offline and the run's settings say so; nothing
that phones home is on (no login, no code or git capture, no system stats or machine metadata, no error
reports, no console capture); W&B's config, cache, data and artifact-staging dirs are kept inside the run's
directory, so no file lands in the driver's home either. The offline run goes to `<dir>/wandb/offline-run-*`,
where dir is spec `tracking.wandb.dir` (under the data roots) or else the job's own dir; with an S3 job dir it is
written to a local scratch dir and copied to `<job dir>/wandb/` at the end. `wandb sync <that folder>` uploads it
later, from a machine that may reach W&B (README.md, "Alerts and experiment trackers").

The W&B run id is the job id: a retried attempt continues the same run (`resume="allow"`, a second offline-run
folder with the same id, which `wandb sync` uploads after the first, as one resumed run).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import objstore
from trainer.contract import EpochMetrics, Summary
from trainer.dataroots import allowed_roots
from trainer.spec import WandbSpec
from trainer.tracking import numeric_metrics, summary_figures

log = logging.getLogger("trainer.tracking")

# Set in the driver's environment before wandb is imported: the SDK and its wandb-core service read them.
OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_ERROR_REPORTING": "false",  # W&B's crash reports (Sentry) would be a request to the internet
    "WANDB_CONSOLE": "off",
}


def offline_settings() -> dict[str, Any]:
    """wandb.Settings for a run that makes no network request and captures nothing beyond what is logged."""
    return {
        "mode": "offline",
        "silent": True,
        "console": "off",  # never wrap the driver's stdout (its log is the job's log)
        "disable_code": True,
        "disable_git": True,
        "disable_job_creation": True,
        "x_disable_stats": True,  # no system-metrics sampler
        "x_disable_meta": True,  # no host/GPU/git metadata probe
        "x_disable_machine_info": True,
        "x_disable_viewer": True,  # no "who am I" request to the server
    }


class WandbRun:
    def __init__(self, run: Any, run_id: str, root: str, upload_to: str | None) -> None:
        self.run = run
        self.run_id = run_id
        self.root = root  # the folder holding wandb/offline-run-*
        self.upload_to = upload_to  # an S3 job dir to copy wandb/ into at the end, or None

    def log_epochs(self, rows: list[EpochMetrics]) -> None:
        for row in rows:
            # commit: the epoch's row is complete, write it now (with a step and no commit, W&B keeps the row
            # open until a later step or the run's end).
            self.run.log(numeric_metrics(row), step=row.epoch, commit=True)

    def finish(self, summary: Summary, job_dir: str) -> None:
        import wandb

        self.run.summary.update(
            {**summary_figures(summary), "state": summary.state.value, "epochs_completed": summary.epochs_completed}
        )
        if summary.best_checkpoint is not None:
            self.run.summary["best_checkpoint"] = summary.best_checkpoint
            if not objstore.is_s3(summary.best_checkpoint) and Path(summary.best_checkpoint).is_file():
                artifact = wandb.Artifact(
                    f"{self.run_id}-best",
                    type="model",
                    metadata={"epoch": summary.best_checkpoint_epoch, "sha256": summary.best_checkpoint_sha256},
                )
                # Immutable: referenced, not copied (a kept checkpoint never changes); `wandb sync` reads it then.
                artifact.add_file(summary.best_checkpoint, policy="immutable")
                self.run.log_artifact(artifact, aliases=["best"])
        self.run.finish(exit_code=0 if summary.succeeded() else 1)
        # run.finish() only tells W&B's service process that the run is done (a message it does not wait on);
        # the service writes out and closes the run's file on its own time. Tearing the service down waits
        # for that, so the offline run is complete before it is copied to S3 below or read: an attempt's
        # last epoch was missing from its offline run in ~1 of 4 full suite runs, under load.
        wandb.teardown()
        if self.upload_to is not None:
            _upload(Path(self.root) / "wandb", objstore.join(self.upload_to, "wandb"))
        log.info("logged to W&B offline: %s/wandb (run %s; `wandb sync` it to upload)", self.root, self.run_id)


def run_root(spec: WandbSpec, job_dir: str) -> tuple[str, str | None]:
    """(local folder for wandb/, S3 job dir to copy it to at the end or None)."""
    if spec.dir is not None:
        roots = allowed_roots()
        if roots is not None and not objstore.within_any(spec.dir, roots):
            raise PermissionError(f"tracking.wandb.dir {spec.dir} is outside the data roots ({', '.join(roots)})")
        return spec.dir, None
    if objstore.is_s3(job_dir):
        return tempfile.mkdtemp(prefix="trainctl-wandb-"), job_dir
    return job_dir, None


def open_run(spec: WandbSpec, job_id: str, job_dir: str, params: dict[str, str], run_id: str | None) -> WandbRun:
    """The job's W&B run (id = job id), resumed when a retried attempt already started it."""
    root, upload_to = run_root(spec, job_dir)
    local = Path(root) / "wandb" / ".local"  # W&B's own config/cache/staging, kept beside the runs
    os.environ.update(OFFLINE_ENV)
    for var, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        os.environ[var] = str(local / sub)
    (local / "config").mkdir(parents=True, exist_ok=True)

    import wandb

    run = wandb.init(
        project=spec.project,
        id=run_id or job_id,
        name=job_id,
        dir=root,
        config=params,
        resume="allow",
        settings=wandb.Settings(**offline_settings()),
    )
    return WandbRun(run, run.id, root, upload_to)


def _upload(folder: Path, uri: str) -> None:
    """Copy a local folder to S3 (file by file), then drop the local scratch copy."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".local" not in p.relative_to(folder).parts):
        objstore.write_bytes(objstore.join(uri, str(path.relative_to(folder))), path.read_bytes())
    shutil.rmtree(folder.parent, ignore_errors=True)
