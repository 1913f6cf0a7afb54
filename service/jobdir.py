"""Reading a job directory (see docs/architecture.md, "The job directory"): the service's view of what the
trainer wrote. Every path goes through `objstore`; a missing file reads as None / empty, while an
unreachable storage raises `objstore.StorageUnavailable`.
"""

from __future__ import annotations

import json
from typing import Any

import objstore
from trainer.spec import SearchSpec

SPEC, METRICS, MANIFEST, SUMMARY = "spec.json", "metrics.jsonl", "manifest.json", "summary.json"
TRIALS = "trials.json"  # searches only
# Written by the service, not the trainer: the job's record (owner, state, attempts, ...) as of its last
# transition, so that `trainctl reindex` can rebuild a lost database from storage.
RECORD = "record.json"


def job_uri(storage_root: str, job_id: str) -> str:
    return objstore.join(storage_root, "jobs", job_id)


def _read_text(uri: str) -> str | None:
    try:
        return objstore.read_text(uri)
    except FileNotFoundError:
        return None


def read_json(uri: str) -> Any | None:
    raw = _read_text(uri)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None  # written by a non-atomic writer and caught half-way: read it again next time


def write_spec(job_dir: str, spec: dict[str, Any]) -> None:
    objstore.write_text(objstore.join(job_dir, SPEC), json.dumps(spec, indent=2))


def write_record(job_dir: str, record: dict[str, Any]) -> None:
    objstore.write_text(objstore.join(job_dir, RECORD), json.dumps(record, indent=2))


def read_record(job_dir: str) -> dict[str, Any] | None:
    data = read_json(objstore.join(job_dir, RECORD))
    return data if isinstance(data, dict) else None


def read_spec(job_dir: str) -> dict[str, Any] | None:
    data = read_json(objstore.join(job_dir, SPEC))
    return data if isinstance(data, dict) else None


def read_summary(job_dir: str) -> dict[str, Any] | None:
    data = read_json(objstore.join(job_dir, SUMMARY))
    return data if isinstance(data, dict) else None


def read_manifest(job_dir: str) -> dict[str, Any] | None:
    data = read_json(objstore.join(job_dir, MANIFEST))
    return data if isinstance(data, dict) else None


def read_trials(job_dir: str) -> list[dict[str, Any]]:
    """A search's trials (trials.json, kept current by the trainer while the search runs); [] before the
    first trial starts and for single runs."""
    data = read_json(objstore.join(job_dir, TRIALS))
    return [t for t in data if isinstance(t, dict) and t.get("trial_id")] if isinstance(data, list) else []


def search_progress(search: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """{trials_total, trials_finished, trials_running, stopped_early, best_trial, best_metric, metric}."""
    spec = SearchSpec.model_validate(search)
    finished = [t for t in trials if t.get("state") in ("succeeded", "stopped_early", "failed")]
    scored = [t for t in trials if isinstance(t.get("best_metric"), (int, float)) and t.get("state") != "failed"]
    pick = max if spec.mode == "max" else min
    best = pick(scored, key=lambda t: t["best_metric"]) if scored else None
    return {"trials_total": spec.total_trials(), "trials_finished": len(finished),
            "trials_running": sum(t.get("state") == "running" for t in trials),
            "stopped_early": sum(bool(t.get("stopped_early")) for t in trials),
            "best_trial": best["trial_id"] if best else None,
            "best_metric": best["best_metric"] if best else None, "metric": spec.metric}


def read_metrics(job_dir: str) -> list[dict[str, Any]]:
    """Every epoch once, ascending. A torn last line is skipped; a repeated epoch keeps its last entry."""
    raw = _read_text(objstore.join(job_dir, METRICS))
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in (raw or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def progress(metrics: list[dict[str, Any]], epochs: int | None, finished: bool) -> dict[str, Any]:
    """{epoch, epochs, eta_seconds}: the ETA is the mean `epoch_seconds` of the last (up to 3) epochs times
    the epochs left (recent epochs track the current cluster); None until one epoch finished."""
    epoch = metrics[-1]["epoch"] if metrics else 0
    eta: float | None = None
    if finished:
        eta = 0.0 if metrics else None
    elif metrics and epochs:
        recent = [m.get("epoch_seconds") for m in metrics[-3:]]
        times = [float(t) for t in recent if isinstance(t, (int, float)) and t > 0]
        if times:
            eta = round(sum(times) / len(times) * max(epochs - epoch, 0), 1)
    return {"epoch": epoch, "epochs": epochs, "eta_seconds": eta}


def _absolute(job_dir: str, uri: str) -> str:
    return uri if "://" in uri or uri.startswith("/") else objstore.join(job_dir, uri)


def checkpoints(job_dir: str) -> list[dict[str, Any]]:
    manifest = read_manifest(job_dir) or {}
    out = []
    for c in manifest.get("checkpoints") or []:
        if isinstance(c, dict) and c.get("uri"):
            out.append({"epoch": c.get("epoch"), "val_acc": c.get("val_acc"), "size": c.get("size"),
                        "sha256": c.get("sha256"), "uri": _absolute(job_dir, str(c["uri"]))})
    return sorted(out, key=lambda c: (c["epoch"] is None, c["epoch"]))


def best_checkpoint(job_dir: str) -> dict[str, Any] | None:
    """{uri, sha256, size, epoch, val_acc} of the best checkpoint: summary.json's once the run ended,
    else the manifest's highest val_acc so far; None while there is none."""
    summary = read_summary(job_dir)
    if summary and summary.get("best_checkpoint"):
        uri = _absolute(job_dir, str(summary["best_checkpoint"]))
        match = next((c for c in checkpoints(job_dir) if c["uri"] == uri), {})
        return {"uri": uri, "sha256": summary.get("best_checkpoint_sha256") or match.get("sha256"),
                "size": summary.get("best_checkpoint_size") or match.get("size"),
                "epoch": match.get("epoch"), "val_acc": summary.get("best_val_acc", match.get("val_acc"))}
    ranked = [c for c in checkpoints(job_dir) if isinstance(c.get("val_acc"), (int, float))]
    if not ranked:
        return None
    return max(ranked, key=lambda c: (c["val_acc"], c["epoch"] or 0))
