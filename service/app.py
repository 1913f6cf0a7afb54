"""The FastAPI app, built by `create_app(settings)`. Its lifespan opens the store (creating the schema),
makes sure an admin token exists, and starts the reconciler; on shutdown it stops them again.

Run it with `trainctl serve`, or `uvicorn --factory service.app:app_from_env` (settings from TRAINCTL_*).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from service import auth, limits
from service.api import events, health, jobs, plots, prometheus, tokens
from service.api.openapi import install_openapi
from service.errors import install_error_handlers
from service.guards import BodyLimit, LoopbackHostOnly, is_loopback
from service.metrics import Metrics
from service.rayjobs import RayJobs, RayJobsClient
from service.reconciler import Reconciler
from service.runner import Runner
from service.settings import Settings, load_settings
from service.store import Store
from service.ui import routes as ui
from service.ui import session

log = logging.getLogger("trainctl")

VERSION = "0.1.0"


@dataclass
class AppState:
    settings: Settings
    store: Store
    runner: Runner
    reconciler: Reconciler
    sessions: session.Sessions
    slow: limits.SlowPool
    plot_cache: limits.PlotCache
    streams: limits.StreamSlots


def create_app(settings: Settings | None = None, *, ray: RayJobs | None = None) -> FastAPI:
    """The app; `ray` replaces the real Ray Jobs client (tests pass a fake)."""
    settings = settings or load_settings()
    if not settings.auth and not is_loopback(settings.host):
        raise ValueError(
            f"authentication can only be turned off on a loopback host (127.0.0.1, localhost), "
            f"not {settings.host!r}: anyone who reaches the port could run and delete jobs"
        )
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.data_dir, 0o700)  # the job database, tokens and default storage live here
        store = Store(settings.store_url)
        store.create_schema()  # migrations to head (also run by `trainctl serve` before it starts)
        restrict_files(settings)
        if settings.auth:
            if auth.ensure_admin_token(store, settings.admin_token_path):
                log.warning("created a new admin token; it is in %s", settings.admin_token_path)
        else:
            log.warning(
                "AUTHENTICATION IS DISABLED: anyone who can reach %s:%s can run and delete jobs",
                settings.host,
                settings.port,
            )
        runner = Runner(settings, store, ray or RayJobsClient(settings.ray_address))
        reconciler = Reconciler(runner, settings.reconcile_interval_s)
        metrics.attach(runner, reconciler)
        sessions = session.Sessions(session.load_or_create_secret(settings.session_secret_path))
        slow = limits.SlowPool(settings.slow_workers, settings.slow_queue)
        streams = limits.StreamSlots(settings.max_event_streams_per_owner, settings.max_event_streams)
        app.state.trainctl = AppState(
            settings, store, runner, reconciler, sessions, slow=slow, plot_cache=limits.PlotCache(), streams=streams
        )
        reconciler.start()
        try:
            yield
        finally:
            await reconciler.stop()
            slow.close()
            metrics.detach()
            store.close()

    app = FastAPI(
        title="trainctl",
        version=VERSION,
        lifespan=lifespan,
        description="Distributed training jobs on Ray. Authenticate with `Authorization: Bearer <token>`; "
        "the web dashboard is at /ui/.",
    )
    install_error_handlers(app)
    install_openapi(app)
    app.state.metrics = metrics
    app.middleware("http")(metrics.middleware)
    # Outermost last: the Host check runs first, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if not settings.auth:
        app.add_middleware(LoopbackHostOnly)
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(events.router, prefix="/v1")
    app.include_router(plots.router, prefix="/v1")
    app.include_router(tokens.router, prefix="/v1")
    app.include_router(health.router)
    app.include_router(prometheus.router)
    ui.install(app)
    return app


def restrict_files(settings: Settings) -> None:
    """Owner-only modes for the database (and SQLite's WAL/SHM files) and the token file."""
    for path in (
        settings.db_path,
        settings.db_path.with_name(settings.db_path.name + "-wal"),
        settings.db_path.with_name(settings.db_path.name + "-shm"),
        settings.admin_token_path,
    ):
        if path.exists():
            os.chmod(path, 0o600)


def app_from_env() -> FastAPI:
    return create_app(load_settings())
