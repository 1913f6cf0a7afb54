"""What a status poll's database reads cost the server, as separate statements against one round trip, on
SQLite and PostgreSQL (issue 22 item 6: server CPU per request <= 2 ms).

    .venv/bin/python bench/poll_reads.py [--reads 3000] [--rounds 3] [--backends sqlite,postgresql]

A poll authenticates its bearer token and reads a job (`GET /v1/jobs/{id}`) or a page of jobs with their
count (`GET /v1/jobs`). For each, in one process on a kept connection as the poll threads use
(`Store.one_connection(kept=True)`), with 100 stored jobs:
  - one job, before:  `token_identity` then `get`             (two statements)
  - one job, after:   `identity_and_job`                      (one: the token's row joined with the job's)
  - a page, before:   the count, then the page                (two statements, as Store.list ran them)
  - a page, after:    `Store.list`: the page carrying its count (one)
Prints the process's CPU per read (time.process_time: this process, not the database server) and each
"after"'s ratio to its "before", in alternating rounds (this machine is noisy: read the ratios).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import bindparam, select  # noqa: E402

from service.engine import store as store_module  # noqa: E402
from service.engine.store import JobModel, Store  # noqa: E402
from tests.plugins.postgres import start_postgres  # noqa: E402
from trainer.spec import JobSpec  # noqa: E402

TOKEN = "b" * 64


# Store.list's status path as it was before the page carried its count: the count, then the page.
COUNT, _ = store_module._list_queries(False, True, None)
PAGE_BEFORE = (
    select(JobModel.__table__)
    .where(JobModel.owner_id == bindparam("owner_id"))
    .order_by(JobModel.seq.desc())
    .limit(bindparam("limit"))
    .offset(bindparam("offset"))
)


def page_before(store: Store, owner_id: str) -> tuple[list[Any], int]:
    params = {"owner": None, "owner_id": owner_id, "limit": 50, "offset": 0}
    with store._reading() as conn:
        total = conn.scalar(COUNT, params) or 0
        return [store._snapshot(row) for row in conn.execute(PAGE_BEFORE, params)], total


def measure(store: Store, owner_id: str, job_id: str, reads: int) -> dict[str, float]:
    cases: dict[str, Callable[[], object]] = {
        "one job, before (2 statements)": lambda: (store.token_identity(TOKEN), store.get(job_id)),
        "one job, after (1 statement)": lambda: store.identity_and_job(TOKEN, job_id),
        "a page, before (2 statements)": lambda: page_before(store, owner_id),
        "a page, after (1 statement)": lambda: store.list(owner_id=owner_id, limit=50, offset=0),
    }
    out = {}
    with store.one_connection(kept=True):
        for name, read in cases.items():
            for _ in range(50):  # warm: statement caches, snapshots
                read()
            t0 = time.process_time()
            for _ in range(reads):
                read()
            out[name] = (time.process_time() - t0) / reads * 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reads", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="sqlite,postgresql")
    args = p.parse_args()
    pg = start_postgres() if "postgresql" in args.backends else None
    try:
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory(prefix="poll-reads-") as tmp:
                url = pg.create_database() if backend == "postgresql" and pg else Path(tmp) / "jobs.db"
                store = Store(url)
                store.create_schema()
                owner_id = store.add_token("bob", TOKEN)
                ids = [store.create_job("bob", JobSpec(), owner_id=owner_id)[0].id for _ in range(100)]
                rounds = [measure(store, owner_id, ids[50], args.reads) for _ in range(args.rounds)]
                store.close()
            print(f"== {backend}: CPU ms per read (this process), mean of {args.rounds} rounds of {args.reads}")
            means = {name: statistics.mean(r[name] for r in rounds) for name in rounds[0]}
            names = list(means)
            for i, name in enumerate(names):
                ratio = f"  ({means[name] / means[names[i - 1]]:.2f}x of before)" if "after" in name else ""
                spread = ", ".join(f"{r[name]:.3f}" for r in rounds)
                print(f"  {name:32s} {means[name]:.3f} ms  [{spread}]{ratio}")
    finally:
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
