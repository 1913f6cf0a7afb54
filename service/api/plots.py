"""GET /v1/jobs/{id}/plots/{curves,lr,confusion}.png: the job's pictures (service/api/plotting.py), drawn from its
job directory, so they grow as epochs finish; each picture is rendered once per set of epochs (PlotCache) in
the bounded slow pool (service/api/limits.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response

from service.api import plotting as plots
from service.api import reference
from service.api.deps import JobDep, PlotCacheDep, RunnerDep, SlowPoolDep
from service.api.errors import ApiError
from service.api.limits import PlotCache
from service.api.openapi import COMMON_ERRORS
from service.engine import jobdir
from service.engine.states import JobState
from service.engine.store import Job

router = APIRouter(tags=["plots"], responses=COMMON_ERRORS)

PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "a PNG"},
    404: {"description": "no such job (another owner's job answers the same)"},
    409: {"description": "nothing to draw yet (no finished epoch / no confusion matrix)"},
}


@router.get("/jobs/{job_id}/plots/{name}.png", response_class=Response, responses=PNG)
async def job_plot(
    job: JobDep,
    runner: RunnerDep,
    pool: SlowPoolDep,
    cache: PlotCacheDep,
    name: Literal["curves", "lr", "confusion"],
) -> Response:
    """`curves`: loss and accuracy per epoch, train vs val/test (the paper's Figures 1-2; runs of the paper's
    network also show the authors' notebook's test accuracy per epoch as a dashed reference); `lr`: the
    learning rate per epoch; `confusion`: the best checkpoint's confusion matrix on the test split (val
    where there is none), written by the trainer when the run ends. Rendered once per job and epoch (a
    repeated request is served from a cache), in a bounded pool: 503 with Retry-After when it is full."""
    job_dir = runner.job_dir(job.id)
    return Response(
        await pool.run(lambda: _plot(job, job_dir, name, cache), f"plot {name}"),
        media_type="image/png",
        headers={"Cache-Control": "no-store"},
    )


def _plot(job: Job, job_dir: str, name: str, cache: PlotCache) -> bytes:
    if name == "confusion":
        confusion = jobdir.read_confusion(job_dir) if job.state is not JobState.QUEUED else None
        if confusion is None:
            raise ApiError(
                409,
                "no_confusion_matrix",
                f"job {job.id} has no confusion matrix (state {job.state}): the trainer writes it "
                "when a run ends with a checkpoint",
            )
        drawn = confusion.model_dump()
        return cache.get_or_render(cache.key(job.id, name, drawn), lambda: plots.confusion_png(drawn))
    metrics = [m.model_dump() for m in jobdir.read_metrics(job_dir)] if job.state is not JobState.QUEUED else []
    if not metrics:
        raise ApiError(409, "no_metrics", f"job {job.id} has no finished epoch yet (state {job.state})")
    title = f"job {job.id} — {len(metrics)} epoch(s)"
    if name == "lr":
        return cache.get_or_render(cache.key(job.id, name, metrics), lambda: plots.lr_png(metrics, title))
    ref = (reference.NAME, sorted(reference.NOTEBOOK_TEST_ACC.items())) if reference.applies_to(job.spec) else None
    return cache.get_or_render(cache.key(job.id, name, metrics), lambda: plots.curves_png(metrics, title, ref))
