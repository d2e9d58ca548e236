"""
Job logs: each attempt's output, one row per shipped batch, and per-attempt
counters.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_logs",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("skip", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_index("ix_job_logs_job_seq", "job_logs", ["job_id", "seq"])
    op.create_index(
        "ix_job_logs_job_attempt_seq", "job_logs", ["job_id", "attempt", "seq"]
    )
    op.create_table(
        "job_log_attempts",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("next_line", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("trimmed", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_log_attempts")
    op.drop_table("job_logs")
