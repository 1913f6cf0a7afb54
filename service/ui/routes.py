"""The dashboard's pages under /ui/ and the two JSON helpers its script needs beyond /v1.

Pages are rendered on the server (Jinja2, autoescaped) and carry their data in `data-*` attributes; the
one script (static/app.js) draws charts as SVG and follows GET /v1/jobs/{id}/events. A strict
Content-Security-Policy allows only our own script and stylesheet: no inline code, nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import yaml
from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

import objstore
from service.api import auth
from service.api import estimates as estimates_api
from service.api import jobs as jobs_api
from service.api.deps import PrincipalDep, ReconcilerDep, RunnerDep, SettingsDep, StoreDep, session_principal
from service.api.errors import ApiError
from service.api.schemas import JobView
from service.api.views import fresh_view, job_view
from service.common import safeyaml
from service.common.estimate import Estimate
from service.engine import jobdir
from service.engine.notify import shown_spec
from service.engine.states import JobState
from service.engine.store import Job
from service.ui import session
from trainer.contract import Summary
from trainer.spec import MAX_ECHO, PRESETS, WorkerRange

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",  # the cancel button must not be clickjacked
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_LOGIN_BODY = 4096


class LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="ui-static")

    @app.exception_handler(LoginRequired)
    async def _to_login(_: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/ui/login?next={quote(exc.next_path)}", status_code=303)


def _page_principal(request: Request, settings: Any, store: Any) -> auth.Principal:
    """The signed-in user of a page, or a redirect to the login page."""
    if not settings.auth:
        return auth.Principal("local", is_admin=True)
    principal = session_principal(request, store)
    if principal is None:
        raise LoginRequired(request.url.path)
    return principal


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    cookie = request.cookies.get(session.COOKIE)
    sessions: session.Sessions = request.app.state.trainctl.sessions
    csrf = sessions.csrf_token(cookie) if cookie and sessions.token_hash(cookie) else ""
    context.setdefault("principal", None)
    response = templates.TemplateResponse(request, name, {"csrf": csrf, **context}, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def _safe_next(value: str | None) -> str:
    """Only our own pages: never an open redirect to another site."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


def _same_origin(request: Request) -> bool:
    """A browser's POST names its origin; a form on another site must not log a victim in (login CSRF)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.rstrip("/") == f"{request.url.scheme}://{request.url.netloc}"


# --- sign in and out ----------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002
    return _render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request, settings: SettingsDep, store: StoreDep) -> Response:
    """Form fields `token` and `next`. A valid token sets the session cookie and redirects; a wrong one
    renders the form again with a 401 and says so."""
    body = await request.body()
    form = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace")) if len(body) <= MAX_LOGIN_BODY else {}
    token = (form.get("token") or [""])[0].strip()
    next_path = _safe_next((form.get("next") or [""])[0])
    if not _same_origin(request):
        return _render(request, "login.html", 403, next=next_path, error="sign-in from another site refused")
    if not settings.auth:
        return RedirectResponse(next_path, status_code=303)
    principal = auth.authenticate(store, f"Bearer {token}") if token else None
    if principal is None:
        return _render(
            request,
            "login.html",
            401,
            next=next_path,
            error="invalid token: paste an API token (the admin's is in <data dir>/admin-token)",
        )
    sessions: session.Sessions = request.app.state.trainctl.sessions
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        session.COOKIE,
        sessions.issue(auth.hash_token(token)),
        max_age=sessions.ttl_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
async def logout(request: Request, store: StoreDep) -> Response:
    """Ends the session server-side (every session of this token issued so far, on every replica) and
    clears the cookie. The form carries the CSRF token: another site cannot sign a user out."""
    body = await request.body()
    form = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace"))
    cookie = request.cookies.get(session.COOKIE)
    sessions: session.Sessions = request.app.state.trainctl.sessions
    if cookie and not sessions.csrf_ok(cookie, (form.get("csrf") or [""])[0]):
        raise ApiError(403, "csrf_failed", "sign-out without the page's CSRF token refused; reload the page")
    token_hash = sessions.token_hash(cookie)
    if cookie and token_hash:
        await asyncio.to_thread(store.end_sessions, token_hash)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- pages --------------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, settings: SettingsDep, store: StoreDep) -> HTMLResponse:
    principal = _page_principal(request, settings, store)
    return _render(request, "jobs.html", principal=principal, states=[s.value for s in JobState])


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, settings: SettingsDep, store: StoreDep, runner: RunnerDep) -> HTMLResponse:
    principal = _page_principal(request, settings, store)
    job = store.get(job_id)
    if job is None or job.owner_id != principal.owner_id:
        return _render(request, "missing.html", 404, principal=principal, job_id=job_id)
    try:
        view = fresh_view(job, runner.job_dir(job.id), with_spec=True)
        checkpoints = jobdir.checkpoints(runner.job_dir(job.id))
    except objstore.StorageUnavailable:
        view, checkpoints = job_view(job, with_spec=True), []
    search = job.spec.search
    return _render(
        request,
        "job.html",
        principal=principal,
        job=view,
        checkpoints=checkpoints,
        spec_yaml=yaml.safe_dump(shown_spec(job.spec), sort_keys=False, default_flow_style=None, width=100),
        search=search,
        params=sorted(search.space) if search else [],
        device=_device(job, view.metrics.model_dump() if view.metrics else None),
        workers=_workers(job, view),
        created=_when(job.created_at),
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, settings: SettingsDep, store: StoreDep, ids: str = "") -> HTMLResponse:
    """2-5 jobs on one chart with spec differences; the script reads GET /v1/compare (service/api/comparison.py)."""
    principal = _page_principal(request, settings, store)
    return _render(request, "compare.html", principal=principal, ids=ids)


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request, settings: SettingsDep, store: StoreDep) -> HTMLResponse:
    principal = _page_principal(request, settings, store)
    return _render(request, "submit.html", principal=principal, presets=sorted(PRESETS))


# --- JSON for the pages' script -----------------------------------------------------------------------------

_summaries: dict[str, Summary | None] = {}  # terminal jobs' summaries never change: read them once
_summaries_lock = threading.Lock()


def _summary(runner: Any, job: Job) -> Summary | None:
    with _summaries_lock:
        if job.id in _summaries:
            return _summaries[job.id]
    try:
        summary = jobdir.read_summary(runner.job_dir(job.id))
    except objstore.StorageUnavailable:
        return None
    with _summaries_lock:
        if len(_summaries) > 10_000:
            _summaries.clear()
        _summaries[job.id] = summary
    return summary


def _device(job: Job, metrics: dict[str, Any] | None) -> str:
    """What the run trains on: the trainer's own record where it wrote one, else what the spec asks for."""
    for key in ("device", "devices"):
        value = (metrics or {}).get(key)
        if value:
            return ", ".join(sorted(set(map(str, value)))) if isinstance(value, list) else str(value)
    use_gpu = job.spec.scaling.use_gpu
    kind = "GPU if any" if use_gpu is None else "GPU" if use_gpu else "CPU"
    return f"{job.spec.scaling.num_workers} × {kind}"


def _workers(job: Job, view: JobView) -> str:
    """The worker count over time, `2 (epochs 1-2) → 3 (epochs 3-5)` (app.js writes the same on each state
    event), or before the first epoch what the spec asks for (`1-3, elastic`)."""
    if view.workers:
        return " → ".join(
            f"{s.workers} (epoch{'s' if s.last_epoch > s.first_epoch else ''} {s.first_epoch}"
            f"{f'-{s.last_epoch}' if s.last_epoch > s.first_epoch else ''})"
            for s in view.workers
        )
    asked = job.spec.scaling.num_workers
    return f"{asked}, elastic" if isinstance(asked, WorkerRange) else str(asked)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@router.get("/api/jobs")
def jobs_table(
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    state: Annotated[list[jobs_api.StateParam] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> JSONResponse:
    """The jobs list's rows: progress with ETA for active jobs (fresh from their metrics), final test
    accuracy for finished ones (from summary.json), newest first."""
    jobs, total = store.list(owner_id=principal.owner_id, states=state, limit=limit, offset=0)
    now, rows = time.time(), []
    for job in jobs:
        active = not job.state.is_terminal() and job.state is not JobState.QUEUED
        view: JobView = fresh_view(job, runner.job_dir(job.id)) if active else job_view(job)
        summary = _summary(runner, job) if job.state.is_terminal() else None
        latest = view.metrics.model_dump() if view.metrics else None
        test_acc = summary.test_acc if summary else None
        if test_acc is None and latest:
            test_acc = latest.get("test_acc")  # where the run measures the test split every epoch
        rows.append(
            {
                "id": job.id,
                "name": job.name,
                "project": job.project,
                "tags": job.tags,
                "owner": job.owner,
                "state": job.state.value,
                "epoch": view.progress.epoch,
                "epochs": view.progress.epochs,
                "eta_seconds": view.progress.eta_seconds,
                "best_val_acc": view.best_val_acc,
                "test_acc": test_acc,
                "device": _device(job, latest),
                "age_seconds": round(now - job.created_at, 1),
                "search": job.spec.search is not None,
                "message": "; ".join(m for m in (job.message, job.spec_error) if m) or None,
            }
        )
    return JSONResponse({"jobs": rows, "total": total}, headers={"Cache-Control": "no-store"})


@router.post("/api/submit", status_code=201)
def submit_from_form(
    body: Annotated[dict[str, Any], Body()],
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    reconciler: ReconcilerDep,
    settings: SettingsDep,
    response: Response,
) -> JobView:
    """The submit form: `{"preset", "overrides_yaml"}`. The YAML is parsed here (browsers have no YAML
    parser); everything else is exactly POST /v1/jobs, 422 field errors included."""
    request = _form_request(body)
    # POST /v1/jobs itself (keyword arguments: the route's own dependencies, passed through).
    return jobs_api.submit_job(
        body=request,
        principal=principal,
        store=store,
        runner=runner,
        reconciler=reconciler,
        settings=settings,
        response=response,
    )


@router.post("/api/estimate")
def estimate_from_form(
    body: Annotated[dict[str, Any], Body()],
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> Estimate:
    """The submit form's estimate, shown before its button: POST /v1/estimates for the form's fields."""
    return estimates_api.make_estimate(
        body=_form_request(body), principal=principal, store=store, runner=runner, settings=settings
    )


def _form_request(body: dict[str, Any]) -> dict[str, Any]:
    """The form's `{"preset", "overrides_yaml"}` as a submission body; 422 naming `overrides` when the YAML
    is not a mapping."""
    text = body.get("overrides_yaml") or ""
    if not isinstance(text, str):
        raise ApiError(
            422,
            "invalid_request",
            "overrides_yaml must be a string",
            [{"field": "overrides", "message": "must be YAML text"}],
        )
    try:
        # no aliases or anchors, bounded nesting: a few hundred bytes never expand to gigabytes
        overrides = safeyaml.load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc)[:MAX_ECHO]  # it may quote the input: a prefix only
        raise ApiError(
            422,
            "invalid_request",
            f"the overrides are not valid YAML{where}",
            [{"field": "overrides", "message": f"not valid YAML{where}: {problem}"}],
        ) from None
    if not isinstance(overrides, dict):
        raise ApiError(
            422,
            "invalid_request",
            "the overrides must be a YAML mapping",
            [{"field": "overrides", "message": "must be a mapping like `optim.epochs: 3`"}],
        )
    request: dict[str, Any] = {"overrides": overrides}
    if body.get("preset"):
        request["preset"] = body["preset"]
    return request
