"""
Scaling rules per tenant: keyed by (user, container group), not by the group
alone, so that two tenants can each have a rule for the same group id.

Existing rules keep their ``user_id`` (the user who created them), so each
stays with its tenant.

Revision ID: 0009
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_KEY = ["user_id", "container_group_id"]


def _table(*key: str) -> sa.Table:
    # The table as 0001 made it, with the given primary key: batch mode
    # copies the rows into it (SQLite cannot alter a primary key).
    return sa.Table(
        "scaling_rules",
        sa.MetaData(),
        sa.Column("container_group_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("org_name", sa.Text),
        sa.Column("project_name", sa.Text),
        sa.Column("container_group_name", sa.Text),
        sa.Column("min_replicas", sa.Integer, nullable=False),
        sa.Column("max_replicas", sa.Integer, nullable=False),
        sa.Column("idle_threshold_seconds", sa.Integer, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(*key, name="scaling_rules_pkey"),
        sa.Index("ix_scaling_rules_user_id", "user_id"),
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "scaling_rules", recreate="always", copy_from=_table(*_KEY)
        ):
            pass
        return
    op.drop_constraint("scaling_rules_pkey", "scaling_rules", type_="primary")
    op.create_primary_key("scaling_rules_pkey", "scaling_rules", _KEY)


def downgrade() -> None:
    # Back to one rule per group: of several tenants' rules for one group,
    # the oldest stays.
    op.execute(
        "DELETE FROM scaling_rules WHERE EXISTS ("
        " SELECT 1 FROM scaling_rules AS older"
        " WHERE older.container_group_id = scaling_rules.container_group_id"
        " AND (older.created < scaling_rules.created"
        " OR (older.created = scaling_rules.created"
        " AND older.user_id < scaling_rules.user_id)))"
    )
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "scaling_rules",
            recreate="always",
            copy_from=_table("container_group_id"),
        ):
            pass
        return
    op.drop_constraint("scaling_rules_pkey", "scaling_rules", type_="primary")
    op.create_primary_key("scaling_rules_pkey", "scaling_rules", ["container_group_id"])
