"""`trainctl serve`: the API process, with a local Ray head unless it is pointed at a running cluster.

It prints where the admin token is, starts (or attaches to) Ray, and runs uvicorn until SIGTERM/SIGINT, then
stops what it started. Errors the user must act on are raised as ClientError (printed by the CLI).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from service.client import ClientError


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from service import auth
    from service.app import create_app
    from service.localray import LocalRayHead
    from service.migrate import upgrade
    from service.settings import load_settings
    from service.store import Store, TokenNameTaken, redact_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(data_dir=args.data_dir, host=args.host, port=args.port, storage=args.storage,
                             auth=False if args.no_auth else None, max_concurrent_jobs=args.max_concurrent,
                             database_url=args.database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.store_url)
    try:
        # Migrations first: every replica runs this at start; they serialise on the database's lock.
        before, after = upgrade(store.engine)
    except SQLAlchemyError as exc:
        store.close()
        raise ClientError(f"cannot open the job database {redact_url(settings.store_url)}: {exc}") from exc
    print(f"job database {redact_url(settings.store_url)}: "
          + (f"schema {after}" if before == after else f"schema upgraded {before or 'empty'} -> {after}"), flush=True)
    if settings.auth:
        try:
            token = auth.ensure_admin_token(store, settings.admin_token_path)
        except TokenNameTaken:  # another replica, starting at the same time, created it
            token = None
        if token:
            print(f"Created the admin token (shown once; also in {settings.admin_token_path}, mode 0600):\n"
                  f"  {token}\nUse it as: export TRAINCTL_TOKEN={token}", flush=True)
        else:
            print(f"auth on; the admin token is in {settings.admin_token_path}"
                  + ("" if settings.admin_token_path.exists() else " of the replica that created it"), flush=True)
    else:
        bar = "!" * 78
        print(f"{bar}\n!! WARNING: --no-auth: NO AUTHENTICATION. Anyone who can reach "
              f"{settings.host}:{settings.port}\n!! can submit, read and delete jobs. Local experiments only.\n{bar}",
              file=sys.stderr, flush=True)
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"!! and it listens on {settings.host}, not only on this machine.", file=sys.stderr, flush=True)
    store.close()

    signal.signal(signal.SIGTERM, _on_sigterm)  # so `finally` below stops what we started
    head: LocalRayHead | None = None
    try:
        if not settings.ray_address and os.environ.get("RAY_ADDRESS"):
            settings = settings.model_copy(update={"ray_address": os.environ["RAY_ADDRESS"]})
        if not settings.ray_address:
            num_cpus = args.ray_num_cpus or max(os.cpu_count() or 1, 4)
            print(f"starting a local Ray head (127.0.0.1, {num_cpus} logical CPUs, "
                  f"RAY_AUTH_MODE={settings.ray_auth_mode}) ...", flush=True)
            # The same auth mode (and token) for the head and for our own Jobs client.
            os.environ["RAY_AUTH_MODE"] = settings.ray_auth_mode
            if settings.ray_auth_mode == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                          or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                # Our own token file, not ~/.ray/auth_token: that one would switch on token auth for every
                # other Ray head started by this user on this machine.
                os.environ["RAY_AUTH_TOKEN_PATH"] = str(_ray_token_file(settings.ray_token_path))
            try:
                head = LocalRayHead.start(num_cpus=num_cpus, auth_mode=settings.ray_auth_mode)
            except (RuntimeError, OSError) as exc:
                raise ClientError(f"could not start a local Ray head: {exc}\n(or point the service at a running "
                               "cluster with TRAINCTL_RAY_ADDRESS)") from exc
            print(f"Ray head up: {head.gcs_address}, dashboard {head.dashboard_url} (pid {head.proc.pid})",
                  flush=True)
            settings = settings.model_copy(update={"ray_address": head.dashboard_url})
        print(f"trainctl API on http://{settings.host}:{settings.port} (docs at /docs), "
              f"storage {settings.storage_root}", flush=True)
        print(f"trainctl dashboard: http://{settings.host}:{settings.port}/ui/ (sign in with an API token)", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                               log_level="info", timeout_graceful_shutdown=10))
        server.run()
        return 0 if server.started else 1
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        if head is not None:
            print("stopping the local Ray head ...", flush=True)
            head.stop()
