"""/v1/jobs routes. Thin: validation is trainer.spec's, state changes are the runner's and the store's.

Handlers are plain `def`: the store, storage and Ray's SDK all block, and FastAPI runs sync handlers in its
threadpool instead of on the event loop.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BeforeValidator

import objstore
from service.api import auth, policy, views
from service.api.deps import (
    AppStateDep,
    BearerDep,
    JobDep,
    JobIdPath,
    PrincipalDep,
    ReconcilerDep,
    RunnerDep,
    SettingsDep,
    StoreDep,
    polled_job,
    principal_of,
    run_poll,
)
from service.api.errors import ApiError
from service.api.estimates import estimate_for, refuse_over_limits
from service.api.openapi import COMMON_ERRORS, errors
from service.api.schemas import (
    MAX_TAGS,
    RESUBMIT_EXAMPLES,
    SUBMIT_EXAMPLES,
    ArtifactList,
    ArtifactView,
    CheckpointList,
    CheckpointView,
    JobLabels,
    JobList,
    JobView,
    MetricsView,
    ResubmitRequest,
    TrialList,
    request_hash,
    resolve_body,
    split_labels,
)
from service.api.views import job_view
from service.engine import jobdir
from service.engine.runner import NoLog, Runner, StillStopping
from service.engine.states import JobState
from service.engine.store import SORT_KEYS, IdempotencyConflict, Job, JobFilter, Labels, Store
from trainer.contract import METRIC_COLUMNS
from trainer.spec import JobSpec, resolve

router = APIRouter(tags=["jobs"], responses=COMMON_ERRORS)

# ?state=running works as well as ?state=RUNNING.
StateParam = Annotated[JobState, BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)]

SortKey = Literal["created", "name", "best_val_acc"]
assert set(get_args(SortKey)) == set(SORT_KEYS)  # one list, two spellings

MAX_OFFSET = 1_000_000_000  # integer query parameters are bounded: SQLite's integers are 64-bit


@router.post("/jobs", status_code=201, response_model=JobView, responses=errors(409, 413, 429))
def submit_job(
    body: Annotated[dict[str, Any], Body(openapi_examples=SUBMIT_EXAMPLES)],
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    reconciler: ReconcilerDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JobView:
    """Submit a training job: a full spec, or `{"preset", "overrides"}`, with optional labels beside it
    (`name`, `project`, `tags`). The resolved spec is stored, so the job never depends on a preset that
    changes later. With an Idempotency-Key, repeating the same request returns the same job; the same key
    with a different body is a 409. The job's time and cost are estimated (as POST /v1/estimates does) and
    stored with it; an estimate over limits.max_hours or limits.max_cost is a 422 naming the field (an
    unknown estimate never refuses)."""
    spec_body, labels = split_labels(body)  # a bad label -> 422 naming it
    spec = resolve_body(spec_body)  # pydantic ValidationError -> 422 naming each field
    job, created = _admit(store, settings, runner, principal, spec, body, idempotency_key, labels.labels())
    if created:
        reconciler.wake()  # start it now if a slot is free, not at the next poll
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job, with_spec=True)


def _admit(
    store: Store,
    settings: Any,
    runner: Runner,
    principal: auth.Principal,
    spec: JobSpec,
    body: dict[str, Any],
    idempotency_key: str | None,
    labels: Labels,
) -> tuple[Job, bool]:
    """The service's limits, then the new job (or the earlier one of this key). The quota is checked inside
    the inserting transaction, under a per-owner lock in the database: a burst of parallel submissions, to
    any number of replicas, cannot overshoot it. A repeated Idempotency-Key returns its job even at the
    quota; only new jobs count against it."""
    policy.check_spec(spec, settings)  # this service's limits and data roots -> 422 naming each field
    estimate = estimate_for(spec, store, runner.job_dir, settings)
    if (
        idempotency_key is None
        or store.by_idempotency_key(principal.owner_id or principal.name, idempotency_key) is None
    ):
        refuse_over_limits(estimate)  # limits.max_hours / max_cost under the estimate -> 422 naming the field
    quota = policy.quota_check(settings)
    return _create(store, principal, spec, body, idempotency_key, labels, quota, estimate.model_dump_json())


def _create(
    store: Store,
    principal: auth.Principal,
    spec: JobSpec,
    body: dict[str, Any],
    idempotency_key: str | None,
    labels: Labels,
    quota: Callable[[dict[JobState, int]], None],
    estimate: str,
) -> tuple[Job, bool]:
    try:
        job, created = store.create_job(
            principal.name,
            spec,
            idempotency_key,
            request_hash(body) if idempotency_key else None,
            labels,
            owner_id=principal.owner_id,
            quota=quota,
            estimate=estimate,
        )
    except IdempotencyConflict as exc:
        raise ApiError(409, "idempotency_conflict", str(exc), {"job_id": exc.job_id}) from None
    return job, created


# A poll that sends back the ETag of the answer it already has gets an empty 304 while nothing changed.
IfNoneMatch = Annotated[
    str | None,
    Header(max_length=1024, description="the ETag of an earlier answer: 304 with no body while it is unchanged"),
]
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "unchanged since the ETag sent in If-None-Match (no body)"}
}


def conditional(rendered: views.Rendered, if_none_match: str | None) -> Response:
    """The rendered JSON with its ETag, or a 304 when the client already holds it. `no-cache`: a cache may
    keep the answer but must ask again (with its ETag) before it reuses it."""
    headers = {"ETag": rendered.etag, "Cache-Control": "private, no-cache"}
    if rendered.matches(if_none_match):
        return Response(status_code=304, headers=headers)
    return Response(rendered.body, media_type="application/json", headers=headers)


@router.get("/jobs", response_model=JobList, responses={**errors(403), **NOT_MODIFIED})
async def list_jobs(
    request: Request,
    app_state: AppStateDep,
    credentials: BearerDep,
    if_none_match: IfNoneMatch = None,
    state: Annotated[list[StateParam] | None, Query(description="repeat to match several; any case")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    owner: Annotated[
        str | None, Query(max_length=64, description="admin only: one owner's jobs (default: everyone's)")
    ] = None,
    tag: Annotated[
        list[str] | None, Query(max_length=64, description="repeat to require several: jobs with every tag given")
    ] = None,
    project: Annotated[str | None, Query(max_length=64, description="one project's jobs")] = None,
    name: Annotated[str | None, Query(max_length=128, description="jobs whose name contains this (any case)")] = None,
    since: Annotated[
        dt.datetime | None, Query(description="created at or after: ISO 8601 (2026-12-01T00:00Z) or unix seconds")
    ] = None,
    sort: Annotated[
        SortKey, Query(description="created (newest first), name (A-Z) or best_val_acc (highest first)")
    ] = "created",
) -> Response:
    """Your jobs, newest first; the admin's list holds every owner's jobs (`?owner=` picks one). Filters
    combine (all must hold); an unknown query parameter is a 422 naming it."""
    # Polled like GET /v1/jobs/{id}: one `run_poll` for auth, the page and its rendering.
    return await run_poll(
        app_state,
        lambda: _list_page(
            principal_of(request, app_state.settings, app_state.store, credentials),
            app_state.store,
            if_none_match,
            state=state,
            limit=limit,
            offset=offset,
            owner=owner,
            tag=tag,
            project=project,
            name=name,
            since=since,
            sort=sort,
        ),
    )


def _list_page(
    principal: auth.Principal,
    store: Store,
    if_none_match: str | None,
    *,
    state: list[JobState] | None,
    limit: int,
    offset: int,
    owner: str | None,
    tag: list[str] | None,
    project: str | None,
    name: str | None,
    since: dt.datetime | None,
    sort: str,
) -> Response:
    if not principal.is_admin:
        if owner is not None and owner != principal.name:
            raise ApiError(403, "forbidden", "only the admin may list other owners' jobs")
    if tag is not None and len(tag) > MAX_TAGS:
        raise ApiError(
            422, "invalid_request", f"at most {MAX_TAGS} tags", [{"field": "tag", "message": f"at most {MAX_TAGS}"}]
        )
    where = JobFilter(
        tags=tuple(tag or ()),
        project=project,
        name=name,
        since=since.timestamp() if since is not None else None,
        sort=sort,
    )
    if not principal.is_admin:  # your own jobs: by owner id, never by a name a new token may reuse
        jobs, total = store.list(owner_id=principal.owner_id, states=state, limit=limit, offset=offset, where=where)
    else:
        jobs, total = store.list(owner=owner, states=state, limit=limit, offset=offset, where=where)
    return conditional(views.render_list(jobs, total, limit, offset), if_none_match)


@router.post("/jobs/{job_id}/resubmit", status_code=201, response_model=JobView, responses=errors(404, 413, 429))
def resubmit_job(
    job: JobDep,
    body: Annotated[ResubmitRequest, Body(openapi_examples=RESUBMIT_EXAMPLES)],
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    reconciler: ReconcilerDep,
    settings: SettingsDep,
    response: Response,
) -> JobView:
    """A new job from this job's stored spec with `overrides` applied (dotted paths, as in submit), recording
    `parent`. Labels not given are the parent's (so a resubmit stays in its project, with its tags)."""
    spec = resolve(
        base=job.spec.model_dump(mode="json"), overrides=body.overrides
    )  # ValidationError -> 422 naming each field
    given = body.model_fields_set
    labels = JobLabels(
        name=body.name if "name" in given else job.name,
        project=body.project if "project" in given else job.project,
        tags=body.tags if "tags" in given else job.tags,
    ).labels(parent=job.id)
    new, _ = _admit(store, settings, runner, principal, spec, {}, None, labels)
    reconciler.wake()
    response.headers["Location"] = f"/v1/jobs/{new.id}"
    return job_view(new, with_spec=True)


@router.get("/jobs/{job_id}", response_model=JobView, responses={**errors(404), **NOT_MODIFIED})
async def get_job(
    request: Request, job_id: JobIdPath, state: AppStateDep, credentials: BearerDep, if_none_match: IfNoneMatch = None
) -> Response:
    # The status poll: async with async dependencies only, and its blocking part in one `run_poll` (what the
    # JobDep/PrincipalDep routes do in three threadpool hand-offs).
    def poll() -> Response:
        job = polled_job(request, state.settings, state.store, credentials, job_id)
        return conditional(views.render_job(job, state.runner.job_dir(job.id), with_spec=True), if_none_match)

    return await run_poll(state, poll)


@router.get("/jobs/{job_id}/metrics", response_model=MetricsView, responses=errors(404))
def get_metrics(
    job: JobDep, runner: RunnerDep, fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json"
) -> Any:
    """Every finished epoch, once, ascending (from the job's metrics.jsonl)."""
    metrics = jobdir.read_metrics(runner.job_dir(job.id)) if job.state is not JobState.QUEUED else []
    if fmt == "json":
        return MetricsView(job_id=job.id, metrics=metrics)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    for m in metrics:
        row = m.model_dump()
        writer.writerow(
            {
                k: ";".join(json.dumps(x, sort_keys=True) if isinstance(x, dict) else str(x) for x in v)
                if isinstance(v, list)
                else json.dumps(v, sort_keys=True)
                if isinstance(v, dict)
                else v
                for k, v in row.items()
            }
        )
    return PlainTextResponse(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{job.id}-metrics.csv"'},
    )


@router.get("/jobs/{job_id}/trials", response_model=TrialList, responses=errors(404, 409))
def list_trials(job: JobDep, runner: RunnerDep) -> TrialList:
    """A search's trials: config, state, epochs done, best metric, stopped early or not (409 for a job
    that is not a search)."""
    search = job.spec.search
    if search is None:
        raise ApiError(409, "not_a_search", f"job {job.id} is a single run, not a search: it has no trials")
    trials = (
        jobdir.settle_trials(jobdir.read_trials(runner.job_dir(job.id)), job.state.value)
        if job.state is not JobState.QUEUED
        else []
    )
    return TrialList(job_id=job.id, metric=search.metric, mode=search.mode, trials=trials)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=errors(404))
def get_logs(
    job: JobDep,
    runner: RunnerDep,
    tail: Annotated[int | None, Query(ge=0, le=100_000, description="last N lines")] = None,
    since: Annotated[
        int | None,
        Query(
            ge=0, le=MAX_OFFSET, description=("bytes already read (the previous answer's X-Log-Size): only what is new")
        ),
    ] = None,
    attempt: Annotated[int | None, Query(ge=1, le=1000, description="one attempt's log only")] = None,
) -> PlainTextResponse:
    """The driver log (ANSI colours stripped): of every attempt, each under a header, or of one `attempt`.
    Kept in the job dir (logs/attempt-N.log), so it outlives the Ray head; 404 `no_log` says why there is
    none (queued, or the log was lost). At most the last MAX_LOG_BYTES are sent; X-Log-Size is the whole
    text's size in bytes: pass it as `since` next time to get only what was added (`trainctl logs -f`);
    X-Log-Truncated says the answer was cut to its tail."""
    try:
        whole = runner.logs(job, None, attempt)
    except NoLog as exc:
        raise ApiError(404, "no_log", str(exc)) from None
    text, size, truncated = log_window(whole, tail, since)
    return PlainTextResponse(text, headers={"X-Log-Size": str(size), "X-Log-Truncated": str(truncated).lower()})


MAX_LOG_BYTES = 1 << 20


def log_window(text: str, tail: int | None, since: int | None, max_bytes: int = MAX_LOG_BYTES) -> tuple[str, int, bool]:
    """(what to send, the whole log's size in bytes, cut to max_bytes?) for a log, its last `tail` lines and/or
    what follows byte `since` (the whole log when `since` is past its end: a new attempt's log)."""
    data = text.encode("utf-8", errors="replace")
    size = len(data)
    if since is not None and since <= size:
        data = data[since:]
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    truncated = len(data) > max_bytes
    if truncated:
        data = data[-max_bytes:]
    return data.decode("utf-8", errors="ignore"), size, truncated


@router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=errors(404))
def cancel_job(job: JobDep, runner: RunnerDep) -> JobView:
    """Cancel: a queued job at once, a running one by stopping its Ray job. Idempotent."""
    job = runner.cancel(job.id)
    return views.fresh_view(job, runner.job_dir(job.id))


@router.delete("/jobs/{job_id}", status_code=204, responses=errors(404, 409))
def delete_job(job: JobDep, runner: RunnerDep) -> Response:
    """Delete a finished job: its record and everything under its storage prefix."""
    if not job.state.is_terminal():
        raise ApiError(409, "job_not_finished", f"job is {job.state}; cancel it first, then delete it")
    try:
        deleted = runner.delete(job)
    except StillStopping as exc:
        raise ApiError(
            409,
            "job_still_stopping",
            f"the job's Ray driver ({exc.submission_id}) has not exited yet; its folder is deleted only after "
            "it has, so that it cannot write into it again: try again shortly",
            headers={"Retry-After": "10"},
        ) from None
    if not deleted:
        raise ApiError(409, "job_not_finished", "the job changed state meanwhile; try again")
    return Response(status_code=204)


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses=errors(404))
def list_checkpoints(job: JobDep, runner: RunnerDep) -> CheckpointList:
    """The checkpoints still kept (manifest.json), oldest epoch first."""
    cps = jobdir.checkpoints(runner.job_dir(job.id))
    return CheckpointList(job_id=job.id, checkpoints=[CheckpointView.model_validate(c.model_dump()) for c in cps])


@router.get(
    "/jobs/{job_id}/checkpoints/best",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the checkpoint; its sha256 is in X-Checkpoint-SHA256",
        },
        **errors(404, 409, 502),
    },
)
def best_checkpoint(job: JobDep, runner: RunnerDep) -> StreamingResponse:
    """Download the best checkpoint. It is hashed in a first streaming pass and only sent when it matches
    the sha256/size the trainer recorded (an error cannot be reported once the body has started)."""
    best = jobdir.best_checkpoint(runner.job_dir(job.id))
    if best is None:
        raise ApiError(409, "no_checkpoint", f"job {job.id} has no checkpoint yet (state {job.state})")
    name = f"{job.id}-epoch{best.epoch}.pt" if best.epoch is not None else f"{job.id}-best.pt"
    return verified_download(
        runner.job_dir(job.id), best.uri, best.sha256, best.size, name, "X-Checkpoint-SHA256", {"epoch": best.epoch}
    )


@router.get(
    "/jobs/{job_id}/checkpoints/{epoch}/file",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the checkpoint; its sha256 is in X-Checkpoint-SHA256",
        },
        **errors(404, 502),
    },
)
def checkpoint_file(job: JobDep, runner: RunnerDep, epoch: int) -> StreamingResponse:
    """Download one kept checkpoint (see GET .../checkpoints), verified like the best one."""
    entry = next((c for c in jobdir.checkpoints(runner.job_dir(job.id)) if c.epoch == epoch), None)
    if entry is None:
        raise ApiError(404, "not_found", f"job {job.id} keeps no checkpoint of epoch {epoch}")
    return verified_download(
        runner.job_dir(job.id),
        entry.uri,
        entry.sha256,
        entry.size,
        f"{job.id}-epoch{epoch}.pt",
        "X-Checkpoint-SHA256",
        {"epoch": epoch},
    )


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=errors(404))
def list_artifacts(job: JobDep, runner: RunnerDep) -> ArtifactList:
    """The best checkpoint exported for use outside trainctl (written at the end of a run; see spec.exports)."""
    found = jobdir.artifacts(runner.job_dir(job.id))
    return ArtifactList(
        job_id=job.id, artifacts=[ArtifactView(**a.model_dump(include=set(ArtifactView.model_fields))) for a in found]
    )


@router.get(
    "/jobs/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the file; its sha256 is in X-Artifact-SHA256",
        },
        **errors(404, 502),
    },
)
def download_artifact(
    job: JobDep, runner: RunnerDep, name: Annotated[str, FastApiPath(max_length=128)]
) -> StreamingResponse:
    """Download one exported model, verified against its recorded sha256/size like a checkpoint."""
    found = next((a for a in jobdir.artifacts(runner.job_dir(job.id)) if a.name == name), None)
    if found is None:
        raise ApiError(404, "not_found", f"job {job.id} has no artifact {name!r}; see /v1/jobs/{job.id}/artifacts")
    return verified_download(
        runner.job_dir(job.id),
        found.uri,
        found.sha256,
        found.size,
        f"{job.id}-{name}",
        "X-Artifact-SHA256",
        {"name": name},
    )


def verified_download(
    job_dir: str,
    uri: str,
    sha256: str | None,
    size: int | None,
    filename: str,
    sha_header: str,
    context: dict[str, Any],
) -> StreamingResponse:
    """Stream a stored file only once it matches the sha256/size the trainer recorded: it is hashed in a first
    pass, because an error can no longer be reported once the body has started.

    The job's own files name the file, and the job's code path wrote them: nothing outside the job's own prefix
    is read (an absolute path, file:// URI, `..` or symlink pointing at the admin token, say), and nothing
    whose hash was not recorded is sent."""
    if not objstore.within(uri, job_dir):
        raise ApiError(
            502,
            "checkpoint_corrupt",
            "the recorded file lies outside the job's storage prefix; refusing to read it",
            context,
        )
    if not sha256:
        raise ApiError(
            502,
            "checkpoint_corrupt",
            "the file has no recorded sha256, so it cannot be verified; refusing to send it",
            context,
        )
    digest, actual_size = hashlib.sha256(), 0
    try:
        for chunk in objstore.iter_chunks(uri):
            digest.update(chunk)
            actual_size += len(chunk)
    except FileNotFoundError:
        raise ApiError(502, "checkpoint_corrupt", "the file is listed but missing from storage", context) from None
    sha = digest.hexdigest()
    if sha256 != sha or (size is not None and size != actual_size):
        raise ApiError(
            502,
            "checkpoint_corrupt",
            "the stored file does not match its recorded sha256/size",
            {
                **context,
                "expected_sha256": sha256,
                "actual_sha256": sha,
                "expected_size": size,
                "actual_size": actual_size,
            },
        )
    return StreamingResponse(
        objstore.iter_chunks(uri),
        media_type="application/octet-stream",
        headers={
            sha_header: sha,
            "Content-Length": str(actual_size),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
