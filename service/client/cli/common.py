"""What every command shares: exit codes, the connection (URL, token, client), argument types, JSON output."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from service.client.config import ProfileError, resolve_token, token_source, url_source
from service.client.http import ClientError, Retry, TrainctlClient

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# The job states as `list --state` takes them (the service's JobState, lower case).
JOB_STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled")

# Exit codes, one meaning each (docs/service.md, `trainctl --help`). argparse uses 2 for usage errors, so no
# job outcome may use it.
WATCH_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}
EXIT_USAGE = 2  # argparse's: a bad flag or value, checked here before anything is sent
EXIT_LOST_CONTACT = 4  # `watch`/`submit --follow` gave up: the service stayed unreachable for --patience seconds
EXIT_ERROR = 5  # anything else that failed: a download's checksum, a local file, nothing to write
EXIT_NOT_FOUND = 6  # 404: no such job (or not yours), checkpoint, token ...
EXIT_UNAUTHORIZED = 7  # 401/403: no token, a wrong, expired or revoked one, or not allowed (admin only)
EXIT_INVALID = 8  # 400/409/413/422: the request is wrong as sent (an invalid spec, checked here or there)
EXIT_SERVER = 9  # 5xx, or 429 still after the retries: the service failed or is overloaded
EXIT_UNREACHABLE = 10  # no answer: the connection was refused, timed out or broke

EXIT_CODES_TEXT = (
    "exit codes: 0 success (watch: the job SUCCEEDED), 1 the job FAILED, 2 usage error, 3 the job was "
    "CANCELLED, 4 watch lost contact with the service, 5 other failure, 6 not found (404), 7 unauthorized or "
    "forbidden (401/403), 8 invalid request (400/409/422), 9 server error (5xx, 429), 10 cannot connect"
)
CliError = ClientError  # what the CLI prints as `error: ...` (exit code: `exit_code_for`)


def usage_error(message: str) -> ClientError:
    """A bad argument found after parsing (before anything is sent): exit 2, like argparse's own."""
    return ClientError(message, code="usage", exit_code=EXIT_USAGE)


def exit_code_for(exc: ClientError) -> int:
    if exc.exit_code is not None:
        return exc.exit_code
    if exc.unreachable:
        return EXIT_UNREACHABLE
    status = exc.status
    if status is None:
        return EXIT_ERROR
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_UNAUTHORIZED
    if status == 429 or status >= 500:
        return EXIT_SERVER
    if 400 <= status < 500:
        return EXIT_INVALID
    return EXIT_ERROR


def error_json(exc: ClientError) -> dict[str, Any]:
    """The error as `--json` prints it on stderr: {"error": {"code", "message", "fields"}}."""
    return {"error": {"code": exc.code, "message": exc.reason, "fields": exc.fields}}


def suggest(value: str, options: Sequence[str]) -> str:
    """ "; did you mean 'x'?" for the closest option, or nothing when none is close."""
    close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def choice(what: str, options: Sequence[str], normalize: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    """An argparse `type` that accepts one of `options` (after `normalize`) and refuses anything else with a
    usage error naming the closest option, before any request is sent."""

    def check(text: str) -> str:
        value = normalize(text)
        if value in options:
            return value
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {what}: choose from {', '.join(options)}{suggest(value, options)}"
        )

    check.__name__ = what  # argparse names the type in some messages
    return check


def override(text: str) -> tuple[str, Any]:
    """An argparse `type` for `--set PATH=VALUE` (trainer.spec's reading: JSON when it parses, else a string);
    a malformed one is a usage error."""
    from trainer.spec import parse_override  # pydantic only; loaded when a --set is given

    try:
        return parse_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def url(args: argparse.Namespace) -> str:
    return url_and_source(args)[0]


def token(args: argparse.Namespace) -> str | None:
    try:
        return resolve_token(args.token, args.data_dir, getattr(args, "profile", None), args.url)
    except ProfileError as exc:
        raise usage_error(str(exc)) from None


def url_and_source(args: argparse.Namespace) -> tuple[str, str]:
    try:
        return url_source(args.url, args.data_dir, getattr(args, "profile", None))
    except ProfileError as exc:  # --profile / TRAINCTL_PROFILE names none: a usage error
        raise usage_error(str(exc)) from None


def client(args: argparse.Namespace, timeout: float = 30, retry: bool = True) -> TrainctlClient:
    """The API client for this command. `retry`: one-shot commands retry what may pass (http.Retry) for
    --retry-for seconds; `watch` rides out outages itself (--patience) and asks for none."""
    verbose = getattr(args, "verbose", False)
    if verbose:
        print(connection_text(args), file=sys.stderr)

    def say(error: ClientError, wait: float) -> None:
        if verbose:
            print(f"trainctl: {str(error).splitlines()[0]}; retrying in {wait:.1f}s", file=sys.stderr, flush=True)

    budget = getattr(args, "retry_for", None)
    policy = Retry(total_s=budget, on_retry=say) if retry and budget else None
    return TrainctlClient(url(args), token(args), timeout=timeout, retry=policy)


def retry_budget(text: str) -> float:
    """`--retry-for`: seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--retry-for cannot be negative")
    return value


def default_retry_budget() -> float:
    """TRAINCTL_RETRY_FOR, else 10 seconds (a malformed value: the default, said on stderr)."""
    raw = os.environ.get("TRAINCTL_RETRY_FOR")
    if not raw:
        return DEFAULT_RETRY_S
    try:
        return retry_budget(raw)
    except argparse.ArgumentTypeError as exc:
        print(f"trainctl: TRAINCTL_RETRY_FOR ignored: {exc}", file=sys.stderr)
        return DEFAULT_RETRY_S


DEFAULT_RETRY_S = 10.0


def connection_text(args: argparse.Namespace) -> str:
    """Which URL and which token source this command uses (never the token): printed with --verbose and
    after an error, so a surprising server or token is visible."""
    try:
        where, url_from = url_source(args.url, args.data_dir, getattr(args, "profile", None))
        _, token_from = token_source(args.token, args.data_dir, getattr(args, "profile", None), args.url)
    except ProfileError as exc:
        return f"trainctl: {exc}"
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
