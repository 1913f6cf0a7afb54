"""What a user may ask of this service, checked when a job is submitted (docs/security.md).

- data: `data.train`/`data.test` must be absolute (or `~/`, `file://`, `s3://`), lie under one of the operator's
  data roots (TRAINCTL_DATA_ROOTS, after normalising `..`, symlinks, `~` and `file://`), and exist where the
  service can see them. The roots are checked first, so a refusal never tells whether a file outside them
  exists. The driver checks the roots again (trainer/dataroots.py) with the list the runner forwards.
- limits: model size, search size and wall-clock hours against the operator's settings (the spec itself
  already enforces hard ceilings).
- quotas: how many unfinished jobs one owner may hold (429 with Retry-After), checked by the store inside the
  transaction that inserts the job (`quota_check`).

Every refusal names the field or the setting, so the user knows what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

import objstore
from service.api.errors import ApiError
from service.common.settings import Settings
from service.engine.notify import webhook_problem
from service.engine.states import JobState
from trainer.contract import TORCHVISION_DOWNLOAD_DIR
from trainer.spec import MAX_ECHO, JobSpec, mlflow_store_path, model_cost

# A quick look, not an outage ride-out: an unreachable bucket is the driver's problem to report.
EXISTS_BUDGET_S = 2.0
RETRY_AFTER_S = 30


def data_problems(spec: JobSpec, settings: Settings) -> list[dict[str, str]]:
    """[{field, message}] for each data path the service must refuse; [] when all are fine."""
    out = []
    for field, uri in (("data.train", spec.data.train), ("data.test", spec.data.test)):
        if uri is None:
            continue
        problem = _data_problem(uri, spec.data.format, settings)
        if problem:
            out.append({"field": field, "message": problem})
    return out


def _shown(uri: str) -> str:
    """The URI as an error quotes it: credentials redacted, at most MAX_ECHO characters."""
    text = objstore.redact(uri)
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


def _data_problem(uri: str, fmt: str, settings: Settings) -> str | None:
    try:
        objstore.normalise(uri)
    except ValueError as exc:
        return str(exc).replace(repr(uri), repr(_shown(uri)))  # (it quotes the path: at most a prefix)
    roots = settings.allowed_data_roots
    if not objstore.within_any(uri, roots):
        return (
            f"{_shown(uri)} is outside the data roots this service reads from "
            f"({', '.join(roots)}); the operator adds roots with TRAINCTL_DATA_ROOTS"
        )
    if objstore.is_s3(uri):
        exists = _exists_quickly(uri)
    elif settings.check_local_data:
        exists = _exists_quickly(uri)
        # The download folder, missing, is where torchvision will put CIFAR-10: not an error. Any other
        # missing folder is (one download per made-up folder would fill the node's disk).
        if exists is False and fmt in ("auto", "torchvision") and _is_download_dir(uri):
            exists = None
    else:
        exists = None
    if fmt == "torchvision" and not _is_download_dir(uri):
        return (
            f"{objstore.redact(uri)}: data.format torchvision downloads CIFAR-10 only into "
            f"{TORCHVISION_DOWNLOAD_DIR}; set data.train to that folder or to a local copy"
        )
    if exists is False:
        return f"{_shown(uri)} does not exist"
    return None


def _is_download_dir(uri: str) -> bool:
    if objstore.is_s3(uri):
        return False
    try:
        return objstore.normalise(uri) == objstore.normalise(TORCHVISION_DOWNLOAD_DIR)
    except ValueError:
        return False


def _exists_quickly(uri: str) -> bool | None:
    """True/False when storage answers in time; None when it cannot tell (unreachable, no permission)."""
    try:
        fs, path = objstore.resolve(uri)
        info = objstore.retrying(
            lambda: fs.get_file_info(path), f"stat {objstore.redact(uri)}", budget_s=EXISTS_BUDGET_S
        )
    except (objstore.StorageUnavailable, OSError, ValueError):
        return None
    return bool(info.type != pafs.FileType.NotFound)


def limit_problems(spec: JobSpec, settings: Settings) -> list[dict[str, str]]:
    out = []
    params, _ = model_cost(spec.model)
    if params > settings.max_model_parameters:
        for field in ("model.widths", "model.blocks"):
            out.append(
                {
                    "field": field,
                    "message": f"the model has {params:,} parameters; this service allows "
                    f"{settings.max_model_parameters:,} "
                    "(TRAINCTL_MAX_MODEL_PARAMETERS)",
                }
            )
    if spec.search is not None and spec.search.total_trials() > settings.max_search_trials:
        out.append(
            {
                "field": "search.num_samples",
                "message": f"the search has {spec.search.total_trials():,} trials (num_samples x grid "
                f"combinations); this service allows {settings.max_search_trials:,} "
                "(TRAINCTL_MAX_SEARCH_TRIALS)",
            }
        )
    if spec.limits.max_hours > settings.max_job_hours:
        out.append(
            {
                "field": "limits.max_hours",
                "message": f"{spec.limits.max_hours:g} h is over this service's limit of "
                f"{settings.max_job_hours:g} h (TRAINCTL_MAX_JOB_HOURS)",
            }
        )
    return out


def scaling_problems(spec: JobSpec, settings: Settings) -> list[dict[str, str]]:
    """GPUs per node that no node type of the cluster holds (TRAINCTL_MAX_GPUS_PER_NODE)."""
    s, most = spec.scaling, settings.max_gpus_per_node
    if most is None or s.use_gpu is False:
        return []
    if s.gpus_per_worker > most:
        return [
            {
                "field": "scaling.gpus_per_worker",
                "message": f"{s.gpus_per_worker} GPUs per worker: no node type of this cluster has more than "
                f"{most} GPU(s) (TRAINCTL_MAX_GPUS_PER_NODE)",
            }
        ]
    if s.workers_per_node is not None and s.workers_per_node * s.gpus_per_worker > most:
        return [
            {
                "field": "scaling.workers_per_node",
                "message": f"{s.workers_per_node} workers x {s.gpus_per_worker} GPU(s) on one node: no node type "
                f"of this cluster has more than {most} GPU(s) (TRAINCTL_MAX_GPUS_PER_NODE)",
            }
        ]
    return []


def tracking_problems(spec: JobSpec, settings: Settings) -> list[dict[str, str]]:
    """A tracker's local store (an MLflow store, a W&B offline directory) must lie under the data roots: the
    driver writes there on the user's behalf. (W&B's default directory is the job's own dir.)"""
    if spec.tracking is None:
        return []
    wanted: list[tuple[str, str, str]] = []  # (field, path, as the user wrote it)
    if spec.tracking.mlflow is not None:
        uri = spec.tracking.mlflow.tracking_uri
        wanted.append(("tracking.mlflow.tracking_uri", mlflow_store_path(uri), uri))  # (the spec checked its form)
    if spec.tracking.wandb is not None and spec.tracking.wandb.dir is not None:
        wanted.append(("tracking.wandb.dir", spec.tracking.wandb.dir, spec.tracking.wandb.dir))
    roots = settings.allowed_data_roots
    problems = []
    for field, path, given in wanted:
        try:
            inside = objstore.within_any(path, roots)
        except ValueError:
            inside = False
        if not inside:
            problems.append(
                {
                    "field": field,
                    "message": f"{_shown(given)} is outside the data roots this service writes tracking "
                    f"data to ({', '.join(roots)}); the operator adds roots with TRAINCTL_DATA_ROOTS",
                }
            )
    return problems


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Raise a 422 naming every field this service refuses (limits first: they need no storage)."""
    problems = limit_problems(spec, settings) + scaling_problems(spec, settings) + data_problems(spec, settings)
    problems += tracking_problems(spec, settings)
    webhook = webhook_problem(spec.notify, settings)
    if webhook:
        problems.append({"field": "notify.webhook", "message": webhook})
    if problems:
        shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        raise ApiError(422, "invalid_spec", f"{len(problems)} invalid field(s): {shown}", problems)


def quota_check(settings: Settings) -> Callable[[dict[JobState, int]], None]:
    """What `Store.create_job` calls with the owner's job counts, inside the inserting transaction: a 429
    when the owner already holds as many unfinished jobs as may run (max_active_jobs_per_owner) plus wait
    (max_queued_jobs_per_owner). Queued jobs that could start at once within the active allowance do not
    count against the queue."""

    def check(counts: dict[JobState, int]) -> None:
        active = counts.get(JobState.STARTING, 0) + counts.get(JobState.RUNNING, 0)
        queued = counts.get(JobState.QUEUED, 0)
        max_active, max_queued = settings.max_active_jobs_per_owner, settings.max_queued_jobs_per_owner
        if queued < max_queued + max(0, max_active - active):
            return
        details: dict[str, Any] = {
            "limit": "max_queued_jobs_per_owner",
            "active": active,
            "queued": queued,
            "max_active_jobs_per_owner": max_active,
            "max_queued_jobs_per_owner": max_queued,
        }
        raise ApiError(
            429,
            "quota_exceeded",
            f"you have {active} active and {queued} queued job(s): at most {max_active} active "
            f"(TRAINCTL_MAX_ACTIVE_JOBS_PER_OWNER) and {max_queued} queued "
            f"(TRAINCTL_MAX_QUEUED_JOBS_PER_OWNER) per owner; wait for some to finish or cancel some",
            details,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    return check
