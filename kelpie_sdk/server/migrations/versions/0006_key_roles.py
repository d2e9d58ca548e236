"""
API keys: a key id to name a key by, a role, container groups, expiry,
last use, revocation, and whether the key came from ``KELPIE_ADMIN_KEY``.

Existing keys keep working: the admin's become ``admin`` keys seeded from the
environment (the next ``KELPIE_ADMIN_KEY`` replaces them), every other key a
``user`` key. A key's id is the start of its hash, which names it without
revealing it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ADMIN_ID = "00000000-0000-0000-0000-000000000000"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("key_id", sa.String(16)))
    op.add_column(
        "api_keys",
        sa.Column("role", sa.String(16), nullable=False, server_default="user"),
    )
    op.add_column("api_keys", sa.Column("container_groups", sa.Text))
    op.add_column("api_keys", sa.Column("expires", sa.BigInteger))
    op.add_column("api_keys", sa.Column("last_used", sa.BigInteger))
    op.add_column("api_keys", sa.Column("revoked", sa.BigInteger))
    op.add_column(
        "api_keys",
        sa.Column("seeded", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    keys = sa.table(
        "api_keys",
        sa.column("key_hash", sa.String),
        sa.column("key_id", sa.String),
        sa.column("user_id", sa.String),
        sa.column("role", sa.String),
        sa.column("seeded", sa.Boolean),
    )
    op.execute(keys.update().values(key_id=sa.func.substr(keys.c.key_hash, 1, 16)))
    op.execute(
        keys.update()
        .where(keys.c.user_id == _ADMIN_ID)
        .values(role="admin", seeded=sa.true())
    )
    op.create_index("ix_api_keys_key_id", "api_keys", ["key_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_api_keys_key_id", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        for column in (
            "seeded",
            "revoked",
            "last_used",
            "expires",
            "container_groups",
            "role",
            "key_id",
        ):
            batch.drop_column(column)
