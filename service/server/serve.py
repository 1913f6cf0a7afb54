"""`trainctl serve`: the API process, with a local Ray head unless it is pointed at a running cluster.

It prints where the admin token is, attaches to Ray (re-attaching to, or else starting, this data dir's
detached local head) and runs uvicorn until SIGTERM/SIGINT. The local head outlives the API, so restarting
`serve` never stops training; `trainctl down` stops both. Errors the user must act on are raised as
ClientError (printed by the CLI).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from service.client import ClientError

SERVE_RECORD = "serve.json"  # {url, pid} of the API serving this data dir

# How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms). The event loop
# serves every status poll; whenever it lets go of the GIL (a socket write, an SQLite call) a busy thread (a
# reconcile pass, a `def` route) may keep it for a whole interval, several times per request: with 5 ms a
# poll's p99 was over 100 ms while one other thread ran Python, 10-50 ms with 1 ms (bench/RESULTS.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def _ray_token_file(path: Path) -> Path:
    """A Ray auth token for a local head, created once (mode 0600) and reused across restarts."""
    import secrets

    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _setting_errors(exc: ValidationError) -> list[str]:
    """`  TRAINCTL_PORT: Input should be ...` per error (a check across settings names its setting itself)."""
    out = []
    for e in exc.errors(include_url=False):
        name = "TRAINCTL_" + "_".join(str(part) for part in e["loc"]).upper() if e["loc"] else ""
        message = str(e["msg"]).removeprefix("Value error, ")
        out.append(f"  {name}: {message}" if name else f"  {message}")
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.common.settings import load_settings
    from service.server import startup
    from service.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(
            data_dir=args.data_dir,
            host=args.host,
            port=args.port,
            storage=args.storage,
            auth=False if args.no_auth else None,
            max_concurrent_jobs=args.max_concurrent,
            database_url=args.database_url,
        )
    except ValidationError as exc:  # a bad TRAINCTL_* value: one line each, naming the setting; nothing started
        raise ClientError("invalid settings:\n" + "\n".join(_setting_errors(exc))) from None
    # Everything this process and the Ray head it starts write (database, tokens, local storage, logs) is
    # readable by this user only.
    os.umask(0o077)
    try:  # before any Ray head starts: a refused setting or an unreachable database starts nothing
        startup.prepare(
            settings,
            say=lambda text: print(text, flush=True),
            warn=lambda text: print(text, file=sys.stderr, flush=True),
        ).close()
    except startup.StartupRefused as exc:
        raise ClientError(str(exc)) from exc

    signal.signal(signal.SIGTERM, _on_sigterm)  # so `finally` below removes the serve record
    record = settings.data_dir / SERVE_RECORD
    try:
        if not settings.ray_address and os.environ.get("RAY_ADDRESS"):
            settings = settings.model_copy(update={"ray_address": os.environ["RAY_ADDRESS"]})
        if not settings.ray_address:
            settings = settings.model_copy(update={"ray_address": _local_head(settings, args.ray_num_cpus)})
        url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        print(f"trainctl API on {url} (docs at /docs), storage {settings.storage_root}", flush=True)
        # Where this data dir's API listens, so the CLI run with the same data dir finds a --port N.
        record.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        print(f"trainctl dashboard: {url}/ui/ (sign in with an API token)", flush=True)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, announce_startup=False),
                host=settings.host,
                port=settings.port,
                log_level="info",
                access_log=settings.access_log,
                timeout_graceful_shutdown=5,
            )
        )
        server.run()
        return 0 if server.started else 1
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        _remove_own_record(record)


def exit_without_teardown(code: int) -> NoReturn:
    """End `serve` the moment its own shutdown is done. By the time `cmd_serve` returns, uvicorn has run the
    app's shutdown (reconciler stopped, database closed) and the serve record is gone. What Python would do
    next is tear down the imported Ray SDK: its atexit `ray.shutdown()` imports `ray.dag` in a process that
    never called `ray.init`, then every module is finalised. On a loaded 2-core machine that took 3-12 s
    after SIGTERM, past the 10 s a supervisor (or `trainctl down`) should have to wait."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say anyway
            pass
    os._exit(code)


def _remove_own_record(record: Path) -> None:
    try:
        if json.loads(record.read_text()).get("pid") == os.getpid():
            record.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _local_head(settings: Any, ray_num_cpus: int | None) -> str:
    """The Jobs API URL of this data dir's local Ray head: the recorded one when it still runs (a restart of
    the API re-attaches, and running jobs never notice), else a new one started detached — it outlives this
    process and is stopped by `trainctl down`."""
    from service.server.localray import LocalRayHead, live_head, read_head_record, write_head_record

    rec = live_head(settings.data_dir, wait_s=60)
    if rec is None and (stuck := read_head_record(settings.data_dir)) is not None:
        # Still running, not answering: never start a second head over it (the first would be orphaned).
        raise ClientError(
            f"the local Ray head of {settings.data_dir} (pid {stuck.pid}) runs but its dashboard "
            f"{stuck.dashboard_url} does not answer; try again, or stop it with `trainctl down`"
        )
    auth_mode = rec.auth_mode if rec else settings.ray_auth_mode
    # The same auth mode (and token) for the head and for our own Jobs client.
    os.environ["RAY_AUTH_MODE"] = auth_mode
    if auth_mode == "token" and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # Our own token file, not ~/.ray/auth_token: that one would switch on token auth for every other Ray
        # head started by this user on this machine.
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(_ray_token_file(settings.ray_token_path))
    if rec is not None:
        if rec.auth_mode != settings.ray_auth_mode:
            print(
                f"note: the running head uses RAY_AUTH_MODE={rec.auth_mode}; `trainctl down` and serve again "
                f"to change it",
                flush=True,
            )
        print(
            f"re-attached to the running local Ray head {rec.gcs_address} (pid {rec.pid}, {rec.num_cpus} "
            f"logical CPUs, dashboard {rec.dashboard_url}); `trainctl down` stops it",
            flush=True,
        )
        return rec.dashboard_url
    num_cpus = ray_num_cpus or max(os.cpu_count() or 1, 4)
    print(
        f"starting a local Ray head (127.0.0.1, {num_cpus} logical CPUs, RAY_AUTH_MODE={auth_mode}, nice "
        f"{settings.ray_nice}) ...",
        flush=True,
    )
    try:
        head = LocalRayHead.start(num_cpus=num_cpus, auth_mode=auth_mode, nice=settings.ray_nice)
    except (RuntimeError, OSError) as exc:
        raise ClientError(
            f"could not start a local Ray head: {exc}\n(or point the service at a running "
            "cluster with TRAINCTL_RAY_ADDRESS)"
        ) from exc
    write_head_record(settings.data_dir, head, auth_mode, num_cpus)
    print(
        f"Ray head up: {head.gcs_address}, dashboard {head.dashboard_url} (pid {head.proc.pid}); it keeps "
        f"running jobs when the API stops: `trainctl down` stops it",
        flush=True,
    )
    return head.dashboard_url


def cmd_down(args: argparse.Namespace) -> int:
    """Stop this data dir's API (if running) and its local Ray head, with the jobs running on it (they are
    resubmitted, without costing their restart budget, by the next `serve`)."""
    from service.common.settings import load_settings
    from service.server.localray import stop_recorded_head

    settings = load_settings(data_dir=args.data_dir)
    record = settings.data_dir / SERVE_RECORD
    try:
        pid = int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = None
    if pid is not None and _is_serve(pid):
        print(f"stopping trainctl serve (pid {pid}) ...", flush=True)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _is_serve(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    record.unlink(missing_ok=True)
    rec = stop_recorded_head(
        settings.data_dir, grace_s=args.grace, token=_ray_token(settings), say=lambda text: print(text, flush=True)
    )
    if rec is None:
        print(f"no local Ray head is running for {settings.data_dir}", flush=True)
    else:
        print(f"stopped the local Ray head {rec.gcs_address} (pid {rec.pid})", flush=True)
    return 0


def _ray_token(settings: Any) -> str | None:
    """The token our Jobs client uses for a local head with token auth (as `_local_head` sets it up)."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or settings.ray_token_path)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _is_serve(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    modules = (b"service.cli", b"service.client.cli")  # `python -m ...`: today's name, and the one before the move
    return b"serve" in cmdline and any(b"trainctl" in a or a in modules for a in cmdline)
