"""Alembic migrations on SQLite and PostgreSQL: an empty database, a database made before migrations
existed, and a database made by each earlier revision all upgrade to head without losing data; the models
in service/engine/store.py match what the migrations build (so a new column without a revision fails here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from service.engine.migrate import FIRST_REVISION, alembic_config, current_revision, head_revision, upgrade
from service.engine.states import JobState
from service.engine.store import Base, Store, make_engine
from trainer.spec import JobSpec

# What `Base.metadata.create_all` made before migrations existed (the first revision's schema, frozen here
# as plain DDL so that later model changes cannot alter this test's starting point).
PRE_MIGRATION_DDL = [
    """CREATE TABLE jobs (seq INTEGER NOT NULL, id VARCHAR(64) NOT NULL, owner VARCHAR(64) NOT NULL,
       created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, state VARCHAR(16) NOT NULL, spec TEXT NOT NULL,
       ray_submission_id VARCHAR(128), attempts INTEGER NOT NULL, attempt_log TEXT NOT NULL, message TEXT,
       best_val_acc FLOAT, last_epoch INTEGER, cancel_requested BOOLEAN NOT NULL, idempotency_key VARCHAR(256),
       request_hash VARCHAR(64), PRIMARY KEY (seq),
       CONSTRAINT uq_owner_idempotency_key UNIQUE (owner, idempotency_key))""",
    "CREATE INDEX ix_jobs_owner ON jobs (owner)",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    "CREATE UNIQUE INDEX ix_jobs_id ON jobs (id)",
    """CREATE TABLE tokens (name VARCHAR(64) NOT NULL, token_hash VARCHAR(64) NOT NULL, is_admin BOOLEAN NOT NULL,
       created_at FLOAT NOT NULL, PRIMARY KEY (name), UNIQUE (token_hash))""",
]

OLD_JOB = {
    "id": "old-job-1",
    "owner": "alice",
    "created_at": 1.0,
    "updated_at": 2.0,
    "state": "SUCCEEDED",
    "spec": json.dumps({"optim": {"epochs": 1}}),
    "ray_submission_id": "old-job-1-1",
    "attempts": 1,
    "attempt_log": "[]",
    "message": None,
    "best_val_acc": 0.5,
    "last_epoch": 1,
    "cancel_requested": False,
    "idempotency_key": None,
    "request_hash": None,
}


def _insert_old_rows(conn) -> None:
    cols = ", ".join(OLD_JOB)
    conn.execute(text(f"INSERT INTO jobs ({cols}) VALUES ({', '.join(':' + c for c in OLD_JOB)})"), OLD_JOB)
    has_owner_id = "owner_id" in {c["name"] for c in inspect(conn).get_columns("tokens")}
    conn.execute(
        text(
            "INSERT INTO tokens (name, token_hash, is_admin, created_at"
            + (
                ", owner_id) VALUES ('admin', :h, :a, 1.0, 'id:old-admin')"
                if has_owner_id
                else ") VALUES ('admin', :h, :a, 1.0)"
            )
        ),
        {"h": "a" * 64, "a": True},
    )


def _check_old_rows_survive(url: str) -> None:
    store = Store(url)
    try:
        job = store.get("old-job-1")
        assert job is not None and job.state is JobState.SUCCEEDED and job.owner == "alice"
        assert job.best_val_acc == 0.5 and job.spec.optim.epochs == 1 and job.spec_error is None
        assert store.token_owner("a" * 64) == ("admin", True)
        # New rows keep coming after the old ones (the sequence survived).
        new, _ = store.create_job("alice", JobSpec())
        assert new.seq > 1
    finally:
        store.close()


def test_empty_database_upgrades_to_head(database_url: str) -> None:
    engine = make_engine(database_url)
    before, after = upgrade(engine)
    assert before is None and after == head_revision() == current_revision(engine)
    assert upgrade(engine) == (after, after)  # idempotent
    engine.dispose()


def test_pre_migration_database_is_stamped_and_upgraded(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        for ddl in PRE_MIGRATION_DDL:
            conn.execute(
                text(
                    ddl.replace("seq INTEGER NOT NULL", "seq SERIAL NOT NULL")
                    if engine.dialect.name == "postgresql"
                    else ddl
                )
            )
        _insert_old_rows(conn)
    assert current_revision(engine) is None
    before, after = upgrade(engine)
    assert before == FIRST_REVISION and after == head_revision()
    engine.dispose()
    _check_old_rows_survive(database_url)


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


@pytest.mark.parametrize("start", _revisions())
def test_database_made_by_each_revision_upgrades_to_head(database_url: str, start: str) -> None:
    """A database left at revision `start` (made by that release), holding data, upgrades to head."""
    engine = make_engine(database_url)
    upgrade(engine, start)
    assert current_revision(engine) == start
    with engine.begin() as conn:
        _insert_old_rows(conn)
    before, after = upgrade(engine)
    assert (before, after) == (start, head_revision())
    engine.dispose()
    _check_old_rows_survive(database_url)


def test_models_match_migrations(database_url: str) -> None:
    """service/engine/store.py's models and the migrations describe the same schema: a column added to a model
    without a migration (or the reverse) shows up here."""
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; add a revision in service/engine/migrations/versions: {diff}"


def test_trainctl_db_upgrade_command(tmp_path, database_url: str) -> None:
    cmd = [sys.executable, "-m", "service.client.cli", "db", "upgrade", "--data-dir", str(tmp_path / "d")]
    env_url = {"TRAINCTL_DATABASE_URL": database_url}
    import os

    out = subprocess.run(cmd, env={**os.environ, **env_url}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert head_revision() in out.stdout
    from sqlalchemy.engine import make_url

    password = make_url(database_url).password
    assert not password or password not in out.stdout + out.stderr  # the URL is printed redacted
    engine = create_engine(database_url)
    assert {"jobs", "tokens", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()
    again = subprocess.run(
        [*cmd[:4], "current", *cmd[5:]], env={**os.environ, **env_url}, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and head_revision() in again.stdout, again.stderr


def test_owner_ids_go_to_the_current_holder_of_each_name(database_url: str) -> None:
    """0004: each token gets its own owner id; a job goes to the token holding its owner name at the
    upgrade, and a job whose token is gone belongs to nobody (the admin still sees it)."""
    engine = make_engine(database_url)
    upgrade(engine, "0002")
    with engine.begin() as conn:
        _insert_old_rows(conn)  # old-job-1 of "alice", who has no token any more
        conn.execute(
            text(f"INSERT INTO jobs ({', '.join(OLD_JOB)}) VALUES ({', '.join(':' + c for c in OLD_JOB)})"),
            {**OLD_JOB, "id": "bobs-job", "owner": "bob", "idempotency_key": "k"},
        )
        conn.execute(
            text("INSERT INTO tokens (name, token_hash, is_admin, created_at) VALUES ('bob', :h, false, 1.0)"),
            {"h": "b" * 64},
        )
    upgrade(engine)
    engine.dispose()
    store = Store(database_url)
    try:
        bob, admin = store.token_identity("b" * 64), store.token_identity("a" * 64)
        assert (
            bob is not None and admin is not None and bob.owner_id.startswith("id:") and bob.owner_id != admin.owner_id
        )
        assert store.get("bobs-job").owner_id == bob.owner_id and store.get("old-job-1").owner_id is None
        assert [j.id for j in store.list(owner_id=bob.owner_id)[0]] == ["bobs-job"]
        assert store.by_idempotency_key(bob.owner_id, "k").id == "bobs-job"
    finally:
        store.close()
