"""API load: the real `trainctl serve` on loopback, polled by N concurrent clients, on SQLite and PostgreSQL.

    .venv/bin/python bench/api_load.py [--backends sqlite,postgresql,postgresql-nocache] [--pollers 8] [--rate 200]
                                       [--seconds 30] [--jobs 100] [--no-running-job] [--py-spy DIR]
                                       [--access-log] [--head-nice N]

For each backend: a fresh data dir (and for PostgreSQL a fresh server from Debian's `postgresql`, as in the
tests), one `trainctl serve` attached to one shared local Ray head, `--jobs` jobs stored (the first one
really training, debug preset on small CIFAR-format batches, the rest queued behind it with one slot), then
`--pollers` clients together offer `--rate` requests/s for `--seconds` (each on a fixed schedule, catching
up after a slow answer; at most `--pollers` requests in flight, so the achieved rate shows when the server
cannot keep up), half `GET /v1/jobs/{id}` (a random stored job), half `GET /v1/jobs` (the
first page). Prints p50/p99/max latency and the achieved requests/s per backend and route. The clients run
on the same machine as the server: on a small machine they compete with it for CPU (say so with figures).
Target (issue 14): p99 <= 20 ms at 200 req/s on a 2-core machine with a job running.

The head runs at the nice value `trainctl serve` gives a head it starts (TRAINCTL_RAY_NICE, 10), so the job
trains at that priority; `--head-nice 0` shows what polls wait without it. The access log is off, as in
`serve` (TRAINCTL_ACCESS_LOG); `--access-log` turns it on. `postgresql-nocache` is PostgreSQL with the read
cache off (TRAINCTL_READ_CACHE=0, every poll reads the database): the baseline for `postgresql`, in the same
process; repeat backends to alternate them (`--backends postgresql-nocache,postgresql,postgresql-nocache,...`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.common.settings import Settings  # noqa: E402
from service.server.localray import LocalRayHead, free_port, stop_process_group  # noqa: E402
from tests.plugins.postgres import start_postgres  # noqa: E402
from tests.trainer.cifar_files import write_cifar_python  # noqa: E402

TRAINCTL = str(Path(sys.executable).with_name("trainctl"))
BACKENDS = ("sqlite", "postgresql", "postgresql-nocache")
PY_SPY = [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking"]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), e.g. the server's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_serve(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = data_dir.parent / f"serve-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [TRAINCTL, "serve", "--data-dir", str(data_dir), "--port", str(port)],
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code in (200, 503):
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_process_group(proc, grace_s=20)
    raise RuntimeError(f"serve did not answer:\n{log_path.read_text()[-3000:]}")


async def load(
    url: str, token: str, job_ids: list[str], pollers: int, rate: float, seconds: float
) -> dict[str, list[float]]:
    """{route: [latency_s, ...]} plus "errors" (as a list of 1.0s) and "elapsed" ([wall seconds])."""
    results: dict[str, list[float]] = {"GET /v1/jobs/{id}": [], "GET /v1/jobs": [], "errors": []}
    interval = pollers / rate  # each poller's period
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30, limits=limits
    ) as client:
        start = time.perf_counter() + 0.2
        end = start + seconds

        async def poller(i: int) -> None:
            rng = random.Random(i)
            n = 0
            while True:
                due = start + (i / pollers) * interval + n * interval
                if due >= end:
                    return
                n += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                single = (n + i) % 2 == 0
                path = f"/v1/jobs/{rng.choice(job_ids)}" if single else "/v1/jobs"
                t0 = time.perf_counter()
                try:
                    r = await client.get(path)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                if ok:
                    results["GET /v1/jobs/{id}" if single else "GET /v1/jobs"].append(dt)
                else:
                    results["errors"].append(1.0)

        await asyncio.gather(*(poller(i) for i in range(pollers)))
        # Wall time until the last answer: when the server falls behind, the schedule's requests take longer
        # than `seconds` to get through, and the achieved rate is below the offered one.
        results["elapsed"] = [time.perf_counter() - start]
    return results


def run_backend(backend: str, args: argparse.Namespace, head: LocalRayHead, cifar: Path, work: Path) -> dict:
    if backend not in BACKENDS:
        raise SystemExit(f"--backends: unknown {backend!r}; use {', '.join(BACKENDS)}")
    pg = None
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")},  # the caller's settings
        # The bench's dataset (under `work`) and the default data.train's folder are the data roots.
        "TRAINCTL_DATA_ROOTS": f"{work},{Path('~/.cache/trainctl').expanduser()}",
        "TRAINCTL_RAY_ADDRESS": head.dashboard_url,
        "RAY_AUTH_MODE": "disabled",
        "TRAINCTL_MAX_CONCURRENT_JOBS": "1",
        "TRAINCTL_MAX_QUEUED_JOBS_PER_OWNER": str(args.jobs),  # the default quota (10) would refuse the rest
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    if args.access_log:
        env["TRAINCTL_ACCESS_LOG"] = "1"
    if backend == "postgresql-nocache":
        env["TRAINCTL_READ_CACHE"] = "0"
    if backend.startswith("postgresql"):
        pg = start_postgres()
        env["TRAINCTL_DATABASE_URL"] = pg.create_database("bench")
    data = Path(tempfile.mkdtemp(prefix=f"{backend}-", dir=work)) / "data"  # a backend may run more than once
    proc, url, log_path = start_serve(data, env)
    try:
        token = (data / "admin-token").read_text().strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            ids = []
            # Trains for the whole measurement (cancelled after it): one Ray Train worker, debug model.
            body = {
                "preset": "debug",
                "overrides": {"data.train": str(cifar), "optim.epochs": 10000, "scaling.num_workers": 1},
            }
            resp = c.post("/v1/jobs", json=body)
            if resp.status_code != 201:
                raise RuntimeError(f"submit: {resp.status_code} {resp.text}")
            first = resp.json()["id"]
            ids.append(first)
            running = not args.no_running_job
            if running:
                deadline = time.monotonic() + 300
                while c.get(f"/v1/jobs/{first}").json()["state"] != "RUNNING":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the training job did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            else:
                c.post(f"/v1/jobs/{first}/cancel")
            for _ in range(args.jobs - 1):
                resp = c.post("/v1/jobs", json={"preset": "debug", "overrides": {"optim.epochs": 1}})
                if resp.status_code != 201:
                    raise RuntimeError(f"submit: {resp.status_code} {resp.text}")
                ids.append(resp.json()["id"])
            time.sleep(2)
            # The server's CPU time per answered request does not depend on how busy the machine is (its
            # latency does): it bounds the rate one core could serve.
            spy = None
            if args.py_spy:  # py-spy samples serve's threads while the load runs (collapsed stacks, --idle)
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    [*PY_SPY, "--pid", str(proc.pid), "--duration", str(int(args.seconds)), "--rate", "250"]
                    + ["--format", "raw", "--threads", "--idle", "-o", str(args.py_spy / f"{data.parent.name}.txt")],
                    stdout=subprocess.DEVNULL,
                )
            cpu0 = cpu_seconds(proc.pid)
            res = asyncio.run(load(url, token, ids, args.pollers, args.rate, args.seconds))
            res["server_cpu_s"] = [cpu_seconds(proc.pid) - cpu0]
            if spy is not None:
                spy.wait(timeout=60)
            state = c.get(f"/v1/jobs/{first}").json()
            if running and state["state"] != "RUNNING":
                print(f"  warning: the training job is {state['state']} after the load", flush=True)
            for job_id in ids:
                c.post(f"/v1/jobs/{job_id}/cancel")
        return res
    finally:
        stop_process_group(proc, grace_s=30)
        if pg is not None:
            pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pollers", type=int, default=8)
    p.add_argument("--rate", type=float, default=200.0, help="offered requests/s, all pollers together")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--no-running-job", action="store_true")
    p.add_argument("--access-log", action="store_true", help="serve with TRAINCTL_ACCESS_LOG=1 (default: off)")
    p.add_argument(
        "--head-nice",
        type=int,
        default=Settings.model_fields["ray_nice"].default,
        help="the Ray head's (and so the training job's) nice value; default: what `trainctl serve` gives the head "
        "it starts (TRAINCTL_RAY_NICE's default)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="sample the server with py-spy during the load: DIR/<backend>-<random>.txt, collapsed stacks per thread",
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainctl-apiload-"))
    cifar = write_cifar_python(work / "cifar", per_batch=200)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}", flush=True)
    head = LocalRayHead.start(num_cpus=4, auth_mode="disabled", nice=args.head_nice)
    try:
        for backend in args.backends.split(","):
            print(
                f"== {backend}: {args.jobs} jobs stored, {'one' if not args.no_running_job else 'no'} job "
                f"training; {args.pollers} pollers, {args.rate:.0f} req/s offered, {args.seconds:.0f} s",
                flush=True,
            )
            res = run_backend(backend, args, head, cifar, work)
            elapsed = res.pop("elapsed")[0]
            errors = res.pop("errors")
            server_cpu = res.pop("server_cpu_s")[0]
            total = sum(len(v) for v in res.values())
            print(
                f"  achieved {total / elapsed:.1f} req/s ({total} answers in {elapsed:.1f} s), errors {len(errors)}, "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            print(
                f"  server CPU {server_cpu:.1f} s = {1000 * server_cpu / max(total, 1):.2f} ms per request "
                f"(all of serve: API, reconciler), i.e. at most {total / max(server_cpu, 1e-9):.0f} req/s "
                "per fully available core",
                flush=True,
            )
            every = [x for v in res.values() for x in v]
            for route, lat in [*res.items(), ("all", every)]:
                if lat:
                    ms = [x * 1000 for x in lat]
                    print(
                        f"  {route:<20} n={len(ms):<6} p50 {statistics.median(ms):6.1f} ms   "
                        f"p99 {percentile(ms, 99):6.1f} ms   max {max(ms):6.1f} ms",
                        flush=True,
                    )
    finally:
        head.stop()


if __name__ == "__main__":
    main()
