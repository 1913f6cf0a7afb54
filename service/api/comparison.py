"""Runs side by side: what differs between their specs, their final and best metrics, and their curves.

One module for every view of a comparison: GET /v1/compare (which `trainctl compare` prints) and the
dashboard's comparison page read `compare()`'s answer, and GET /v1/compare.png draws the same series with
matplotlib (service/api/plotting.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from service.engine.notify import shown_spec
from service.engine.store import Job
from trainer.contract import EpochMetrics, Summary

MIN_JOBS, MAX_JOBS = 2, 5
# The per-epoch values a comparison carries (the curves it overlays).
SERIES_KEYS = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc")


class SpecDifference(BaseModel):
    path: str = Field(description="a dotted spec path, e.g. optim.lr")
    values: list[Any] = Field(description="each job's value, in the order of `jobs` (null: not set)")


class ComparedJob(BaseModel):
    id: str
    name: str | None
    state: str
    epochs_done: int
    final: dict[str, float | None] = Field(description="the last finished epoch's metrics")
    best: dict[str, float | int | None] = Field(
        description="best val_acc and its epoch, best test_acc over the epochs, and the best checkpoint's test_acc"
    )
    series: dict[str, list[float | None]] = Field(
        description="per epoch (`epoch` holds the epoch numbers): " + ", ".join(SERIES_KEYS)
    )


class Comparison(BaseModel):
    jobs: list[ComparedJob]
    spec_differences: list[SpecDifference] = Field(description="only the paths whose values are not all equal")


def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 0.1}}` → `{"optim.lr": 0.1}` (lists are values, compared whole)."""
    if not isinstance(spec, dict):
        return {prefix: spec}
    out: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def spec_differences(specs: Sequence[dict[str, Any]]) -> list[SpecDifference]:
    flat = [flatten(s) for s in specs]
    paths = sorted(set().union(*flat))
    diffs = []
    for path in paths:
        values = [f.get(path) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diffs.append(SpecDifference(path=path, values=values))
    return diffs


def _best(metrics: Sequence[EpochMetrics], key: str) -> EpochMetrics | None:
    scored = [m for m in metrics if getattr(m, key, None) is not None]
    return max(scored, key=lambda m: getattr(m, key)) if scored else None


def compared_job(job: Job, metrics: Sequence[EpochMetrics], summary: Summary | None) -> ComparedJob:
    last = metrics[-1] if metrics else None
    series: dict[str, list[float | None]] = {"epoch": [float(m.epoch) for m in metrics]}
    series.update({k: [getattr(m, k, None) for m in metrics] for k in SERIES_KEYS})
    best_val = _best(metrics, "val_acc")
    best_test = _best(metrics, "test_acc")
    return ComparedJob(
        id=job.id,
        name=job.name,
        state=job.state.value,
        epochs_done=len(metrics),
        final={k: getattr(last, k, None) for k in ("train_loss", "val_loss", "val_acc", "test_acc")},
        best={
            "val_acc": best_val.val_acc if best_val else None,
            "val_acc_epoch": best_val.epoch if best_val else None,
            "test_acc": getattr(best_test, "test_acc", None),
            "checkpoint_test_acc": summary.best_checkpoint_test_acc if summary else None,
        },
        series=series,
    )


def compare(
    jobs: Sequence[Job], metrics: Sequence[Sequence[EpochMetrics]], summaries: Sequence[Summary | None]
) -> Comparison:
    return Comparison(
        jobs=[compared_job(j, m, s) for j, m, s in zip(jobs, metrics, summaries, strict=True)],
        spec_differences=spec_differences([shown_spec(j.spec) for j in jobs]),
    )


def parse_ids(text: str) -> list[str]:
    """`a,b,c` → distinct ids in order; ValueError saying what is wrong."""
    ids = list(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    if not MIN_JOBS <= len(ids) <= MAX_JOBS:
        raise ValueError(f"give {MIN_JOBS} to {MAX_JOBS} distinct job ids, comma-separated (got {len(ids)})")
    return ids


def label(job: ComparedJob) -> str:
    return f"{job.name} ({job.id[:8]})" if job.name else job.id
