"""`trainctl watch` (and `submit --follow`): follow a job to its end; the exit code is its final state."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from service.client.cli import common, render
from service.client.cli.common import EXIT_LOST_CONTACT, TERMINAL, WATCH_EXIT
from service.client.http import ClientError, TrainctlClient


class _Progress:
    """What `follow` prints: a line whenever the job's progress changes (one live line with a bar on a terminal),
    the devices once, and the job's message at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stdout.isatty() and not as_json
        self.last: str | None = None
        self.devices_shown = False

    def show(self, job: dict[str, Any]) -> int | None:
        """Print `job` if it changed; its exit code (WATCH_EXIT) once it is finished, else None."""
        if job.get("devices") and not self.devices_shown and not self.as_json:
            print(("\r\033[K" if self.tty else "") + render.devices_line(job), flush=True)  # never changes in a run
            self.devices_shown, self.last = True, None
        line = json.dumps(job, sort_keys=True) if self.as_json else render.progress_line(job)
        if line != self.last:
            if self.tty:  # one live line with a bar, rewritten in place
                print("\r\033[K" + render.bar(job) + line, end="", flush=True)
            else:
                print(line, flush=True)
            self.last = line
        if job["state"] not in TERMINAL:
            return None
        if self.tty:
            print()
        if job.get("message") and not self.as_json:
            print(f"{job['state']}: {job['message']}")
        return WATCH_EXIT[job["state"]]


class _Contact:
    """Riding out an unreachable service: say when contact is lost and when it is back; give up after
    `patience` seconds without an answer."""

    def __init__(self, job_id: str, patience: float) -> None:
        self.job_id, self.patience = job_id, patience
        self.lost_since: float | None = None
        self.backoff = 1.0

    def lost(self, exc: ClientError) -> bool:
        """Note a failed attempt and wait before the next; False once `patience` is spent (then give up)."""
        now = time.monotonic()
        if self.lost_since is None:
            self.lost_since = now
            reason = str(exc).splitlines()[0]
            print(
                f"\nlost contact with the service ({reason}); retrying for up to {self.patience:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        elif now - self.lost_since > self.patience:
            print(
                f"gave up: no answer from the service for {self.patience:.0f}s (job {self.job_id} may still be "
                f"running; `trainctl watch {self.job_id}` resumes following it)",
                file=sys.stderr,
            )
            return False
        time.sleep(self.backoff)
        self.backoff = min(self.backoff * 2, 10.0)
        return True

    def restored(self) -> None:
        if self.lost_since is not None:
            print(f"contact restored after {time.monotonic() - self.lost_since:.0f}s", file=sys.stderr, flush=True)
            self.lost_since, self.backoff = None, 1.0


def follow(
    api: TrainctlClient,
    job_id: str,
    *,
    interval: float,
    patience: float,
    as_json: bool,
    stream: bool = True,
    verbose: bool = False,
) -> int:
    """Print progress whenever it changes until the job ends; return its exit code (WATCH_EXIT).

    It follows the job's event stream (GET /v1/jobs/{id}/events: the service pushes each change), and polls
    GET /v1/jobs/{id} every `interval` seconds instead when the stream is not available (a service or proxy
    without it, or the limit of open streams reached: 429). A refused connection, a time-out or a 502/503/504
    (an API restart, say) is waited out with backoff for up to `patience` seconds, saying so on stderr; then
    EXIT_LOST_CONTACT. Other errors (404, 401) raise."""
    progress, contact = _Progress(as_json), _Contact(job_id, patience)
    while stream:
        try:
            for event, data in api.events(job_id):
                contact.restored()
                if event == "state" and isinstance(data, dict):
                    code = progress.show(data)
                    if code is not None:
                        return code
                elif event == "end" and isinstance(data, dict):
                    return _ended(job_id, data)
        except ClientError as exc:
            if not exc.transient:  # no stream here (404, 429, not an event stream ...): poll; a real 404 or
                stream = False  # 401 is then the poll's to raise
                if verbose:
                    print(f"trainctl: no event stream ({exc.reason}); polling every {interval:g}s", file=sys.stderr)
                break
            if not contact.lost(exc):
                return EXIT_LOST_CONTACT
            continue
        time.sleep(min(interval, 1.0))  # closed without `end` (a restart, a proxy's time-out): open it again
    while True:
        try:
            job = api.job(job_id)
        except ClientError as exc:
            if not exc.transient:
                raise
            if not contact.lost(exc):
                return EXIT_LOST_CONTACT
            continue
        contact.restored()
        code = progress.show(job)
        if code is not None:
            return code
        time.sleep(interval)


def _ended(job_id: str, end: dict[str, Any]) -> int:
    """The exit code of the stream's `end` event (its last `state` came before it and was shown)."""
    if end.get("state") in WATCH_EXIT:
        return WATCH_EXIT[end["state"]]
    if end.get("state") == "DELETED":
        raise ClientError(f"not_found: job {job_id} was deleted while watching it", 404, code="not_found")
    if end.get("reason") == "token_revoked":
        raise ClientError("unauthorized: the token was revoked or expired while watching", 401, code="unauthorized")
    raise ClientError(f"the event stream ended unexpectedly: {json.dumps(end)[:200]}", code="stream_ended")


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a job to its end; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 4 lost contact."""
    with common.client(args, retry=False) as api:  # `follow` rides out outages itself (--patience)
        return follow(
            api,
            args.id,
            interval=args.interval,
            patience=args.patience,
            as_json=args.json,
            stream=not args.poll,
            verbose=args.verbose,
        )


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
