"""Status-poll latency in one process while another thread of it runs Python (as a reconcile pass does), for
several GIL switch intervals, interleaved so that each is measured under the same machine load.

    .venv/bin/python bench/poll_latency.py [--requests 300] [--intervals-ms 5,0.5] [--rounds 2]
                                           [--polls inline,threadpool]

The real app (real SQLite, local storage, auth, middleware; a fake Ray) driven by raw ASGI calls on one event
loop, as bench/profile_poll.py does: 1 job RUNNING with 200 epochs in its metrics.jsonl, 99 QUEUED; polls
alternate GET /v1/jobs/{id} and GET /v1/jobs, 2 ms apart. Prints p50/p99/max per interval and round.
`trainctl serve` sets service/server/serve.py's GIL_SWITCH_INTERVAL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.profile_poll import in_process_app, metrics_line  # noqa: E402
from service.engine.states import JobState  # noqa: E402
from service.server.app import POLL_THREADS  # noqa: E402
from trainer.spec import JobSpec  # noqa: E402


def busy(stop: threading.Event) -> None:
    """Pure Python until stopped: holds the GIL except when the interpreter asks it to let go."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


async def run(args: argparse.Namespace) -> None:
    async with in_process_app("trainctl-latency-") as (state, driver, headers):
        spec = JobSpec.model_validate({"optim": {"epochs": 10_000}})
        ids = [state.store.create_job("admin", spec, None, None)[0].id for _ in range(100)]
        state.store.transition(ids[0], JobState.STARTING, ray_submission_id="sub-1", attempts=1)
        state.store.transition(ids[0], JobState.RUNNING)
        job_dir = Path(state.runner.job_dir(ids[0]))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "metrics.jsonl").write_text("".join(metrics_line(e) + "\n" for e in range(1, 201)))
        paths = [f"/v1/jobs/{ids[0]}", "/v1/jobs"]
        for i in range(50):  # warm-up
            assert (await driver.get(paths[i % 2], headers))[0] == 200
        runs = [(m, float(x)) for m in args.polls.split(",") for x in args.intervals_ms.split(",")]
        # "threadpool": the app's poll threads, as served on PostgreSQL (on SQLite the app makes none)
        threads = state.poll_threads or ThreadPoolExecutor(POLL_THREADS, thread_name_prefix="trainctl-poll")
        for round_ in range(args.rounds):
            for mode, interval_ms in runs:
                state.polls_inline = mode == "inline"
                state.poll_threads = None if state.polls_inline else threads
                sys.setswitchinterval(interval_ms / 1000)
                stop = threading.Event()
                thread = threading.Thread(target=busy, args=(stop,))
                thread.start()
                ms = []
                try:
                    for i in range(args.requests):
                        t0 = time.perf_counter()
                        await driver.get(paths[i % 2], headers)
                        ms.append((time.perf_counter() - t0) * 1000)
                        await asyncio.sleep(0.002)
                finally:
                    stop.set()
                    thread.join()
                ms.sort()
                print(
                    f"round {round_ + 1}, polls {mode:<10}, switch interval {interval_ms:g} ms: "
                    f"p50 {statistics.median(ms):.2f} ms  "
                    f"p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.2f} ms  max {ms[-1]:.2f} ms",
                    flush=True,
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--intervals-ms", default="5,0.5")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--polls",
        default="inline",
        help="inline (on the event loop, as on SQLite), threadpool (to the poll threads, as on PostgreSQL), or both",
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
