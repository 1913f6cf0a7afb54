"""Schedule / hyperparameter searches: Ray Tune over whole Ray Train runs (the Train-V2 pattern).

Each Tune trial is a small driver function that resolves the trial's spec (the job's spec plus the sampled
values) and fits its own TorchTrainer, whose TuneReportCallback forwards every epoch's metrics to Tune so
ASHA can stop bad trials early. Each trial writes the same files as a single run, under
`<job dir>/trials/<trial id>/`; at the end the best trial's manifest and metrics become the job's, so
`summary.json` and the best-checkpoint download work the same as for single runs. `trials.json` is kept
current while the search runs.

Ray 2.60 leaks the placement group of a finished Train-in-Tune trial, so the trial driver reserves only a
sliver of CPU and concurrency defaults to 1: the session cluster keeps spare logical CPUs for the leak.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import objstore
from trainer.spec import Choice, Distribution, Grid, JobSpec, LogUniform, RandInt, SearchSpec, Uniform, resolve

if TYPE_CHECKING:
    from ray.tune import Callback, ResultGrid
    from ray.tune.search.sample import Domain

TRIAL_DRIVER_CPUS = 0.1


def to_tune_domain(dist: Distribution) -> Domain | dict[str, Any]:
    """A Tune search domain (a grid is Tune's `{"grid_search": [...]}` marker dict)."""
    from ray import tune
    if isinstance(dist, LogUniform):
        return tune.loguniform(*dist.loguniform)
    if isinstance(dist, Uniform):
        return tune.uniform(*dist.uniform)
    if isinstance(dist, RandInt):
        return tune.randint(*dist.randint)
    if isinstance(dist, Choice):
        return tune.choice(dist.choice)
    if isinstance(dist, Grid):
        return tune.grid_search(dist.grid)
    raise TypeError(f"unsupported distribution {dist!r}")


def trial_spec(spec: JobSpec, sampled: dict[str, Any]) -> JobSpec:
    """The job's spec with the trial's sampled values, and without the search section."""
    return resolve(base=spec.model_dump(mode="json", exclude={"search"}), overrides=sampled)


class TrialBook:
    """trials.json, rewritten whenever a trial starts, reports or ends (read by the service)."""

    def __init__(self, job_dir: str, search: SearchSpec, epochs: int):
        self.uri = objstore.join(job_dir, "trials.json")
        self.search, self.epochs = search, epochs
        self.trials: dict[str, dict[str, Any]] = {}
        if objstore.exists(self.uri):  # a restored search keeps the trials it already ran
            self.trials = {row["trial_id"]: row for row in json.loads(objstore.read_text(self.uri))}

    def update(self, trial_id: str, **fields: Any) -> None:
        # Tune calls its callbacks from its single driver loop: no locking needed (and Tune pickles them).
        row = self.trials.setdefault(trial_id, {"trial_id": trial_id, "config": {}, "state": "pending",
                                                 "epochs": 0, "best_metric": None, "stopped_early": False,
                                                 "error": None})
        row.update(fields)
        objstore.write_text(self.uri, json.dumps(list(self.trials.values()), indent=2))

    def reconcile(self, grid: ResultGrid) -> None:
        """Bring every row up to date from Tune's final results (callbacks can miss events on restore)."""
        for result in grid:
            metrics = result.metrics or {}
            trial_id = metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
            frame = result.metrics_dataframe
            best = None
            if frame is not None and self.search.metric in frame:
                column = frame[self.search.metric].dropna()
                if len(column):
                    best = float(column.max() if self.search.mode == "max" else column.min())
            epochs = int(metrics.get("epoch", self.trials.get(trial_id, {}).get("epochs", 0)))
            if result.error is not None:
                self.update(trial_id, config=dict(result.config or {}), state="failed", epochs=epochs,
                            best_metric=best, error=str(result.error)[-2000:])
            else:
                early = epochs < self.epochs
                self.update(trial_id, config=dict(result.config or {}), epochs=epochs, best_metric=best,
                            state="stopped_early" if early else "succeeded", stopped_early=early)

    def better(self, a: float | None, b: float | None) -> bool:
        if b is None:
            return a is not None
        if a is None:
            return False
        return a > b if self.search.mode == "max" else a < b


def make_callback(book: TrialBook) -> Callback:
    from ray.tune import Callback

    class TrialBookCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
            book.update(trial.trial_id, config=dict(trial.config), state="running")

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            value = result.get(book.search.metric)
            best = book.trials.get(trial.trial_id, {}).get("best_metric")
            book.update(trial.trial_id, epochs=int(result.get("epoch", 0)),
                        best_metric=value if book.better(value, best) else best)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
            done = book.trials.get(trial.trial_id, {}).get("epochs", 0)
            early = done < book.epochs
            book.update(trial.trial_id, state="stopped_early" if early else "succeeded", stopped_early=early)

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
            book.update(trial.trial_id, state="failed", error=str(getattr(trial, "error_msg", "")
                                                                     or "trial failed")[-2000:])

    return TrialBookCallback()


def fit_search(spec: JobSpec, job_dir: str) -> dict[str, Any]:
    """Run the search; make the best trial's checkpoint the job's. Returns fields for summary.json."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from trainer.fit import fit_run

    assert spec.search is not None
    search, job_id = spec.search, job_dir.rstrip("/").rsplit("/", 1)[-1]
    spec_json = spec.model_dump_json()

    def trial(config: dict[str, Any]) -> None:
        # Runs inside a Tune trial actor: it owns one TorchTrainer run, under trials/<trial id>/.
        run_spec = trial_spec(JobSpec.model_validate_json(spec_json), config)
        trial_id = tune.get_context().get_trial_id()
        fit_run(run_spec, objstore.join(job_dir, "trials", trial_id), name=f"{job_id}-{trial_id}",
                callbacks=[TuneReportCallback()])

    scheduler = None
    if search.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=search.scheduler.max_t or spec.optim.epochs,
                                  grace_period=search.scheduler.grace_period,
                                  reduction_factor=search.scheduler.reduction_factor)
    book = TrialBook(job_dir, search, spec.optim.epochs)
    storage_path, filesystem = objstore.ray_storage(objstore.join(job_dir, "tune"))
    trainable = tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPUS})
    experiment = objstore.join(storage_path, job_id) if filesystem is None else f"{storage_path}/{job_id}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        # The driver died mid-search: finish the unfinished trials (each resumes from its checkpoint).
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={path: to_tune_domain(d) for path, d in search.space.items()},
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                        max_concurrent_trials=search.max_concurrent_trials, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=search.seed,
                                                                         max_concurrent=search.max_concurrent_trials)),
            run_config=tune.RunConfig(name=job_id, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[make_callback(book)]),
        )
    grid = tuner.fit()
    book.reconcile(grid)
    return promote_best_trial(job_dir, book, grid)


def promote_best_trial(job_dir: str, book: TrialBook, grid: ResultGrid) -> dict[str, Any]:
    """Copy the best trial's manifest and metrics to the job level and name it in the summary."""
    from trainer import checkpoint as ckpt
    best_id, best_value = None, None
    for row in book.trials.values():
        if row["state"] != "failed" and book.better(row["best_metric"], best_value):
            best_id, best_value = row["trial_id"], row["best_metric"]
    if best_id is None:
        errors = [r.error for r in grid if r.error is not None]
        raise RuntimeError(f"every trial of the search failed; first error: {errors[0] if errors else 'unknown'}")
    trial_dir = objstore.join(job_dir, "trials", best_id)
    manifest = ckpt.read_manifest(trial_dir)
    objstore.write_text(objstore.join(job_dir, "manifest.json"), json.dumps(manifest, indent=2))
    objstore.write_text(objstore.join(job_dir, "metrics.jsonl"),
                        objstore.read_text(objstore.join(trial_dir, "metrics.jsonl")))
    return {"best_trial": best_id, "best_config": book.trials[best_id]["config"],
            "search_metric": book.search.metric, "best_metric": best_value,
            "trials": {"total": len(book.trials),
                       "stopped_early": sum(r["stopped_early"] for r in book.trials.values()),
                       "failed": sum(r["state"] == "failed" for r in book.trials.values())}}
