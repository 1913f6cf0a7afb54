"""Request dependencies as `Annotated` aliases, so routes read as plain typed parameters."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, TypeVar, cast

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError

import objstore
from service.api import auth, limits
from service.api.errors import ApiError, not_found
from service.common.settings import Settings
from service.engine.reconciler import Reconciler
from service.engine.runner import Runner
from service.engine.store import Job, NotCached, Store
from service.ui import session

if TYPE_CHECKING:
    from service.server.app import (
        AppState,  # not at run time: service.server.app imports the routers, which import this
    )

T = TypeVar("T")


def _state(request: Request) -> AppState:
    return cast("AppState", request.app.state.trainctl)


# `async def`, though nothing here awaits: FastAPI runs a plain `def` dependency in its threadpool; each such
# hand-off costs more CPU than a status poll's whole database read, and /healthz must answer while that pool is
# full of slow requests.
async def get_settings(request: Request) -> Settings:
    return _state(request).settings


async def get_store(request: Request) -> Store:
    return _state(request).store


async def get_runner(request: Request) -> Runner:
    return _state(request).runner


async def get_reconciler(request: Request) -> Reconciler:
    return _state(request).reconciler


async def get_slow_pool(request: Request) -> limits.SlowPool:
    return _state(request).slow


async def get_plot_cache(request: Request) -> limits.PlotCache:
    return _state(request).plot_cache


async def get_stream_slots(request: Request) -> limits.StreamSlots:
    return _state(request).streams


async def get_app_state(request: Request) -> AppState:
    return _state(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
ReconcilerDep = Annotated[Reconciler, Depends(get_reconciler)]
SlowPoolDep = Annotated[limits.SlowPool, Depends(get_slow_pool)]
PlotCacheDep = Annotated[limits.PlotCache, Depends(get_plot_cache)]
StreamSlotsDep = Annotated[limits.StreamSlots, Depends(get_stream_slots)]
AppStateDep = Annotated["AppState", Depends(get_app_state)]


def polls_can_run_inline(dialect: str, storage_root: str) -> bool:
    """Whether a status poll's reads may run on the event loop: only when none can wait on a network (a
    PostgreSQL round trip, an S3 stat of metrics.jsonl) and block every other request meanwhile."""
    return dialect == "sqlite" and not objstore.is_s3(storage_root)


def polls_can_try_cache(store: Store, storage_root: str) -> bool:
    """Whether a status poll may first try the event loop with the read cache alone (PostgreSQL with
    `Store.cache_reads`): its files must be local too, or a hit would still wait on S3."""
    return store.read_cache is not None and not objstore.is_s3(storage_root)


async def run_poll(state: AppState, poll: Callable[[], T]) -> T:
    """Run a status poll's blocking part (auth, the job's row, its files): on the event loop itself when
    all it touches is local (SQLite, local storage: tens of microseconds, never waiting on a network), else
    in ONE hand-off to the app's poll threads. A plain-`def` route pays a hand-off per sync dependency and one
    for the handler; each is a pair of thread wake-ups that wait for the GIL and for a CPU, which on a busy
    machine set a poll's latency far more than its own work (bench/RESULTS.md, issue 22 item 6)."""

    if state.polls_inline or state.poll_threads is None:
        with state.store.one_connection(kept=True):  # the loop's own: never waits for the pool
            return poll()
    if state.polls_try_cache:  # PostgreSQL: most polls re-read what the read cache holds, and need no thread
        try:
            with state.store.cached_only():
                return poll()
        except NotCached:
            pass  # a read the cache could not answer: the poll (reads only) runs again, on a poll thread
    ctx = contextvars.copy_context()  # as Starlette's threadpool does: the request's context vars go along
    return await asyncio.get_running_loop().run_in_executor(state.poll_threads, ctx.run, _poll_kept, state.store, poll)


def _poll_kept(store: Store, poll: Callable[[], T]) -> T:
    """A poll on its poll thread's own connection (`Store.one_connection(kept=True)`), never the pool's: no
    checkout and return per poll, which on PostgreSQL are a pre-ping round trip and a rollback. A connection
    that dropped meanwhile (the database restarted) fails one read; the poll, reads only, runs again on a new
    one, which is what the pool's pre-ping gave."""
    try:
        with store.one_connection(kept=True):
            return poll()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with store.one_connection(kept=True):
        return poll()


# Declared in /openapi.json as the `bearer` security scheme (Swagger's "Authorize" button); auto_error=False
# so a missing token gets our own 401 body rather than FastAPI's.
bearer = HTTPBearer(
    scheme_name="bearer",
    auto_error=False,
    description="an API token: <data dir>/admin-token, or one made by `trainctl token create`",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]  # async: parses the header only


def get_principal(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    credentials: BearerDep,
) -> auth.Principal:
    return principal_of(request, settings, store, credentials)


def principal_of(
    request: Request, settings: Settings, store: Store, credentials: HTTPAuthorizationCredentials | None
) -> auth.Principal:
    """Who sent the request (its bearer token, else the dashboard's session cookie); a 401 otherwise. Reads
    the database: call it where blocking is allowed (see `run_poll`)."""
    if not settings.auth:
        return auth.Principal("local", is_admin=True)
    principal = auth.authenticate(store, f"Bearer {credentials.credentials}" if credentials else None)
    if principal is None and "authorization" not in request.headers:
        principal = session_principal(request, store)  # the dashboard's cookie (CSRF-checked)
    if principal is None:
        raise _unauthorized()
    return principal


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "missing or invalid token: send 'Authorization: Bearer <token>' (see <data dir>/admin-token)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def session_principal(request: Request, store: Store) -> auth.Principal | None:
    """The principal of the dashboard's session cookie, or None. A POST/DELETE with the cookie must carry
    the page's CSRF token (header X-CSRF-Token): a 403 otherwise, even though SameSite=Strict already
    keeps the cookie off cross-site requests."""
    cookie = request.cookies.get(session.COOKIE)
    sessions: session.Sessions = _state(request).sessions
    token_hash = sessions.token_hash(cookie)
    if cookie is None or token_hash is None:
        return None
    if request.method not in session.SAFE_METHODS and not sessions.csrf_ok(
        cookie, request.headers.get(session.CSRF_HEADER)
    ):
        raise ApiError(
            403,
            "csrf_failed",
            "this request came with the dashboard's session cookie but without "
            "its CSRF token (X-CSRF-Token); reload the page and try again",
        )
    who = store.token_identity(token_hash)
    if who is None or not sessions.issued_after(cookie, who.sessions_not_before):
        return None  # the token is gone, or this session was ended by a logout (on any replica)
    return auth.Principal(who.name, who.is_admin, who.owner_id, token_hash)


PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]
JobIdPath = Annotated[str, Path(max_length=64)]


def get_owned_job(job_id: JobIdPath, store: StoreDep, principal: PrincipalDep) -> Job:
    return owned_job(store, principal, job_id)


def owned_job(store: Store, principal: auth.Principal, job_id: str) -> Job:
    return _visible(store.get(job_id, cached=True), principal)


def polled_job(
    request: Request, settings: Settings, store: Store, credentials: HTTPAuthorizationCredentials | None, job_id: str
) -> Job:
    """`principal_of` and then `owned_job`, with the same answers (401, 404), in one database round trip
    for a bearer token, which is what a poller sends (the dashboard's cookie takes the two reads)."""
    token = credentials.credentials.strip() if settings.auth and credentials is not None else ""
    if not token:
        return owned_job(store, principal_of(request, settings, store, credentials), job_id)
    token_hash = auth.hash_token(token)
    who, job = store.identity_and_job(token_hash, job_id)
    if who is None:
        raise _unauthorized()
    return _visible(job, auth.holder_of(who, token_hash))


def _visible(job: Job | None, principal: auth.Principal) -> Job:
    # Another owner's job answers exactly like a missing one: ids are not confirmed to strangers. The admin
    # sees, cancels and deletes every job.
    if job is None or (job.owner_id != principal.owner_id and not principal.is_admin):
        raise not_found()
    return job


JobDep = Annotated[Job, Depends(get_owned_job)]


def require_admin(principal: PrincipalDep) -> auth.Principal:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "only the admin token may do this")
    return principal


AdminDep = Annotated[auth.Principal, Depends(require_admin)]
