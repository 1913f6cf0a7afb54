"""Estimate error: how far the estimate made at submission was from what each finished job then took.

    .venv/bin/python bench/estimate_error.py --url URL [--token T]         # a running service's finished jobs
    .venv/bin/python bench/estimate_error.py --run N [--epochs E]           # N real jobs, one after another

With `--url`, reads the service's succeeded jobs (GET /v1/jobs?state=succeeded, then each job's view) and
prints, per job, the estimated and actual wall time and images/s with the estimate's basis, then the median
absolute error of the jobs whose estimate had a basis. With `--run N`, it first starts its own local Ray head
and `trainctl serve` (SQLite, a temporary data dir) and runs N identical debug-preset jobs on small
CIFAR-format files one after another, so each job after the first is estimated from the ones before it
(issue 30's goal: within ±20 % once one job with the same key has run). A benchmark figure, not a test: the
numbers depend on the machine's load, so say what the load was (printed) with any figure quoted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def finished_views(c: httpx.Client, limit: int) -> list[dict[str, Any]]:
    page = c.get("/v1/jobs", params={"state": "SUCCEEDED", "limit": limit}).raise_for_status().json()
    return [c.get(f"/v1/jobs/{j['id']}").raise_for_status().json() for j in reversed(page["jobs"])]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f} %"


def report(views: list[dict[str, Any]]) -> dict[str, float | None]:
    """Print one row per job and the medians; returns {"wall": median |error|, "images_per_s": ...}."""
    header = f"{'job':<24} {'est wall s':>10} {'actual s':>9} {'error':>9} {'est img/s':>9} {'actual':>8}"
    print(f"{header} {'error':>9}  basis")
    walls, rates = [], []
    for v in views:
        e = v.get("estimate")
        if not e:
            continue
        print(
            f"{v['id']:<24} {e['estimated_wall_seconds'] or '-':>10} {e['actual_wall_seconds'] or '-':>9} "
            f"{_pct(e['wall_error']):>9} {e['estimated_images_per_s'] or '-':>9} {e['actual_images_per_s'] or '-':>8} "
            f"{_pct(e['images_per_s_error']):>9}  {e['wall_basis']}"
        )
        if e["wall_error"] is not None:
            walls.append(abs(e["wall_error"]))
        if e["images_per_s_error"] is not None:
            rates.append(abs(e["images_per_s_error"]))
    out = {
        "wall": statistics.median(walls) if walls else None,
        "images_per_s": statistics.median(rates) if rates else None,
    }
    print(
        f"median |error| over the jobs with an estimate: wall time {_pct(out['wall'])} ({len(walls)} jobs), "
        f"images/s {_pct(out['images_per_s'])} ({len(rates)} jobs); load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    return out


def run_series(n: int, epochs: int) -> None:
    """Start a local Ray head and `trainctl serve`, run `n` debug jobs one after another, then report."""
    from bench.api_load import start_serve
    from service.server.localray import LocalRayHead, stop_process_group
    from tests.trainer.cifar_files import write_cifar_python

    work = Path(tempfile.mkdtemp(prefix="trainctl-estimate-error-"))
    cifar = write_cifar_python(work / "cifar", per_batch=200)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}", flush=True)
    head = LocalRayHead.start(num_cpus=4, auth_mode="disabled")
    proc = None
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")},
            "TRAINCTL_DATA_ROOTS": str(work),
            "TRAINCTL_RAY_ADDRESS": head.dashboard_url,
            "RAY_AUTH_MODE": "disabled",
            "TRAINCTL_MAX_CONCURRENT_JOBS": "1",
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.pop("RAY_ADDRESS", None)
        data = work / "data"
        proc, url, _ = start_serve(data, env)
        token = (data / "admin-token").read_text().strip()
        body = {
            "preset": "debug",
            "overrides": {"optim.epochs": epochs, "data.train": str(cifar), "scaling.num_workers": 1},
        }
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            for i in range(n):
                job = c.post("/v1/jobs", json=body).raise_for_status().json()
                while (state := c.get(f"/v1/jobs/{job['id']}").json()["state"]) not in TERMINAL:
                    time.sleep(1.0)
                print(f"job {i + 1}/{n} {job['id']}: {state}", flush=True)
            report(finished_views(c, n))
    finally:
        if proc is not None:
            stop_process_group(proc, grace_s=20)
        head.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service (with --token or TRAINCTL_TOKEN)")
    p.add_argument("--token", default=os.environ.get("TRAINCTL_TOKEN"))
    p.add_argument("--limit", type=int, default=100, help="the newest N succeeded jobs (--url)")
    p.add_argument("--run", type=int, metavar="N", help="run N debug jobs on a local service first")
    p.add_argument("--epochs", type=int, default=2, help="epochs per job (--run)")
    args = p.parse_args()
    if args.run:
        run_series(args.run, args.epochs)
        return
    if not args.url:
        p.error("give --url (a running service) or --run N")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as c:
        report(finished_views(c, args.limit))


if __name__ == "__main__":
    main()
