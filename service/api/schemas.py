"""Request and response shapes of the HTTP API (service/api/views.py builds a stored job's view)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from service.api.errors import ApiError
from service.api.reference import ReferenceView
from service.common.estimate import Estimate, LimitCheck
from service.engine.states import JobState
from service.engine.store import Labels
from trainer.contract import EpochMetrics, NumericsRecord, TrialRow
from trainer.spec import JobSpec, error_list, resolve


class PresetRequest(BaseModel):
    """`{"preset": "debug", "overrides": {"optim.epochs": 3}}`: a preset plus dotted-path overrides."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"preset": "debug", "overrides": {"optim.epochs": 3, "optim.lr": 0.1}}]},
    )
    preset: str | None = Field(None, description="a preset name: see `python -m trainer describe --preset NAME`")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description='dotted spec paths to values, e.g. {"optim.lr": 0.1}'
    )


SUBMIT_EXAMPLES = {
    "preset": {
        "summary": "A preset with overrides",
        "value": {"preset": "debug", "overrides": {"optim.epochs": 3, "data.train": "/data/cifar10"}},
    },
    "full": {
        "summary": "A full spec (omitted fields take their defaults)",
        "value": {"optim": {"epochs": 10, "lr": 0.05}, "scaling": {"num_workers": 2}},
    },
}


MAX_TAGS = 32


def _printable(value: str) -> str:
    """Labels are shown in terminals and tables: no control characters (newlines, escapes), no padding."""
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError("must not contain control characters")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


Tag = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]


class JobLabels(BaseModel):
    """The labels of a job, beside its spec in the submit body: `{"preset": "debug", "name": "lr sweep 1",
    "tags": ["baseline"], "project": "cifar"}` (also beside a full spec's sections)."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)] | None = Field(
        None, description="a free name for people (not unique); `GET /v1/jobs?name=` finds it by substring"
    )
    project: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)] | None = Field(
        None, description="groups jobs; `GET /v1/jobs?project=` lists one project's"
    )
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=MAX_TAGS,
        description=f"at most {MAX_TAGS}, each 1-64 printable characters; `?tag=a&tag=b` lists jobs with all",
    )

    def labels(self, parent: str | None = None) -> Labels:
        return Labels(self.name, self.project, tuple(dict.fromkeys(self.tags)), parent)


LABEL_FIELDS = tuple(JobLabels.model_fields)


class ResubmitRequest(JobLabels):
    """POST /v1/jobs/{id}/resubmit: overrides on the stored spec; labels given replace the parent's."""

    overrides: dict[str, Any] = Field(
        default_factory=dict, description='dotted spec paths to values, e.g. {"optim.lr": 0.1}'
    )


RESUBMIT_EXAMPLES = {
    "override": {
        "summary": "The same run with a lower learning rate",
        "value": {"overrides": {"optim.lr": 0.01}, "name": "lower lr"},
    },
}


def split_labels(body: dict[str, Any]) -> tuple[dict[str, Any], JobLabels]:
    """(the body without its labels, the validated labels); a bad label is a 422 naming it (`tags.3`)."""
    rest = {k: v for k, v in body.items() if k not in LABEL_FIELDS}
    try:
        labels = JobLabels.model_validate({k: body[k] for k in LABEL_FIELDS if k in body})
    except ValidationError as exc:
        details = error_list(exc)
        shown = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        raise ApiError(422, "invalid_request", f"{len(details)} invalid label(s): {shown}", details) from None
    return rest, labels


def resolve_body(body: dict[str, Any]) -> JobSpec:
    """The request body → a validated JobSpec; raises pydantic.ValidationError naming each bad field."""
    if "preset" in body or "overrides" in body:
        req = PresetRequest.model_validate(body)
        return resolve(req.preset, req.overrides)
    return resolve(base=body)


def request_hash(body: dict[str, Any]) -> str:
    """A hash of the body's meaning (key order and whitespace do not matter) for Idempotency-Key checks."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Progress(BaseModel):
    epoch: int
    epochs: int | None
    eta_seconds: float | None


class SearchProgress(BaseModel):
    trials_total: int
    trials_finished: int
    trials_running: int
    stopped_early: int
    best_trial: str | None
    best_metric: float | None
    best_config: dict[str, Any] | None = Field(default=None, description="the best trial's sampled values")
    metric: str


class TrialList(BaseModel):
    job_id: str
    metric: str
    mode: str
    trials: list[TrialRow]


JOB_VIEW_EXAMPLE: dict[str, Any] = {
    "id": "Xb3kq9LmT0aWc1dE2fG3hQ",
    "owner": "alice",
    "name": "baseline lr 0.05",
    "project": "cifar10",
    "tags": ["baseline", "sgd"],
    "parent": None,
    "state": "RUNNING",
    "progress": {"epoch": 3, "epochs": 10, "eta_seconds": 412.0},
    "metrics": None,
    "best_val_acc": 0.7312,
    "attempts": 1,
    "attempt_log": [],
    "message": None,
    "ray_submission_id": "Xb3kq9LmT0aWc1dE2fG3hQ-1",
    "created_at": "2026-12-06T04:00:00Z",
    "updated_at": "2026-12-06T04:05:00Z",
}


class WorkerSpan(BaseModel):
    """Consecutive epochs trained by the same number of workers (elastic workers grow and shrink)."""

    first_epoch: int
    last_epoch: int
    workers: int


class JobView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_VIEW_EXAMPLE]})

    id: str
    owner: str
    name: str | None = Field(default=None, description="the name given at submission")
    project: str | None = None
    tags: list[str] = Field(default_factory=list)
    parent: str | None = Field(default=None, description="resubmitted from this job")
    state: JobState
    progress: Progress
    metrics: EpochMetrics | None = Field(description="the latest epoch's metrics")
    best_val_acc: float | None
    # Test accuracy is the headline (summary.json, once the run ended): the final epoch's (the figure the
    # paper reports) and the best checkpoint's. The best checkpoint is never chosen on test accuracy.
    final_test_acc: float | None = Field(default=None, description="the last epoch's test_acc")
    best_checkpoint_test_acc: float | None = Field(default=None, description="the best checkpoint's test_acc")
    best_checkpoint_rule: str = Field(
        default="val_acc",
        description="what chose the best checkpoint: val_acc (highest validation "
        "accuracy) or final_epoch (the run has no validation split)",
    )
    attempts: int
    attempt_log: list[dict[str, Any]]
    message: str | None
    ray_submission_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    spec: dict[str, Any] | None = None
    search: SearchProgress | None = Field(default=None, description="searches only: trials and best so far")
    devices: list[str] | None = Field(
        default=None,
        description="what each rank trains on, rank 0 first, e.g. "
        '["cuda:0 NVIDIA H100 80GB HBM3"] (from the latest epoch\'s metrics)',
    )
    numerics: NumericsRecord | None = Field(
        default=None,
        description="precision and channels_last in use, how they "
        "were chosen and, when measured, each candidate's images/s",
    )
    reference: ReferenceView | None = Field(
        default=None,
        description="runs of the paper's network: the authors' notebook's test accuracy per epoch and how far "
        "ahead or behind it the run is at its latest comparable epoch (single job views only)",
    )
    estimate: EstimateVsActual | None = Field(
        default=None, description="the estimate made at submission and, once the job ended, what it took"
    )
    time_limit_warning: str | None = Field(
        default=None,
        description="a running job whose measured pace (its ETA) takes it past limits.max_hours: when and at "
        "which epoch the limit will stop it (single job views and the event stream)",
    )
    workers: list[WorkerSpan] | None = Field(
        default=None,
        description="the worker count over time, from the epochs' metrics: one span per run of epochs trained by "
        "the same number of DDP ranks (several with elastic scaling.num_workers); null before the first epoch",
    )
    infra_losses: list[str] | None = Field(
        default=None,
        description="worker nodes/hosts the job lost and recovered from, one line each, e.g. 'worker host "
        "10.0.0.3 lost at epoch 3; resumed from epoch 2 on a replacement host' (charged to "
        "checkpoint.max_infra_failures, not max_failures; from metrics.jsonl: single job views and the event stream)",
    )


class EstimateVsActual(BaseModel):
    """The estimate made at submission beside what the job then took (issue 30). Errors are
    (estimate - actual) / actual: +0.25 = the estimate was 25 % high."""

    estimated_wall_seconds: float | None
    wall_basis: str
    estimated_images_per_s: float | None
    images_per_s_basis: str
    estimated_cost: float | None
    cost_basis: str
    actual_wall_seconds: float | None = Field(
        description="first submission to Ray until the job ended (null until it ended)"
    )
    actual_images_per_s: float | None = Field(description="the median of its epochs' images/s (single job views)")
    wall_error: float | None
    images_per_s_error: float | None
    checks: list[LimitCheck] = Field(
        default_factory=list, description="the spec's limits against the estimate (single job views only)"
    )
    detail: Estimate | None = Field(default=None, description="the whole estimate (single job views only)")


class JobList(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int


class MetricsView(BaseModel):
    job_id: str
    metrics: list[EpochMetrics]


class CheckpointView(BaseModel):
    """A kept checkpoint (manifest.json's entry, without its storage URI)."""

    epoch: int
    val_acc: float
    size: int
    sha256: str


class CheckpointList(BaseModel):
    job_id: str
    checkpoints: list[CheckpointView]


class ArtifactView(BaseModel):
    name: str = Field(description="download it from /v1/jobs/{id}/artifacts/{name}")
    format: str | None = Field(description="safetensors (weights only), pt2 (a torch.export program) or onnx")
    epoch: int | None = Field(description="the checkpoint epoch it was exported from (the best one)")
    size: int | None
    sha256: str | None


class ArtifactList(BaseModel):
    job_id: str
    artifacts: list[ArtifactView]
