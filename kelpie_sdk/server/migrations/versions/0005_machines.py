"""
Machines: each machine's record (claims, completions, failures, interruptions,
observed uptime) and its quarantine.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machines",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("machine_id", sa.Text, primary_key=True),
        sa.Column("container_group_id", sa.Text, nullable=False),
        sa.Column("first_seen", sa.BigInteger, nullable=False),
        sa.Column("last_seen", sa.BigInteger, nullable=False),
        sa.Column("run_started", sa.BigInteger),
        sa.Column("claims", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed_jobs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("interruptions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("quarantined_until", sa.BigInteger),
        sa.Column("quarantines", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index(
        "ix_machines_user_group", "machines", ["user_id", "container_group_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_machines_user_group", table_name="machines")
    op.drop_table("machines")
