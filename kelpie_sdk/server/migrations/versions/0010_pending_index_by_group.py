"""
The claim's index of pending jobs leads with the container group:
``(container_group_id, user_id, seq)`` instead of ``(user_id,
container_group_id, seq)``.

On PostgreSQL the claim orders the pending jobs by (group, user, seq), with
the group and the user given as ranges: an order that only this index gives.
With the old column order the index over every job of a user's group
(``ix_jobs_user_group_seq``) gave the same order, and the plan a server
caches for the claim could pick it while the table's statistics were stale,
walking every finished job of the group on each claim. SQLite names the index
(``INDEXED BY``) and is indifferent to the order.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_PENDING = sa.text("status = 'pending'")


def _recreate(columns: list[str]) -> None:
    op.drop_index("ix_jobs_pending", table_name="jobs")
    op.create_index(
        "ix_jobs_pending",
        "jobs",
        columns,
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )


def upgrade() -> None:
    _recreate(["container_group_id", "user_id", "seq"])


def downgrade() -> None:
    _recreate(["user_id", "container_group_id", "seq"])
