"""`trainctl watch` (and `submit --follow`): follow a job to its end; the exit code is its final state."""

from __future__ import annotations

import argparse
import json
import sys
import time

from service.client.cli import common, render
from service.client.cli.common import EXIT_LOST_CONTACT, TERMINAL, WATCH_EXIT
from service.client.http import ClientError, TrainctlClient


def follow(api: TrainctlClient, job_id: str, *, interval: float, patience: float, as_json: bool) -> int:
    """Print progress whenever it changes until the job ends; return its exit code (WATCH_EXIT).

    A refused connection, a time-out or a 502/503/504 (an API restart, say) is waited out with backoff for up
    to `patience` seconds, saying so on stderr; then EXIT_LOST_CONTACT. Other errors (404, 401) raise."""
    tty = sys.stdout.isatty() and not as_json
    last, lost_since, backoff = None, None, 1.0
    devices_shown = False
    while True:
        try:
            job = api.job(job_id)
        except ClientError as exc:
            if not exc.transient:
                raise
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                reason = str(exc).splitlines()[0]
                print(
                    f"\nlost contact with the service ({reason}); retrying for up to {patience:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            elif now - lost_since > patience:
                print(
                    f"gave up: no answer from the service for {patience:.0f}s (job {job_id} may still be running; "
                    f"`trainctl watch {job_id}` resumes following it)",
                    file=sys.stderr,
                )
                return EXIT_LOST_CONTACT
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        if lost_since is not None:
            print(f"contact restored after {time.monotonic() - lost_since:.0f}s", file=sys.stderr, flush=True)
            lost_since, backoff = None, 1.0
        if job.get("devices") and not devices_shown and not as_json:
            print(("\r\033[K" if tty else "") + render.devices_line(job), flush=True)  # once: it never changes in a run
            devices_shown, last = True, None
        line = json.dumps(job, sort_keys=True) if as_json else render.progress_line(job)
        if line != last:
            if tty:  # one live line with a bar, rewritten in place
                print("\r\033[K" + render.bar(job) + line, end="", flush=True)
            else:
                print(line, flush=True)
            last = line
        if job["state"] in TERMINAL:
            if tty:
                print()
            if job.get("message") and not as_json:
                print(f"{job['state']}: {job['message']}")
            return WATCH_EXIT[job["state"]]
        time.sleep(interval)


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a job to its end; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 4 lost contact."""
    with common.client(args) as api:
        return follow(api, args.id, interval=args.interval, patience=args.patience, as_json=args.json)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser(
        "watch",
        parents=[common_args, following],
        help="follow progress; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 4 lost contact",
    )
    s.add_argument("id")
    s.set_defaults(fn=cmd_watch)
