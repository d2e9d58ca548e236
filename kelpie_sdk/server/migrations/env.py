"""
Alembic environment: runs on the connection the server hands over.
"""

from __future__ import annotations

from alembic import context

from kelpie_sdk.server._db import METADATA

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the server always passes one
    raise RuntimeError("run migrations through kelpie_sdk.server._db.upgrade()")

context.configure(
    connection=connection,
    target_metadata=METADATA,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
