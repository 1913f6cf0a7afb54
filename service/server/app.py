"""The FastAPI app, built by `create_app(settings)`. Its lifespan runs the start-up steps (service/server/startup.py:
data dir, migrations, admin token) and starts the reconciler; on shutdown it stops them again.

Run it with `trainctl serve`, or `uvicorn --factory service.server.app:app_from_env` (settings from TRAINCTL_*).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI

from service.api import compare, estimates, events, health, jobs, limits, plots, prometheus, tokens
from service.api.deps import polls_can_run_inline, polls_can_try_cache
from service.api.errors import install_error_handlers
from service.api.openapi import install_openapi, operation_id
from service.api.query import reject_unknown_query
from service.common.keyfile import load_or_create_secret
from service.common.settings import Settings, load_settings
from service.engine.notify import Notifier
from service.engine.rayjobs import RayJobs, RayJobsClient
from service.engine.reconciler import Reconciler
from service.engine.runner import Runner
from service.engine.store import Store
from service.server import startup
from service.server.guards import BodyLimit, LoopbackHostOnly
from service.server.metrics import Metrics
from service.ui import routes as ui
from service.ui import session

log = logging.getLogger("trainctl")

VERSION = "0.1.0"
# Threads for status polls that cannot run on the event loop (PostgreSQL, S3): each keeps one database
# connection. A poll holds one for a few round trips, so a handful serve 200 polls/s (bench/api_load.py).
POLL_THREADS = 4


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
    # Status polls run their reads on the event loop (service/api/deps.py run_poll): only when nothing they
    # touch can wait on a network, i.e. SQLite and local storage. Else on these threads, each with its own
    # database connection.
    polls_inline: bool = False
    poll_threads: ThreadPoolExecutor | None = None
    # PostgreSQL with the read cache on: a poll tries the loop with cached reads first (deps.run_poll).
    polls_try_cache: bool = False


def create_app(
    settings: Settings | None = None, *, ray: RayJobs | None = None, announce_startup: bool = True
) -> FastAPI:
    """The app; `ray` replaces the real Ray Jobs client (tests pass a fake). `announce_startup=False`: the
    caller ran startup.prepare and told the operator already (`trainctl serve`), so the lifespan's second,
    idempotent run only logs at debug level."""
    settings = settings or load_settings()
    startup.refuse_unsafe_auth(settings)  # here too, so a bad setting fails before anything is served
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if announce_startup:
            store = startup.prepare(settings)
        else:
            store = startup.prepare(settings, say=log.debug, warn=log.debug)
        if settings.read_cache:
            store.cache_reads()
        notifier = Notifier(settings)
        notifier.start()
        runner = Runner(settings, store, ray or RayJobsClient(settings.ray_address), notifier)
        reconciler = Reconciler(runner, settings.reconcile_interval_s)
        metrics.attach(runner, reconciler)
        sessions = session.Sessions(load_or_create_secret(settings.session_secret_path))
        slow = limits.SlowPool(settings.slow_workers, settings.slow_queue)
        streams = limits.StreamSlots(settings.max_event_streams_per_owner, settings.max_event_streams)
        inline = polls_can_run_inline(store.dialect, settings.storage_root)
        poll_threads = None if inline else ThreadPoolExecutor(POLL_THREADS, thread_name_prefix="trainctl-poll")
        app.state.trainctl = AppState(
            settings,
            store,
            runner,
            reconciler,
            sessions,
            slow=slow,
            plot_cache=limits.PlotCache(),
            streams=streams,
            polls_inline=inline,
            poll_threads=poll_threads,
            polls_try_cache=not inline and polls_can_try_cache(store, settings.storage_root),
        )
        reconciler.start()
        try:
            yield
        finally:
            await reconciler.stop()
            await asyncio.to_thread(notifier.stop)  # sends what is queued, for a few seconds at most
            slow.close()
            if poll_threads is not None:
                poll_threads.shutdown(wait=True, cancel_futures=True)  # before the store closes their connections
            metrics.detach()
            store.close()

    app = FastAPI(
        title="trainctl",
        version=VERSION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        description="Distributed training jobs on Ray. Authenticate with `Authorization: Bearer <token>`; "
        "the web dashboard is at /ui/.",
    )
    install_error_handlers(app)
    install_openapi(app)
    app.state.metrics = metrics
    app.add_middleware(metrics.middleware)  # innermost: times the routes
    # Outermost last: the Host check runs first, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if not settings.auth:
        app.add_middleware(LoopbackHostOnly)
    strict_query = [Depends(reject_unknown_query)]  # /v1 answers 422 to a query parameter it does not take
    app.include_router(jobs.router, prefix="/v1", dependencies=strict_query)
    app.include_router(estimates.router, prefix="/v1", dependencies=strict_query)
    app.include_router(events.router, prefix="/v1", dependencies=strict_query)
    app.include_router(plots.router, prefix="/v1")  # PNGs for <img>: the dashboard adds a cache-busting ?t=
    app.include_router(tokens.router, prefix="/v1", dependencies=strict_query)
    app.include_router(compare.router, prefix="/v1", dependencies=strict_query)
    app.include_router(health.router)
    app.include_router(prometheus.router)
    ui.install(app)
    return app


def app_from_env() -> FastAPI:
    return create_app(load_settings())
