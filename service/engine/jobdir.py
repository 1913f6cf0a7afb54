"""Reading a job directory: the service's view of what the trainer wrote. The files' shapes and the
tolerant parsers are trainer/contract.py's; this module adds the I/O. Every path goes through `objstore`; a
missing file reads as None / empty, while an unreachable storage raises `objstore.StorageUnavailable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import objstore
from trainer import contract
from trainer.contract import (
    Artifact,
    CheckpointEntry,
    Confusion,
    EpochMetrics,
    Manifest,
    Summary,
    TrialRow,
    TrialState,
)

LOGS = "logs"  # logs/attempt-N.log: each attempt's driver log, copied there by the service while it runs

# Written by the service, not the trainer: the job's record (owner, state, attempts, ...) as of its last
# transition, so that `trainctl reindex` can rebuild a lost database from storage.
RECORD = "record.json"


def job_uri(storage_root: str, job_id: str) -> str:
    return objstore.join(storage_root, "jobs", job_id)


def attempt_log_uri(job_dir: str, attempt: int) -> str:
    return objstore.join(job_dir, LOGS, f"attempt-{attempt}.log")


def read_attempt_log(job_dir: str, attempt: int) -> str | None:
    return _read_text(attempt_log_uri(job_dir, attempt))


def _read_text(uri: str) -> str | None:
    try:
        return objstore.read_text(uri)
    except FileNotFoundError:
        return None


def write_spec(job_dir: str, spec: dict[str, Any]) -> None:
    objstore.write_text(objstore.join(job_dir, contract.SPEC), json.dumps(spec, indent=2))


def delete_summary(job_dir: str) -> None:
    objstore.delete_tree(objstore.join(job_dir, contract.SUMMARY))


def write_record(job_dir: str, record: dict[str, Any]) -> None:
    objstore.write_text(objstore.join(job_dir, RECORD), json.dumps(record, indent=2))


def _read_object(uri: str) -> dict[str, Any] | None:
    """A JSON object file; None when missing or not (yet) a whole JSON object."""
    raw = _read_text(uri)
    try:
        data = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def read_record(job_dir: str) -> dict[str, Any] | None:
    return _read_object(objstore.join(job_dir, RECORD))


def read_spec(job_dir: str) -> dict[str, Any] | None:
    return _read_object(objstore.join(job_dir, contract.SPEC))


def read_summary(job_dir: str) -> Summary | None:
    return contract.parse_summary(_read_text(objstore.join(job_dir, contract.SUMMARY)))


def read_manifest(job_dir: str) -> Manifest | None:
    return contract.parse_manifest(_read_text(objstore.join(job_dir, contract.MANIFEST)))


def read_confusion(job_dir: str) -> Confusion | None:
    """confusion.json once the run wrote it, else None."""
    return contract.parse_confusion(_read_text(objstore.join(job_dir, contract.CONFUSION)))


def read_trials(job_dir: str) -> list[TrialRow]:
    """A search's trials (trials.json, kept current by the trainer while the search runs); [] before the
    first trial starts and for single runs."""
    return contract.parse_trials(_read_text(objstore.join(job_dir, contract.TRIALS)))


def read_metrics(job_dir: str) -> list[EpochMetrics]:
    """Every epoch once, ascending. A torn last line is skipped; a repeated epoch keeps its last entry."""
    return contract.parse_metrics(_read_text(objstore.join(job_dir, contract.METRICS)))


def settle_trials(trials: list[TrialRow], job_state: str) -> list[TrialRow]:
    """Trials as they stand once their job ended: one the trainer left `running`/`pending` because it was
    stopped (cancelled, or its driver died) ended with the job — `cancelled`, or `failed` — never running."""
    if job_state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        return trials
    ended = TrialState.CANCELLED if job_state == "CANCELLED" else TrialState.FAILED
    return [
        t.model_copy(update={"state": ended}) if t.state in (TrialState.RUNNING, TrialState.PENDING) else t
        for t in trials
    ]


def _absolute(job_dir: str, uri: str) -> str:
    return uri if "://" in uri or uri.startswith("/") else objstore.join(job_dir, uri)


def checkpoints(job_dir: str) -> list[CheckpointEntry]:
    """The kept checkpoints, oldest first, with absolute URIs."""
    manifest = read_manifest(job_dir) or Manifest()
    out = [c.model_copy(update={"uri": _absolute(job_dir, c.uri)}) for c in manifest.checkpoints]
    return sorted(out, key=lambda c: c.epoch)


@dataclass(frozen=True)
class BestCheckpoint:
    """What the best-checkpoint download needs: where it is and what verifies it."""

    uri: str
    sha256: str | None
    size: int | None
    epoch: int | None
    val_acc: float | None


def best_checkpoint(job_dir: str) -> BestCheckpoint | None:
    """The best checkpoint: summary.json's once the run ended, else the manifest's best so far; None while
    there is none."""
    summary = read_summary(job_dir)
    if summary and summary.best_checkpoint:
        uri = _absolute(job_dir, summary.best_checkpoint)
        match = next((c for c in checkpoints(job_dir) if c.uri == uri), None)
        return BestCheckpoint(
            uri=uri,
            sha256=summary.best_checkpoint_sha256 or (match.sha256 if match else None),
            size=summary.best_checkpoint_size or (match.size if match else None),
            epoch=match.epoch if match else None,
            val_acc=summary.best_val_acc if summary.best_val_acc is not None else (match.val_acc if match else None),
        )
    best = Manifest(checkpoints=checkpoints(job_dir)).best()
    if best is None:
        return None
    return BestCheckpoint(uri=best.uri, sha256=best.sha256, size=best.size, epoch=best.epoch, val_acc=best.val_acc)


def artifacts(job_dir: str) -> list[Artifact]:
    """The exported models (trainer/export.py), with absolute URIs; empty before the run's end or when the job
    exports nothing."""
    index = contract.parse_artifacts(_read_text(objstore.join(job_dir, contract.ARTIFACTS)))
    folder = objstore.join(job_dir, contract.ARTIFACTS_DIR)
    return [a.model_copy(update={"uri": _absolute(folder, a.uri)}) for a in index.artifacts]
