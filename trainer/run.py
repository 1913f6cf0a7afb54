"""`python -m trainer.run --job-dir URI`: run (or resume) the job whose spec.json lies in URI.

The job dir's name is the Ray Train run name and the job dir is its storage path, so running this again on
the same job dir resumes from the latest checkpoint; it never starts over from epoch 0. At the end it
writes summary.json and exits with an `ExitCode`: 0 (succeeded), 2 (the spec or data is wrong: do not
retry), 3 (storage unreachable) or 1 (anything else) — both defined in trainer/contract.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

import objstore
from trainer import checkpoint as ckpt
from trainer import contract, fence
from trainer.contract import CheckpointEntry, ErrorKind, ExitCode, RunState, SearchOutcome, Summary
from trainer.data import DataError
from trainer.placement import PlacementError
from trainer.spec import JobSpec, model_cost

log = logging.getLogger("trainer.run")

# Forwarded to every Ray worker: contract.FORWARDED_ENV, the allow-list of non-secret settings.
FORWARDED_ENV = contract.FORWARDED_ENV


# What a storage outage looks like after Ray Train wrapped it (its own checkpoint uploads and snapshot
# writes go straight to pyarrow, outside objstore.retrying).
STORAGE_ERROR_MARKERS = (
    "StorageUnavailable",
    "AWS Error NETWORK_CONNECTION",
    "curlCode",
    "Couldn't connect to server",
    "AWS Error SERVICE_UNAVAILABLE",
)


class UserError(ValueError):
    """The job's spec or data is wrong: retrying cannot help."""


def read_spec(job_dir: str) -> JobSpec:
    uri = objstore.join(job_dir, contract.SPEC)
    if not objstore.exists(uri):
        raise UserError(f"{uri} does not exist: the job dir must hold the job's spec.json")
    try:
        return JobSpec.model_validate_json(objstore.read_text(uri))
    except ValueError as exc:
        raise UserError(f"{uri}: invalid spec: {exc}") from exc


def init_ray() -> None:
    """Attach to the cluster in RAY_ADDRESS (a Ray Job's driver always has it); with none (or `local`),
    start a private single-node cluster on 127.0.0.1 rather than attaching to whatever runs here."""
    import ray

    if ray.is_initialized():
        return
    env = forwarded_env()
    runtime_env = {"env_vars": env} if env else None
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "local":
        # Ray Train's placement-group cleaner (an actor) finds its cluster through RAY_ADDRESS; without it,
        # on a machine running several Ray clusters it finds none, and every finished Tune trial's worker
        # reservation leaks until later trials starve.
        runtime_env = {"env_vars": {**env, "RAY_ADDRESS": address}}
        ray.init(address=address, runtime_env=runtime_env)
    else:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env)


def forwarded_env() -> dict[str, str]:
    """The allow-listed variables (FORWARDED_ENV) for ray.init's runtime_env, less those the Ray Job's own runtime_env
    already sets (the service forwards TRAINCTL_S3_ENDPOINT, AWS_REGION...): Ray refuses to start a driver
    whose runtime_env repeats a job env var, and the job's reach every worker anyway."""
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_env = set((job_config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        job_env = set()
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in job_env}


def preflight(spec: JobSpec) -> None:
    """Fail fast, in the driver, on data that cannot work (missing file, wrong layout), instead of
    letting every worker restart hit the same error."""
    from trainer.data import load, test_source
    from trainer.dataroots import outside_roots

    for field, uri in outside_roots(spec):  # before any read: never tell whether such a file exists
        raise UserError(
            f"{field}: {objstore.redact(uri)} is outside the data roots this cluster allows (TRAINCTL_DATA_ROOTS)"
        )
    sources: list[tuple[str, str | None, str]] = [
        ("data.train", spec.data.train, "train"),
        ("data.test", spec.data.test, "test"),
    ]
    for name, source, split in sources:
        if source:
            try:
                load(source, spec.data.format, split, spec.model.num_classes, limit=16)
            except DataError as exc:
                raise DataError(f"{name}: {exc}") from None
    if not spec.data.test and spec.data.test_every_epochs and test_source(spec.data) is None:
        log.info(
            "no test split: data.train (%s) has no test_batch and data.test is not set; the run reports "
            "no test accuracy",
            objstore.redact(spec.data.train),
        )


def held_out_accuracy(spec: JobSpec, best: CheckpointEntry) -> float | None:
    """The checkpoint's accuracy on the test split (data.test or data.train's test_batch), if there is one."""
    from trainer.data import test_source

    source = test_source(spec.data)
    if source is None:
        return None
    from trainer.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(best.uri, source[0], source[1], split="test", expected_sha256=best.sha256)["accuracy"]


def tta_accuracy(spec: JobSpec, best: CheckpointEntry) -> float | None:
    """The checkpoint's test-split accuracy under the spec's test-time augmentation (None: no test split)."""
    from trainer.data import test_source

    source = test_source(spec.data)
    if source is None:
        log.info("tta %s: the run has no test split, so no tta accuracy", spec.tta)
        return None
    from trainer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(best.uri, source[0], source[1], "test", best.sha256, tta=spec.tta)
    return float(result["tta"]["accuracy"])


def final_confusion(spec: JobSpec, job_dir: str, best: CheckpointEntry, last_epoch: int) -> contract.Confusion | None:
    """Evaluate the best checkpoint on the test split (else val), write confusion.json and the matrix as an
    image into the TensorBoard event files. A failure here costs the picture, never the run: logged, None."""
    try:
        from trainer.evaluate import evaluate_confusion
        from trainer.tensorboard import EventLog

        confusion = evaluate_confusion(best.uri, spec, best.sha256, best.epoch)
        if confusion is None:
            return None
        objstore.write_text(objstore.join(job_dir, contract.CONFUSION), confusion.to_json())
        events = EventLog(job_dir)
        events.confusion(confusion, step=max(last_epoch, 1))
        events.close()
        return confusion
    except objstore.StorageUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("no confusion matrix: %s: %s", type(exc).__name__, exc)
        return None


def summarize(
    spec: JobSpec | None, job_dir: str, started: float, error: BaseException | None, error_kind: ErrorKind | None
) -> Summary:
    summary = Summary(
        state=RunState.FAILED if error else RunState.SUCCEEDED,
        wall_seconds=round(time.time() - started, 3),
        error=None if error is None else f"{type(error).__name__}: {error}",
        error_kind=error_kind,
    )
    if spec is None:
        return summary
    # Counted arithmetically: the driver (on the cluster's head) never builds a model just to count it.
    summary.num_parameters = model_cost(spec.model)[0]
    try:
        manifest = ckpt.read_manifest(job_dir)
        summary.epochs_completed = manifest.latest_epoch or 0
        metrics_uri = objstore.join(job_dir, contract.METRICS)
        attempts = fence.read(job_dir)  # only each epoch's owning attempt counts (trainer/fence.py)
        metrics = (
            contract.parse_metrics(objstore.read_text(metrics_uri), attempts) if objstore.exists(metrics_uri) else []
        )
        summary.epochs_completed = max([summary.epochs_completed, *(m.epoch for m in metrics)])
        by_epoch = {m.epoch: m for m in metrics}
        final = by_epoch.get(spec.optim.epochs)
        if final is not None:
            summary.final_test_acc = final.test_acc  # the paper's figure: the last epoch, not a best one
        # Never chosen on the test split: on validation accuracy, or the final epoch without a validation split.
        has_val = spec.data.val_fraction > 0
        best = manifest.best() if has_val else manifest.latest()
        if best:
            summary.best_val_acc = best.val_acc if has_val else None
            summary.best_checkpoint, summary.best_checkpoint_epoch = best.uri, best.epoch
            summary.best_checkpoint_sha256, summary.best_checkpoint_size = best.sha256, best.size
            summary.best_checkpoint_rule = "val_acc" if has_val else "final_epoch"
            if error is None:
                tested = by_epoch.get(best.epoch)
                confusion = final_confusion(spec, job_dir, best, summary.epochs_completed)
                if tested is not None and tested.test_acc is not None:
                    summary.best_checkpoint_test_acc = tested.test_acc
                elif confusion is not None and confusion.split == "test":
                    summary.best_checkpoint_test_acc = confusion.accuracy
                else:
                    summary.best_checkpoint_test_acc = held_out_accuracy(spec, best)
                summary.test_acc = summary.best_checkpoint_test_acc
                if spec.tta != "none":
                    summary.best_checkpoint_tta = spec.tta
                    summary.best_checkpoint_tta_acc = tta_accuracy(spec, best)
    except objstore.StorageUnavailable as exc:
        summary.state, summary.error, summary.error_kind = RunState.FAILED, str(exc), ErrorKind.STORAGE
    return summary


def classify(exc: BaseException) -> ErrorKind:
    """Why a run failed, looking through Ray's wrappers at the worker's error text."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (UserError, DataError, PlacementError)) or any(
        name in text for name in ("DataError", "UserError", "PlacementError")
    ):
        return ErrorKind.USER
    if isinstance(exc, objstore.StorageUnavailable) or any(m in text for m in STORAGE_ERROR_MARKERS):
        return ErrorKind.STORAGE
    return ErrorKind.INFRA


def absolute_job_dir(arg: str) -> str:
    """--job-dir as every process of the run must see it: a relative local path made absolute against this
    process's directory (Ray Train workers run in a directory of Ray's own, where a relative path would write
    the job's metrics somewhere else); URIs and `~/` paths as given, without a trailing slash."""
    job_dir = arg.rstrip("/") or "/"
    if "://" in job_dir or job_dir.startswith(("/", "~")):
        return job_dir
    return os.path.abspath(job_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, help="local path or s3:// URI holding spec.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job_dir, started = absolute_job_dir(args.job_dir), time.time()
    spec: JobSpec | None = None
    error: BaseException | None = None
    kind: ErrorKind | None = None
    code = ExitCode.OK
    outcome: SearchOutcome | None = None
    trackers = None
    try:
        spec = read_spec(job_dir)
        preflight(spec)
        if spec.tracking is not None:
            from trainer import tracking

            trackers = tracking.start(spec, job_dir)  # params now, epochs as they come; never raises
        init_ray()
        if spec.search is not None:
            from trainer.tune import fit_search

            outcome = fit_search(spec, job_dir)
        else:
            from trainer.fit import fit_single

            fit_single(spec, job_dir)
        from trainer.export import export_best  # before summary.json: the service takes that as the end

        export_best(job_dir, spec)
    except BaseException as exc:  # every failure must end in summary.json
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = exc
        kind = classify(exc)
        code = kind.exit_code
        log.error("job failed (%s): %s", kind, "".join(traceback.format_exception(exc))[-4000:])
    summary = summarize(spec, job_dir, started, error, kind)
    if outcome is not None:
        summary = summary.with_search(outcome)
    if not summary.succeeded() and code == ExitCode.OK:
        code = ExitCode.STORAGE
    if trackers is not None:  # before summary.json: the service takes that as the end
        trackers.finish(summary)  # never raises: a tracker cannot change the outcome
    try:
        objstore.write_text(objstore.join(job_dir, contract.SUMMARY), summary.to_json())
    except objstore.StorageUnavailable as exc:
        log.error("could not write summary.json: %s", exc)
        code = ExitCode.STORAGE
    print(summary.model_dump_json(include={"state", "best_val_acc", "epochs_completed", "error"}))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
