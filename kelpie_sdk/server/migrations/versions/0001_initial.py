"""
Initial schema: users, API keys, jobs (with leases), bans, scaling rules.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_PENDING = sa.text("status = 'pending'")
_RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_users_username", "users", ["username"])
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column(
            "user_id",
            sa.String(36),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("org_name", sa.Text, nullable=False, server_default=""),
        sa.Column("project_name", sa.Text, nullable=False, server_default=""),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("started", sa.BigInteger),
        sa.Column("completed", sa.BigInteger),
        sa.Column("canceled", sa.BigInteger),
        sa.Column("failed", sa.BigInteger),
        sa.Column("heartbeat", sa.BigInteger),
        sa.Column("num_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("machine_id", sa.Text),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("arguments", sa.Text, nullable=False, server_default="[]"),
        sa.Column("environment", sa.Text, nullable=False, server_default="{}"),
        sa.Column("input_bucket", sa.Text),
        sa.Column("input_prefix", sa.Text),
        sa.Column("checkpoint_bucket", sa.Text),
        sa.Column("checkpoint_prefix", sa.Text),
        sa.Column("output_bucket", sa.Text),
        sa.Column("output_prefix", sa.Text),
        sa.Column("max_failures", sa.Integer, nullable=False, server_default="3"),
        sa.Column(
            "heartbeat_interval", sa.Integer, nullable=False, server_default="30"
        ),
        sa.Column("container_group_id", sa.Text, nullable=False),
        sa.Column("webhook", sa.Text),
        sa.Column("compression", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("num_heartbeats", sa.Integer, nullable=False, server_default="0"),
        sa.Column("sync", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("num_interruptions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_expires", sa.BigInteger),
        sa.Column("progress", sa.Text),
        sa.Column("last_error", sa.Text),
    )
    op.create_index(
        "ix_jobs_pending",
        "jobs",
        ["user_id", "container_group_id", "seq"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )
    op.create_index(
        "ix_jobs_running",
        "jobs",
        ["user_id", "container_group_id", "lease_expires"],
        sqlite_where=_RUNNING,
        postgresql_where=_RUNNING,
    )
    op.create_index("ix_jobs_user_seq", "jobs", ["user_id", "seq"])
    op.create_index("ix_jobs_user_status_seq", "jobs", ["user_id", "status", "seq"])
    op.create_index(
        "ix_jobs_user_group_seq", "jobs", ["user_id", "container_group_id", "seq"]
    )
    op.create_table(
        "job_bans",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("machine_id", sa.Text, primary_key=True),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "scaling_rules",
        sa.Column("container_group_id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("org_name", sa.Text),
        sa.Column("project_name", sa.Text),
        sa.Column("container_group_name", sa.Text),
        sa.Column("min_replicas", sa.Integer, nullable=False),
        sa.Column("max_replicas", sa.Integer, nullable=False),
        sa.Column("idle_threshold_seconds", sa.Integer, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_scaling_rules_user_id", "scaling_rules", ["user_id"])


def downgrade() -> None:
    for table in ("scaling_rules", "job_bans", "jobs", "api_keys", "users"):
        op.drop_table(table)
