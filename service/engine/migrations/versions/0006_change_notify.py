"""PostgreSQL only: every change to a job or a token row announces itself on the `trainctl_changes` channel
(NOTIFY, sent when the changing transaction commits), so that each API replica's read cache
(service/engine/readcache.py) forgets exactly what changed, whoever changed it: another replica, the
reconciler, `trainctl` admin commands, or an operator's SQL. Payloads: `j:<job id>`, `t:<token hash>`, `*`
(a TRUNCATE: forget everything). SQLite has no NOTIFY and no read cache: nothing to do there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (table, payload prefix, the column that names what changed)
WATCHED = (("jobs", "j", "id"), ("job_tags", "j", "job_id"), ("tokens", "t", "token_hash"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # One function for the three tables: TG_ARGV gives the prefix and the key column. An UPDATE that changes
    # the key itself announces both the old and the new key; NOTIFY drops duplicates within a transaction.
    op.execute(
        """
        CREATE FUNCTION trainctl_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                PERFORM pg_notify('trainctl_changes', TG_ARGV[0] || ':' || (to_jsonb(OLD) ->> TG_ARGV[1]));
            END IF;
            IF TG_OP <> 'DELETE' THEN
                PERFORM pg_notify('trainctl_changes', TG_ARGV[0] || ':' || (to_jsonb(NEW) ->> TG_ARGV[1]));
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION trainctl_notify_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('trainctl_changes', '*');
            RETURN NULL;
        END
        $$
        """
    )
    for table, prefix, column in WATCHED:
        op.execute(
            f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION trainctl_notify_change('{prefix}', '{column}')"
        )
        op.execute(
            f"CREATE TRIGGER {table}_truncated AFTER TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION trainctl_notify_truncate()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, _prefix, _column in WATCHED:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_changed ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_truncated ON {table}")
    op.execute("DROP FUNCTION IF EXISTS trainctl_notify_change()")
    op.execute("DROP FUNCTION IF EXISTS trainctl_notify_truncate()")
