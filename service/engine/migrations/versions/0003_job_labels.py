"""Jobs get labels people search by: name, project, tags (one row each in job_tags, for the indexed tag
filter) and the job they were resubmitted from (parent); indexes for the list's filters and sort keys.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite cannot ALTER every kind of column in place
        batch.add_column(sa.Column("name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("project", sa.String(64), nullable=True))
        batch.add_column(sa.Column("tags", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("parent", sa.String(64), nullable=True))
    op.create_index("ix_jobs_name", "jobs", ["name"])
    op.create_index("ix_jobs_project", "jobs", ["project"])
    op.create_index("ix_jobs_parent", "jobs", ["parent"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_index("ix_jobs_best_val_acc", "jobs", ["best_val_acc"])
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_job_tags_tag", "job_tags", ["tag"])


def downgrade() -> None:
    op.drop_index("ix_job_tags_tag", table_name="job_tags")
    op.drop_table("job_tags")
    for index in ("ix_jobs_best_val_acc", "ix_jobs_created_at", "ix_jobs_parent", "ix_jobs_project", "ix_jobs_name"):
        op.drop_index(index, table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("parent", "tags", "project", "name"):
            batch.drop_column(column)
