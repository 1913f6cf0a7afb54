"""Where a status poll's CPU goes: N in-process requests through the real app (real SQLite, real local
storage, real auth and middleware; a fake Ray), profiled with cProfile.

    .venv/bin/python bench/profile_poll.py [--requests 2000] [--epochs 200] [--top 25] [--route one|list|both]
                                           [--etag] [--sort cumulative|tottime] [--threadpool]

The app is driven as raw ASGI calls on one event loop (no HTTP client, no sockets), and FastAPI's
threadpool hand-off is replaced by a direct call so that cProfile (one thread) sees the handler's work too.
One job is RUNNING with `--epochs` lines in its metrics.jsonl (a long training run's file), 99 more are
QUEUED. Prints CPU ms per request for each route and the top functions by cumulative time. `--etag` sends
the previous answer's ETag back in If-None-Match (a client that polls an unchanged job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.common.settings import load_settings  # noqa: E402
from service.engine.states import JobState  # noqa: E402
from service.server.app import create_app  # noqa: E402
from tests.service.fakes import FakeRay  # noqa: E402
from trainer.spec import JobSpec  # noqa: E402

# What a poll's time is spent on: (label, file suffix, function); the labels' indentation shows nesting.
PARTS = [
    ("request timer middleware (whole request inside it)", "starlette/middleware/base.py", "__call__"),
    ("request timer middleware (whole request inside it)", "service/server/metrics.py", "timed"),
    ("FastAPI dependencies (auth, job row, parameters)", "fastapi/dependencies/utils.py", "solve_dependencies"),
    ("  auth: token lookup (store.token_owner)", "service/engine/store.py", "token_owner"),
    ("  the job's row (store.get)", "service/engine/store.py", "get"),
    ("handler: GET /v1/jobs/{id}", "service/api/jobs.py", "get_job"),
    ("handler: GET /v1/jobs", "service/api/jobs.py", "list_jobs"),
    ("  rows for the list (store.list)", "service/engine/store.py", "list"),
    ("    Job snapshots from rows (Job.of)", "service/engine/store.py", "of"),
    ("  job dir files: stat + read + parse (views.read_files)", "service/api/views.py", "read_files"),
    ("  metrics.jsonl read + parse (jobdir.read_metrics)", "service/engine/jobdir.py", "read_metrics"),
    ("    parse (contract.parse_metrics)", "trainer/contract.py", "parse_metrics"),
    ("  build the JobView (job_view)", "service/api/schemas.py", "job_view"),
    ("  build the JobView (job_view)", "service/api/views.py", "job_view"),
    ("  render JSON + ETag (views.render_job/render_list)", "service/api/views.py", "render_job"),
    ("  render JSON + ETag (views.render_job/render_list)", "service/api/views.py", "render_list"),
    ("response model validation + JSON (FastAPI)", "fastapi/routing.py", "serialize_response"),
]


async def _direct(func: Any, *args: Any, **_: Any) -> Any:
    return func(*args)


def metrics_line(epoch: int) -> str:
    return json.dumps(
        {
            "epoch": epoch,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 1.1,
            "val_acc": 0.4 + epoch / 10_000,
            "lr": 0.05,
            "images_per_s": 1000.0,
            "epoch_seconds": 3.0,
            "time": 1e9 + epoch,
        }
    )


class AsgiDriver:
    """GET requests straight into the ASGI app: (status, headers, body)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        raw_path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1", **headers}.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": self.state,
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body

    state: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def in_process_app(prefix: str, **settings: Any) -> AsyncIterator[tuple[Any, AsgiDriver, dict[str, str]]]:
    """The real app on a fresh data dir with a fake Ray, its lifespan entered and its reconciler stopped (the
    benches drive the store themselves): (app state, ASGI driver, the admin's auth headers)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    config = load_settings(
        data_dir=work / "data",
        reconcile_interval_s=3600,
        ray_address="http://127.0.0.1:1",
        data_roots=str(work),
        **settings,
    )
    app = create_app(config, ray=FakeRay())
    async with app.router.lifespan_context(app):
        state = app.state.trainctl
        await state.reconciler.stop()
        yield state, AsgiDriver(app), {"Authorization": f"Bearer {config.admin_token_path.read_text().strip()}"}


async def run(args: argparse.Namespace) -> None:
    async with in_process_app("trainctl-profile-") as (state, driver, headers):
        store = state.store
        spec = JobSpec.model_validate({"optim": {"epochs": 10_000}, "data": {"val_fraction": 0.1}})
        ids = [store.create_job("admin", spec, None, None)[0].id for _ in range(100)]
        running = ids[0]
        store.transition(running, JobState.STARTING, ray_submission_id="sub-1", attempts=1)
        store.transition(running, JobState.RUNNING)
        job_dir = Path(state.runner.job_dir(running))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "metrics.jsonl").write_text("".join(metrics_line(e) + "\n" for e in range(1, args.epochs + 1)))

        routes = {"one": f"/v1/jobs/{running}", "list": "/v1/jobs"}
        chosen = list(routes) if args.route == "both" else [args.route]
        if not args.threadpool:
            anyio.to_thread.run_sync = _direct  # type: ignore[assignment]  # the handler on this thread: profiled
        for name in chosen:
            path = routes[name]
            etags: dict[str, str] = {}
            for _ in range(50):  # warm-up (imports, caches)
                status, out_headers, _body = await driver.get(path, headers)
                assert status == 200, (status, _body[:300])
                if "etag" in out_headers:
                    etags[path] = out_headers["etag"]
            send = {**headers, **({"If-None-Match": etags[path]} if args.etag and path in etags else {})}
            prof = cProfile.Profile()
            statuses: dict[int, int] = {}
            cpu0 = time.process_time()
            prof.enable()
            for _ in range(args.requests):
                status, _h, _b = await driver.get(path, send)
                statuses[status] = statuses.get(status, 0) + 1
            prof.disable()
            cpu = time.process_time() - cpu0
            # cProfile roughly doubles the time of call-heavy Python code: time it again without it.
            cpu0 = time.process_time()
            for _ in range(args.requests):
                await driver.get(path, send)
            bare = time.process_time() - cpu0
            print(
                f"== GET {path.replace(running, '{id}')}: {args.requests} requests, statuses {statuses}; CPU "
                f"{1000 * bare / args.requests:.2f} ms/request unprofiled ({1000 * cpu / args.requests:.2f} "
                "under cProfile)",
                flush=True,
            )
            stats = pstats.Stats(prof)
            total = sum(tt for _cc, _nc, tt, _ct, _callers in stats.stats.values())  # type: ignore[attr-defined]
            print(f"  parts (cumulative, under cProfile; they nest as indented; total {total:.2f} s):")
            for label, suffix, name in PARTS:
                ct = sum(
                    v[3]
                    for (file, _line, func), v in stats.stats.items()  # type: ignore[attr-defined]
                    if file.endswith(suffix) and func == name
                )
                if ct:
                    print(f"    {label:<58} {1000 * ct / args.requests:6.3f} ms  {100 * ct / total:5.1f} %")
            if args.top:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(args.sort).print_stats(args.top)
                print(out.getvalue(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--top", type=int, default=0, help="also print the top N functions")
    p.add_argument("--route", choices=["one", "list", "both"], default="both")
    p.add_argument("--etag", action="store_true")
    p.add_argument(
        "--threadpool",
        action="store_true",
        help="keep FastAPI's threadpool hand-off of sync handlers and dependencies (as served; its CPU is "
        "counted, but cProfile then misses what runs on the pool's threads)",
    )
    p.add_argument("--sort", default="cumulative", help="pstats order: cumulative, tottime, ...")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
