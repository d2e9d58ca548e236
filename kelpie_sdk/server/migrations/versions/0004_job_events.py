"""
Job events (every transition with its cause), job names and tags, and the
compute counters behind a job's goodput.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("name", sa.Text))
        batch.add_column(sa.Column("tags", sa.Text))
        batch.add_column(
            sa.Column("compute_ms", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("lost_ms", sa.BigInteger, nullable=False, server_default="0")
        )
    op.create_index("ix_jobs_user_name_seq", "jobs", ["user_id", "name", "seq"])
    op.create_table(
        "job_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("time", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("machine_id", sa.Text),
        sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_index("ix_job_events_job_seq", "job_events", ["job_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_job_events_job_seq", table_name="job_events")
    op.drop_table("job_events")
    op.drop_index("ix_jobs_user_name_seq", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lost_ms")
        batch.drop_column("compute_ms")
        batch.drop_column("tags")
        batch.drop_column("name")
