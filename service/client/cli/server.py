"""Launchers of the server-side commands: `serve`, `down`, `db`, `reindex`. Each imports its server module
only when run (uvicorn, the app, Ray, SQLAlchemy), so the client-only install never needs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _serve(args: argparse.Namespace) -> int:
    from service.server.serve import cmd_serve, exit_without_teardown  # uvicorn, the app and Ray: only here

    exit_without_teardown(cmd_serve(args))


def _down(args: argparse.Namespace) -> int:
    from service.server.serve import cmd_down

    return cmd_down(args)


def _admin(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from service.server import admin  # SQLAlchemy/Alembic: only for these commands

        command: Callable[[argparse.Namespace], int] = getattr(admin, name)
        return command(args)

    return run


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser(
        "serve",
        parents=[common_args],
        help="run the API (with this data dir's local Ray head, "
        "started or re-attached, which outlives serve; unless "
        "TRAINCTL_RAY_ADDRESS / RAY_ADDRESS is set)",
    )
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--storage", help="storage root URI (default <data dir>/storage; s3://bucket/prefix)")
    s.add_argument("--max-concurrent", type=int, help="jobs running at once (default 2)")
    s.add_argument("--ray-num-cpus", type=int, help="logical CPUs of a local head (default max(cores, 4))")
    s.add_argument(
        "--database-url",
        help="job store (default: TRAINCTL_DATABASE_URL or SQLite <data dir>/trainctl.db;"
        " postgresql+psycopg://user:password@host:5432/db for several replicas)",
    )
    s.add_argument("--no-auth", action="store_true", help="DANGER: disable authentication (local experiments)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser(
        "down",
        parents=[common_args],
        help="stop this data dir's `serve` and its local Ray head (which otherwise outlives `serve`)",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long the head gets for Ray's own shutdown before what is left of it is killed (default 15; "
        "an idle local head takes about 3)",
    )
    s.set_defaults(fn=_down)

    s = sub.add_parser("db", help="the job database: schema migrations")
    dsub = s.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for action, admin_fn, text in [
        ("upgrade", "cmd_db_upgrade", "apply pending migrations (serve also does at start)"),
        ("current", "cmd_db_current", "show the revision; exit 1 when not the newest"),
    ]:
        d = dsub.add_parser(action, parents=[common_args], help=text)
        d.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
        d.set_defaults(fn=_admin(admin_fn))

    s = sub.add_parser(
        "reindex", parents=[common_args], help="rebuild lost job records from the storage root's job directories"
    )
    s.add_argument("--database-url", help="default: TRAINCTL_DATABASE_URL or <data dir>/trainctl.db")
    s.add_argument("--storage", help="storage root URI (default: TRAINCTL_STORAGE or <data dir>/storage)")
    s.add_argument(
        "--unsigned-owner",
        metavar="NAME",
        help="restore job directories whose record.json is missing or not signed by this service's record key "
        "as finished jobs of NAME (never the admin); default: skip them",
    )
    s.set_defaults(fn=_admin("cmd_reindex"))
