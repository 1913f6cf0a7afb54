"""GET /v1/jobs/{id}/plots/{curves,lr,confusion}.png: the job's pictures (service/plots.py), rendered
from its job directory on every request, so they grow as epochs finish."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response

from service import jobdir, plots, reference
from service.api.deps import JobDep, RunnerDep
from service.api.openapi import COMMON_ERRORS
from service.errors import ApiError
from service.states import JobState

router = APIRouter(tags=["plots"], responses=COMMON_ERRORS)

PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "a PNG"},
    404: {"description": "no such job (another owner's job answers the same)"},
    409: {"description": "nothing to draw yet (no finished epoch / no confusion matrix)"},
}


@router.get("/jobs/{job_id}/plots/{name}.png", response_class=Response, responses=PNG)
def job_plot(job: JobDep, runner: RunnerDep, name: Literal["curves", "lr", "confusion"]) -> Response:
    """`curves`: loss and accuracy per epoch, train vs val/test (the paper's Figures 1-2; runs of the paper's
    network also show the authors' notebook's test accuracy per epoch as a dashed reference); `lr`: the
    learning rate per epoch; `confusion`: the best checkpoint's confusion matrix on the test split (val
    where there is none), written by the trainer when the run ends."""
    job_dir = runner.job_dir(job.id)
    if name == "confusion":
        confusion = jobdir.read_confusion(job_dir) if job.state is not JobState.QUEUED else None
        if confusion is None:
            raise ApiError(
                409,
                "no_confusion_matrix",
                f"job {job.id} has no confusion matrix (state {job.state}): the trainer writes it "
                "when a run ends with a checkpoint",
            )
        png = plots.confusion_png(confusion.model_dump())
    else:
        metrics = [m.model_dump() for m in jobdir.read_metrics(job_dir)] if job.state is not JobState.QUEUED else []
        if not metrics:
            raise ApiError(409, "no_metrics", f"job {job.id} has no finished epoch yet (state {job.state})")
        title = f"job {job.id} — {len(metrics)} epoch(s)"
        if name == "curves":
            ref = (
                (reference.NAME, sorted(reference.NOTEBOOK_TEST_ACC.items()))
                if reference.applies_to(job.spec)
                else None
            )
            png = plots.curves_png(metrics, title, ref)
        else:
            png = plots.lr_png(metrics, title)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
