"""Schema migrations (Alembic, scripts in service/engine/migrations/versions): `upgrade(engine)` brings a database
to the newest revision; `trainctl db upgrade` and `trainctl serve` (at start) call it.

A database made before migrations existed (tables, no `alembic_version`) holds exactly the first
revision's schema: it is stamped with that revision, then upgraded like any other. Concurrent upgrades
(two replicas starting together) are serialised by the database: a PostgreSQL advisory lock, SQLite's
write lock.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"
# pg_advisory_lock key for migrations (any constant that no other lock of ours uses).
MIGRATION_LOCK_KEY = 0x7472_6E01


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to `revision`; returns (before, after)."""
    with engine.execution_options(trainctl_write=True).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        tables = set(inspect(conn).get_table_names())
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = alembic_config(conn)
        if before is None and "jobs" in tables:
            command.stamp(cfg, FIRST_REVISION)  # made by the pre-migration create_all: the first revision
            before = FIRST_REVISION
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after
