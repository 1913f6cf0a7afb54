"""GET /v1/compare?ids=a,b[,...]: 2-5 of your jobs side by side (service/api/comparison.py), as JSON or a PNG."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from service.api import comparison as compare
from service.api import plotting as plots
from service.api.auth import Principal
from service.api.deps import PrincipalDep, RunnerDep, StoreDep
from service.api.errors import ApiError
from service.api.openapi import COMMON_ERRORS, errors
from service.engine import jobdir
from service.engine.runner import Runner
from service.engine.states import JobState
from service.engine.store import Job, Store
from trainer.contract import EpochMetrics, Summary

router = APIRouter(tags=["compare"], responses=COMMON_ERRORS)

IdsParam = Annotated[
    str, Query(max_length=5 * 65, description="2 to 5 job ids, comma-separated", examples=["a1b2c3,d4e5f6"])
]


def _comparison(ids: str, principal: Principal, store: Store, runner: Runner) -> compare.Comparison:
    try:
        job_ids = compare.parse_ids(ids)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc), [{"field": "query.ids", "message": str(exc)}]) from None
    jobs: list[Job] = []
    for job_id in job_ids:
        job = store.get(job_id)
        if job is None or (job.owner != principal.name and not principal.is_admin):
            raise ApiError(404, "not_found", f"no such job {job_id}", {"job_id": job_id})
        jobs.append(job)
    metrics: list[list[EpochMetrics]] = []
    summaries: list[Summary | None] = []
    for job in jobs:
        if job.state is JobState.QUEUED:
            metrics.append([])
            summaries.append(None)
            continue
        # Storage unreachable: a 503 through the app's handler (a comparison without curves would mislead).
        job_dir = runner.job_dir(job.id)
        metrics.append(jobdir.read_metrics(job_dir))
        summaries.append(jobdir.read_summary(job_dir) if job.state.is_terminal() else None)
    return compare.compare(jobs, metrics, summaries)


@router.get("/compare", response_model=compare.Comparison, responses=errors(404))
def compare_jobs(ids: IdsParam, principal: PrincipalDep, store: StoreDep, runner: RunnerDep) -> compare.Comparison:
    """Final and best metrics, per-epoch curves, and the spec paths whose values differ, of 2-5 of your jobs
    (what `trainctl compare` prints and the dashboard's comparison page draws)."""
    return _comparison(ids, principal, store, runner)


PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG"}, **errors(404)}


@router.get("/compare.png", response_class=Response, responses=PNG)
def compare_plot(ids: IdsParam, principal: PrincipalDep, store: StoreDep, runner: RunnerDep) -> Response:
    """The jobs' accuracy and loss curves overlaid (`trainctl compare --plot out.png`)."""
    result = _comparison(ids, principal, store, runner)
    png = plots.compare_png([(compare.label(j), j.series) for j in result.jobs], "comparison")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
