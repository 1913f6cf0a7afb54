"""Start-up, in one place: what every API process does before it serves requests.

`prepare` runs the steps in order: refuse to run without authentication off a loopback host; create the data
dir (owner-only, 0700); bring the job database to the newest migration; make sure an admin token exists;
owner-only modes for the database and token files; say where the token is (never the token), or warn loudly
that authentication is off. `trainctl serve` (service/server/serve.py) runs it before it starts anything else, so a
bad setting or an unreachable database fails before a Ray head is started; the app's lifespan
(service/server/app.py) runs it too, so `uvicorn --factory service.server.app:app_from_env` and the tests get the same.
Every step is idempotent (several replicas may start at once against one PostgreSQL).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from service.api import auth
from service.common.settings import Settings
from service.engine.migrate import upgrade
from service.engine.store import Store, TokenNameTaken, redact_url
from service.server.guards import is_loopback

log = logging.getLogger("trainctl")


class StartupRefused(ValueError):
    """A setting or the database makes it unsafe or impossible to serve; the message says what to change."""


def refuse_unsafe_auth(settings: Settings) -> None:
    if not settings.auth and not is_loopback(settings.host):
        raise StartupRefused(
            f"authentication can only be turned off (--no-auth) on a loopback host (127.0.0.1, localhost), "
            f"not {settings.host!r}: anyone who can reach the port could run and delete jobs"
        )


def restrict_files(settings: Settings) -> None:
    """Owner-only modes for the database (and SQLite's WAL/SHM files) and the token file."""
    for path in (
        settings.db_path,
        settings.db_path.with_name(settings.db_path.name + "-wal"),
        settings.db_path.with_name(settings.db_path.name + "-shm"),
        settings.admin_token_path,
    ):
        if path.exists():
            os.chmod(path, 0o600)


def prepare(
    settings: Settings,
    say: Callable[[str], None] = log.info,
    warn: Callable[[str], None] = log.warning,
) -> Store:
    """Run the start-up steps (module docstring) and return the open store; `say`/`warn` receive what an
    operator should read. Raises StartupRefused."""
    refuse_unsafe_auth(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)  # the job database, tokens and default storage live here
    store = Store(settings.store_url)
    try:
        # Migrations first: every replica runs this at start; they serialise on the database's lock.
        before, after = upgrade(store.engine)
    except SQLAlchemyError as exc:
        store.close()
        raise StartupRefused(f"cannot open the job database {redact_url(settings.store_url)}: {exc}") from exc
    say(
        f"job database {redact_url(settings.store_url)}: "
        + (f"schema {after}" if before == after else f"schema upgraded {before or 'empty'} -> {after}")
    )
    if settings.auth:
        try:
            created = auth.ensure_admin_token(store, settings.admin_token_path)
        except TokenNameTaken:  # another replica, starting at the same time, created it
            created = None
        # Where the token is, never the token itself: this output ends up in service logs.
        say(
            f"auth on; {'a new' if created else 'the'} admin token is in {settings.admin_token_path} "
            f"(mode 0600). Use it as: export TRAINCTL_TOKEN=$(cat {settings.admin_token_path})"
        )
    else:
        bar = "!" * 78
        warn(
            f"{bar}\n!! WARNING: --no-auth: NO AUTHENTICATION. Anyone who can reach "
            f"{settings.host}:{settings.port}\n!! can submit, read and delete jobs. Local experiments only.\n{bar}"
        )
    restrict_files(settings)
    return store
