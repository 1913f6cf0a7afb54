"""What `GET /v1/jobs`'s filters cost with 1,000 stored jobs: server CPU per request of each filter and sort
beside the unfiltered list, in one process, on SQLite and PostgreSQL (issue 26: filters must not slow the
status path; they use indexes).

    .venv/bin/python bench/list_filters.py [--jobs 1000] [--requests 300] [--backends sqlite,postgresql]

The real app (real store, auth, middleware; a fake Ray) is driven as raw ASGI calls on one event loop, as
bench/profile_poll.py does. The jobs get names, 3 of 10 projects and 2 of 20 tags each, so a tag or project
filter selects ~1/10 of them; every request asks for one page (50 jobs). Prints CPU ms/request for each
query and its ratio to the unfiltered list measured in the same run (this machine is noisy: read the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.profile_poll import in_process_app  # noqa: E402
from service.engine.store import Labels  # noqa: E402
from tests.plugins.postgres import start_postgres  # noqa: E402
from trainer.spec import JobSpec  # noqa: E402

QUERIES = {
    "unfiltered (newest first)": "/v1/jobs",
    "tag=t7": "/v1/jobs?tag=t7",
    "tag=t7&tag=t8 (both)": "/v1/jobs?tag=t7&tag=t8",
    "project=p3": "/v1/jobs?project=p3",
    "name=run-12 (substring)": "/v1/jobs?name=run-12",
    "state=queued": "/v1/jobs?state=queued",
    "sort=name": "/v1/jobs?sort=name",
    "sort=best_val_acc": "/v1/jobs?sort=best_val_acc",
    "project=p3&tag=t7&sort=name": "/v1/jobs?project=p3&tag=t7&sort=name",
}


async def measure(database_url: str, jobs: int, requests: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with in_process_app("trainctl-filters-", database_url=database_url, max_queued_jobs_per_owner=jobs + 1) as (
        state,
        driver,
        headers,
    ):
        spec = JobSpec.model_validate({"optim": {"epochs": 3}})
        for i in range(jobs):
            labels = Labels(name=f"run-{i}", project=f"p{i % 10}", tags=(f"t{i % 20}", f"t{(i + 7) % 20}"))
            state.store.create_job("admin", spec, None, None, labels)
        for name, path in QUERIES.items():
            for _ in range(20):  # warm-up: prepared statements, caches
                status, _h, body = await driver.get(path, headers)
                assert status == 200, (name, status, body[:300])
            cpu0 = time.process_time()
            for _ in range(requests):
                await driver.get(path, headers)
            out[name] = 1000 * (time.process_time() - cpu0) / requests
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--backends", default="sqlite,postgresql")
    args = p.parse_args()
    for backend in args.backends.split(","):
        pg = start_postgres() if backend == "postgresql" else None
        try:
            url = pg.create_database("filters") if pg is not None else ""
            figures = asyncio.run(measure(url, args.jobs, args.requests))
        finally:
            if pg is not None:
                pg.stop()
        base = figures["unfiltered (newest first)"]
        print(f"== {backend}: {args.jobs} stored jobs, {args.requests} requests per query, CPU ms/request")
        for name, ms in figures.items():
            print(f"  {name:<32} {ms:6.2f} ms  ×{ms / base:4.2f} of unfiltered")


if __name__ == "__main__":
    main()
