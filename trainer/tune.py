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

from typing import TYPE_CHECKING, Any

import objstore
from trainer import contract
from trainer.contract import SearchOutcome, TrialCounts, TrialRow, TrialState
from trainer.spec import Choice, Distribution, Grid, JobSpec, LogUniform, RandInt, SearchSpec, Uniform, resolve

if TYPE_CHECKING:
    from ray.tune import Callback, ResultGrid
    from ray.tune.search import Searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator
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
        self.uri = objstore.join(job_dir, contract.TRIALS)
        self.search, self.epochs = search, epochs
        self.trials: dict[str, TrialRow] = {}
        if objstore.exists(self.uri):  # a restored search keeps the trials it already ran
            self.trials = {row.trial_id: row for row in contract.parse_trials(objstore.read_text(self.uri))}

    def row(self, trial_id: str) -> TrialRow:
        return self.trials.get(trial_id) or TrialRow(trial_id=trial_id)

    def update(self, trial_id: str, **fields: Any) -> None:
        # Tune calls its callbacks from its single driver loop: no locking needed (and Tune pickles them).
        self.trials[trial_id] = TrialRow.model_validate({**self.row(trial_id).model_dump(), **fields})
        objstore.write_text(self.uri, contract.trials_json(self.trials.values()))

    def finished(self, trial_id: str, epochs: int, **fields: Any) -> None:
        """A trial ended without error: succeeded, or stopped early by the scheduler."""
        early = epochs < self.epochs
        self.update(
            trial_id,
            epochs=epochs,
            stopped_early=early,
            state=TrialState.STOPPED_EARLY if early else TrialState.SUCCEEDED,
            **fields,
        )

    def reconcile(self, grid: ResultGrid) -> None:
        """Bring every row up to date from Tune's final results (callbacks can miss events on restore)."""
        for result in grid:
            reported = result.metrics or {}
            # `trial_id` is Tune's own key in every result it records.
            trial_id = reported.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
            frame = result.metrics_dataframe
            best = None
            if frame is not None and self.search.metric in frame:
                column = frame[self.search.metric].dropna()
                if len(column):
                    best = float(column.max() if self.search.mode == "max" else column.min())
            last = contract.parse_metrics_row(reported)
            epochs = last.epoch if last is not None else self.row(trial_id).epochs
            config = dict(result.config or {})
            if result.error is not None:
                self.update(
                    trial_id,
                    config=config,
                    state=TrialState.FAILED,
                    epochs=epochs,
                    best_metric=best,
                    error=str(result.error)[-2000:],
                )
            else:
                self.finished(trial_id, epochs, config=config, best_metric=best)

    def better(self, a: float | None, b: float | None) -> bool:
        return contract.better(a, b, self.search.mode)


def make_callback(book: TrialBook) -> Callback:
    from ray.tune import Callback
    from ray.tune.experiment import Trial

    class TrialBookCallback(Callback):
        def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            book.update(trial.trial_id, config=dict(trial.config), state=TrialState.RUNNING)

        def on_trial_result(
            self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
        ) -> None:
            value = result.get(book.search.metric)
            best = book.row(trial.trial_id).best_metric
            reported = contract.parse_metrics_row(result)
            book.update(
                trial.trial_id,
                epochs=reported.epoch if reported is not None else 0,
                best_metric=value if book.better(value, best) else best,
            )

        def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            book.finished(trial.trial_id, book.row(trial.trial_id).epochs)

        def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            book.update(
                trial.trial_id,
                state=TrialState.FAILED,
                error=str(getattr(trial, "error_msg", "") or "trial failed")[-2000:],
            )

    return TrialBookCallback()


def search_algorithm(search: SearchSpec) -> Searcher | BasicVariantGenerator:
    """Tune's search algorithm for `search.algorithm` (random and grid: Tune's variant generator; optuna: TPE,
    seeded, told each trial's reported metric, early-stopped trials included)."""
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Tune limits its concurrency to max_concurrent_trials (TuneConfig wraps it in a ConcurrencyLimiter).
        return OptunaSearch(seed=search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials)


def fit_search(spec: JobSpec, job_dir: str) -> SearchOutcome:
    """Run the search; make the best trial's checkpoint the job's. Returns what summary.json adds."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    from trainer.fit import fit_run

    assert spec.search is not None
    search, job_id = spec.search, job_dir.rstrip("/").rsplit("/", 1)[-1]
    spec_json = spec.model_dump_json()

    def trial(config: dict[str, Any]) -> None:
        # Runs inside a Tune trial actor: it owns one TorchTrainer run, under trials/<trial id>/.
        run_spec = trial_spec(JobSpec.model_validate_json(spec_json), config)
        trial_id = tune.get_context().get_trial_id()
        fit_run(
            run_spec,
            objstore.join(job_dir, contract.TRIALS_DIR, trial_id),
            name=f"{job_id}-{trial_id}",
            callbacks=[TuneReportCallback()],
        )

    scheduler = None
    if search.scheduler.kind == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=search.scheduler.max_t or spec.optim.epochs,
            grace_period=search.scheduler.grace_period,
            reduction_factor=search.scheduler.reduction_factor,
        )
    book = TrialBook(job_dir, search, spec.optim.epochs)
    storage_path, filesystem = objstore.ray_storage(objstore.join(job_dir, "tune"))
    trainable = tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPUS})
    experiment = objstore.join(storage_path, job_id) if filesystem is None else f"{storage_path}/{job_id}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        # The driver died mid-search: finish the unfinished trials (each resumes from its checkpoint).
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={path: to_tune_domain(d) for path, d in search.space.items()},
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                num_samples=search.num_samples,
                max_concurrent_trials=search.max_concurrent_trials,
                scheduler=scheduler,
                search_alg=search_algorithm(search),
            ),
            run_config=tune.RunConfig(
                name=job_id, storage_path=storage_path, storage_filesystem=filesystem, callbacks=[make_callback(book)]
            ),
        )
    grid = tuner.fit()
    book.reconcile(grid)
    return promote_best_trial(job_dir, book, grid)


def promote_best_trial(job_dir: str, book: TrialBook, grid: ResultGrid) -> SearchOutcome:
    """Copy the best trial's manifest and metrics to the job level and name it in the summary."""
    from trainer import checkpoint as ckpt

    best = contract.best_trial(book.trials.values(), book.search.mode)
    if best is None:
        errors = [r.error for r in grid if r.error is not None]
        raise RuntimeError(f"every trial of the search failed; first error: {errors[0] if errors else 'unknown'}")
    trial_dir = objstore.join(job_dir, contract.TRIALS_DIR, best.trial_id)
    ckpt.write_manifest(job_dir, ckpt.read_manifest(trial_dir))
    objstore.write_text(
        objstore.join(job_dir, contract.METRICS), objstore.read_text(objstore.join(trial_dir, contract.METRICS))
    )
    rows = list(book.trials.values())
    return SearchOutcome(
        best_trial=best.trial_id,
        best_config=best.config,
        search_metric=book.search.metric,
        best_metric=best.best_metric,
        trials=TrialCounts(
            total=len(rows),
            stopped_early=sum(r.stopped_early for r in rows),
            failed=sum(r.state is TrialState.FAILED for r in rows),
        ),
    )
