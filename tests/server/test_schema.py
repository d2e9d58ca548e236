"""
The schema: migrations match the table definitions, and the claim uses its indexes.
"""

from __future__ import annotations

import pathlib

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server import open_store
from kelpie_sdk.server._db import METADATA, make_engine, upgrade
from kelpie_sdk.server._store import _CLAIM_SQL


def test_migrations_produce_the_declared_schema(tmp_path: pathlib.Path) -> None:
    """Alembic's autogenerate finds nothing to change after `upgrade head`."""
    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert [] == diff


def test_upgrade_is_idempotent_and_creates_parent_dirs(tmp_path: pathlib.Path) -> None:
    """Opening the same database twice keeps it at the head revision."""
    url = f"sqlite:///{tmp_path}/deeper/dir/k.db"
    open_store(url).engine.dispose()
    store = open_store(url)
    with store.engine.connect() as conn:
        assert (
            _head()
            == conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        )


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option(
        "script_location",
        str(pathlib.Path(upgrade.__code__.co_filename).parent) + "/migrations",
    )
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_claim_query_uses_the_partial_indexes(tmp_path: pathlib.Path) -> None:
    """EXPLAIN QUERY PLAN shows index searches, not table scans, for the claim."""
    engine = make_engine(f"sqlite:///{tmp_path}/p.db")
    upgrade(engine)
    with engine.connect() as conn:
        plan = conn.execute(
            sa.text("EXPLAIN QUERY PLAN " + _CLAIM_SQL.text),
            {"machine_id": "m", "group": "g", "user_id": "u", "now": 0},
        ).all()
    details = " | ".join(row[-1] for row in plan)
    assert "ix_jobs_running" in details
    assert "ix_jobs_pending" in details
    assert "SCAN jobs" not in details


def test_sqlite_runs_in_wal_mode(tmp_path: pathlib.Path) -> None:
    """The SQLite engine uses WAL with NORMAL sync and a busy timeout."""
    engine = make_engine(f"sqlite:///{tmp_path}/w.db")
    with engine.connect() as conn:
        assert "wal" == conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        assert 1 == conn.exec_driver_sql("PRAGMA synchronous").scalar()
        assert 10000 == conn.exec_driver_sql("PRAGMA busy_timeout").scalar()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u@127.0.0.1/test", "not supported yet"),
        ("::nonsense::", "not a database URL"),
    ],
)
def test_unsupported_database_urls_are_config_errors(url: str, message: str) -> None:
    """A URL the server cannot use is a ConfigError naming the problem."""
    with pytest.raises(ConfigError, match=message):
        open_store(url)
