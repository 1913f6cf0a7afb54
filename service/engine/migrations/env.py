"""Alembic environment: always run through service.engine.migrate, which hands us an open connection (so a
migration shares the caller's transaction and lock)."""

from __future__ import annotations

from alembic import context

from service.engine.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `trainctl db upgrade` (service.engine.migrate), not the alembic CLI")

# render_as_batch: SQLite cannot ALTER most things; batch mode recreates the table instead.
context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite"
)
context.run_migrations()
