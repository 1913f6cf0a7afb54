"""Jobs belong to a stable owner id, not a token name; logout can end a token's dashboard sessions.

- tokens.owner_id: a new random id per token (unique, never reused), so a token re-created under an old name
  starts with no jobs; tokens.sessions_not_before: sessions issued before it are void.
- jobs.owner_id: the owner id of the token that held the job's owner name when this migration ran; NULL for
  jobs whose token was already gone (only the admin sees those). Idempotency keys are unique per owner id.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("sessions_not_before", sa.Float(), nullable=True))
    conn = op.get_bind()
    for (name,) in conn.execute(sa.text("SELECT name FROM tokens")).all():
        conn.execute(
            sa.text("UPDATE tokens SET owner_id = :o WHERE name = :n"), {"o": "id:" + secrets.token_hex(16), "n": name}
        )
    with op.batch_alter_table("tokens") as batch:
        batch.alter_column("owner_id", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint("uq_tokens_owner_id", ["owner_id"])

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(64), nullable=True))
    conn.execute(sa.text("UPDATE jobs SET owner_id = (SELECT owner_id FROM tokens WHERE tokens.name = jobs.owner)"))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_owner_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_owner_id_idempotency_key", ["owner_id", "idempotency_key"])
        batch.create_index("ix_jobs_owner_id", ["owner_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_id")
        batch.drop_constraint("uq_owner_id_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_owner_idempotency_key", ["owner", "idempotency_key"])
        batch.drop_column("owner_id")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_constraint("uq_tokens_owner_id", type_="unique")
        batch.drop_column("sessions_not_before")
        batch.drop_column("owner_id")
