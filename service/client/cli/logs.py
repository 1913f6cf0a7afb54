"""`trainctl logs`: the trainer's own lines by default, Ray's whole output with --raw; -f follows."""

from __future__ import annotations

import argparse
import sys
import time

from service.client.cli import common
from service.client.cli.common import TERMINAL
from service.client.http import ClientError, TrainctlClient
from service.client.logview import LogView


def cmd_logs(args: argparse.Namespace) -> int:
    """Every attempt's log (each under a header when there were several); with -f, then the current attempt's
    new lines until the job ends. No log is an error saying why, except while -f waits for a queued job.

    By default only the trainer's own lines, rank 0's (service/client/logview.py); --all-ranks every rank's, each
    marked; --raw Ray's whole output as the server keeps it."""
    api = common.client(args)
    view = None if args.raw else LogView(all_ranks=args.all_ranks)

    def show(text: str) -> None:
        sys.stdout.write(text if view is None else view.feed(text))

    if not args.follow:
        if view is None:
            sys.stdout.write(api.logs(args.id, tail=args.tail))
            return 0
        # --tail counts the lines shown, so it is applied after filtering, to the whole log.
        lines = (view.feed(api.logs(args.id)) + view.flush()).splitlines(keepends=True)
        if args.tail is not None:
            lines = lines[len(lines) - args.tail :] if args.tail < len(lines) else lines
        sys.stdout.write("".join(lines))
        return 0
    # Follow the current attempt; each poll asks only for the bytes added after those already printed
    # (X-Log-Size / ?since=). A server that does not say its log's size gets whole logs compared instead.
    seen, attempt = 0, None
    while True:
        job = api.job(args.id)
        if job["attempts"] and job["attempts"] != attempt:
            if attempt is None and job["attempts"] > 1:  # first look: the earlier attempts in full ...
                show(_logs_or_empty(api, args.id, None))
                _, size = _logs_since_or_empty(api, args.id, job["attempts"], 0, tail=0)
                seen = size or len(_logs_or_empty(api, args.id, job["attempts"]))
            elif attempt is None:  # ... or the only attempt, followed from its start below
                seen = 0
            else:
                show(f"=== attempt {job['attempts']} ===\n")
                seen = 0
            attempt = job["attempts"]
        if attempt is not None:
            text, size = _logs_since_or_empty(api, args.id, attempt, seen)
            if size is None:  # an older server sent the whole log
                text, size = text[seen:], len(text)
            show(text)
            seen = size
        sys.stdout.flush()
        if job["state"] in TERMINAL:
            if view is not None:
                sys.stdout.write(view.flush())
            return 0
        time.sleep(2)


def _logs_since_or_empty(
    api: TrainctlClient, job_id: str, attempt: int, since: int, tail: int | None = None
) -> tuple[str, int | None]:
    try:
        return api.logs_since(job_id, since, tail=tail, attempt=attempt)
    except ClientError as exc:
        if str(exc).startswith("no_log:"):
            return "", since
        raise


def _logs_or_empty(api: TrainctlClient, job_id: str, attempt: int | None) -> str:
    try:
        return api.logs(job_id, attempt=attempt)
    except ClientError as exc:
        if str(exc).startswith("no_log:"):
            return ""
        raise


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("logs", parents=[common_args], help="the trainer's log lines (rank 0; --raw: Ray's whole log)")
    s.add_argument("id")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    s.add_argument("--tail", type=int, help="only the last N lines")
    s.add_argument("--all-ranks", action="store_true", help="every worker's lines, each marked [rank N]")
    s.add_argument("--raw", action="store_true", help="Ray's whole driver log, unfiltered")
    s.set_defaults(fn=cmd_logs)
