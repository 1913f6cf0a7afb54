"""What every command shares: exit codes, the connection (URL, token, client), argument types, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.client.config import resolve_token, resolve_url, token_source, url_source
from service.client.http import ClientError, TrainctlClient

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# Exit codes (docs/service.md). argparse uses 2 for usage errors, so no job outcome may use it.
WATCH_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}
EXIT_LOST_CONTACT = 4  # `watch`/`submit --follow` gave up: the service stayed unreachable for --patience seconds
EXIT_ERROR = 5  # the service refused the request (4xx/5xx) or could not be reached by a one-shot command
CliError = ClientError  # what the CLI prints as `error: ...` with exit status EXIT_ERROR


def url(args: argparse.Namespace) -> str:
    return resolve_url(args.url, args.data_dir)


def token(args: argparse.Namespace) -> str | None:
    return resolve_token(args.token, args.data_dir)


def client(args: argparse.Namespace, timeout: float = 30) -> TrainctlClient:
    if getattr(args, "verbose", False):
        print(connection_text(args), file=sys.stderr)
    return TrainctlClient(url(args), token(args), timeout=timeout)


def connection_text(args: argparse.Namespace) -> str:
    """Which URL and which token source this command uses (never the token): printed with --verbose and
    after an error, so a surprising server or token is visible."""
    where, url_from = url_source(args.url, args.data_dir)
    _, token_from = token_source(args.token, args.data_dir)
    return f"trainctl: API {where} (from {url_from}); token from {token_from}"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `7d`, `2w` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 3600, 30m, 12h, 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def parse_since(text: str) -> str:
    """`--since`: a duration back from now (`90m`, `7d`) or an ISO 8601 date/time, as the ISO time the API takes."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text).isoformat()
    except ValueError:
        pass
    try:
        seconds = parse_duration(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90m, 12h, 7d) nor an ISO date (2026-12-01, 2026-12-01T08:00Z)"
        ) from None
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)).isoformat()
