"""Log a run to experiment trackers: spec `tracking.mlflow` (the `mlflow` extra, trainer/tracking_mlflow.py) and
`tracking.wandb` (the `wandb` extra, offline only, trainer/tracking_wandb.py).

When: every spec field as a param (dotted paths) at the run's start; each epoch's metrics (step = epoch) as rank 0
writes them into metrics.jsonl, which a thread of the driver follows (every POLL_S); at the end the summary's
figures and the best checkpoint. All of it happens in the driver, from the files the run writes, so a tracker
that is slow or broken never slows or fails training: its errors are logged, the tracker is dropped, and the
run's outcome stands. (A search logs at its end only: its epochs reach the job's metrics.jsonl then.)

A retried attempt (the service reruns the same job dir after a failure) continues the same tracker runs:
<job dir>/tracking.json keeps each tracker's run id and the last epoch it logged, and epochs up to that one are
not logged again — a redone epoch keeps the numbers first logged (metrics.jsonl holds the final ones).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import objstore
from trainer import contract
from trainer.contract import EpochMetrics, Summary
from trainer.spec import JobSpec

log = logging.getLogger("trainer.tracking")

STATE = "tracking.json"  # {tracker name: {"run_id": ..., "last_epoch": N, ...}} in the job dir
POLL_S = 2.0  # how often the driver looks for new epochs in metrics.jsonl
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class Tracker(Protocol):
    """One tracker's run, opened (created or resumed) by its module's `open_run`."""

    run_id: str

    def log_epochs(self, rows: list[EpochMetrics]) -> None: ...

    def finish(self, summary: Summary, job_dir: str) -> None: ...


def flat_params(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A spec dump as (dotted path, text) pairs; lists and empty dicts stay whole (as JSON-ish text)."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from flat_params(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, str(value)[:MAX_PARAM_CHARS]


def run_params(spec: JobSpec) -> dict[str, str]:
    """The params every tracker gets: the spec, less the tracking and notify sections (a webhook may carry a
    token)."""
    return dict(flat_params(spec.model_dump(mode="json", exclude={"tracking", "notify"})))


def numeric_metrics(row: EpochMetrics) -> dict[str, float]:
    """An epoch's numbers (not epoch/time, not lists or text)."""
    return {
        key: float(value)
        for key, value in row.model_dump().items()
        if key not in ("epoch", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def summary_figures(summary: Summary) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in summary.model_dump().items()
        if k.startswith(("best_", "final_", "test_")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Session:
    """The run's trackers, from `start` to `finish`; a thread logs new epochs in between."""

    def __init__(self, job_dir: str, trackers: dict[str, Tracker], state: dict[str, dict[str, Any]]) -> None:
        self.job_dir = job_dir
        self.trackers = trackers
        self.state = state
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, interval_s: float = POLL_S) -> None:
        """Log new epochs every interval_s from a daemon thread, until `finish`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._thread = threading.Thread(target=loop, name="tracking", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Log the epochs of metrics.jsonl that each tracker has not logged yet."""
        with self._lock:
            try:
                uri = objstore.join(self.job_dir, contract.METRICS)
                rows = contract.parse_metrics(objstore.read_text(uri)) if objstore.exists(uri) else []
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next poll tries again
                log.warning("tracking: could not read metrics.jsonl: %s: %s", type(exc).__name__, exc)
                return
            changed = False
            for name, tracker in list(self.trackers.items()):
                last = int(self.state[name].get("last_epoch", 0))
                new = [row for row in rows if row.epoch > last]
                if not new:
                    continue
                try:
                    tracker.log_epochs(new)
                except Exception as exc:  # noqa: BLE001 - a tracker never changes the run's outcome
                    self._drop(name, "log epochs", exc)
                    continue
                self.state[name]["last_epoch"] = new[-1].epoch
                changed = True
            if changed:
                self._save()

    def finish(self, summary: Summary) -> dict[str, str]:
        """Log the last epochs, the summary and the best checkpoint, and close every tracker's run; returns
        {tracker: run id} of those that finished."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.poll()
        done = {}
        with self._lock:
            for name, tracker in list(self.trackers.items()):
                try:
                    tracker.finish(summary, self.job_dir)
                    done[name] = tracker.run_id
                except Exception as exc:  # noqa: BLE001 - a tracker never changes the run's outcome
                    self._drop(name, "finish", exc)
        return done

    def _drop(self, name: str, what: str, exc: Exception) -> None:
        log.warning("tracking: %s could not %s, and logs nothing more: %s: %s", name, what, type(exc).__name__, exc)
        self.trackers.pop(name, None)

    def _save(self) -> None:
        try:
            objstore.write_text(objstore.join(self.job_dir, STATE), json.dumps(self.state, indent=2))
        except Exception as exc:  # noqa: BLE001 - losing it costs a duplicate epoch after a retry, nothing more
            log.warning("tracking: could not write %s: %s: %s", STATE, type(exc).__name__, exc)


def read_state(job_dir: str) -> dict[str, dict[str, Any]]:
    uri = objstore.join(job_dir, STATE)
    try:
        state = json.loads(objstore.read_text(uri)) if objstore.exists(uri) else {}
    except Exception as exc:  # noqa: BLE001 - unreadable (or storage down): new runs rather than no tracking
        log.warning("tracking: ignoring an unreadable %s (%s): new tracker runs", STATE, exc)
        return {}
    return {k: v for k, v in state.items() if isinstance(v, dict)} if isinstance(state, dict) else {}


def start(spec: JobSpec, job_dir: str, follow: bool = True) -> Session | None:
    """Open (or, on a retried attempt, resume) the spec's trackers and log the params of new runs; None when
    the spec has no tracker. Never raises: a tracker that cannot open is logged and left out."""
    if spec.tracking is None:
        return None
    job_dir = job_dir.rstrip("/")
    job_id = job_dir.rsplit("/", 1)[-1]
    state = read_state(job_dir)
    params = run_params(spec)
    trackers: dict[str, Tracker] = {}
    if spec.tracking.mlflow is not None:
        try:
            from trainer.tracking_mlflow import open_run as open_mlflow

            previous = state.get("mlflow", {})
            tracker, logged = open_mlflow(spec.tracking.mlflow, job_id, job_dir, params, previous.get("run_id"))
            trackers["mlflow"] = tracker
            kept = previous.get("last_epoch", 0) if previous.get("run_id") == tracker.run_id else 0
            state["mlflow"] = {"run_id": tracker.run_id, "last_epoch": max(logged, kept)}
        except Exception as exc:  # noqa: BLE001 - a tracker never changes the run's outcome
            log.warning("tracking: could not open the MLflow run: %s: %s", type(exc).__name__, exc)
    if spec.tracking.wandb is not None:
        try:
            from trainer.tracking_wandb import open_run as open_wandb

            previous = state.get("wandb", {})
            wandb_tracker = open_wandb(spec.tracking.wandb, job_id, job_dir, params, previous.get("run_id"))
            trackers["wandb"] = wandb_tracker
            resumed = previous.get("run_id") == wandb_tracker.run_id
            state["wandb"] = {
                "run_id": wandb_tracker.run_id,
                "dir": wandb_tracker.root,
                "last_epoch": previous.get("last_epoch", 0) if resumed else 0,
            }
        except Exception as exc:  # noqa: BLE001 - a tracker never changes the run's outcome
            log.warning("tracking: could not open the W&B run: %s: %s", type(exc).__name__, exc)
    session = Session(job_dir, trackers, state)
    session._save()
    if follow:
        session.follow()
    return session


def log_run(spec: JobSpec, job_dir: str, summary: Summary) -> dict[str, str]:
    """Start and finish at once (a run that was not followed): {tracker: run id} of those that logged it."""
    session = start(spec, job_dir, follow=False)
    return session.finish(summary) if session is not None else {}
