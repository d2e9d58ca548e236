"""
The schema: migrations match the table definitions, and the claim uses its indexes.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server import open_store
from kelpie_sdk.server._db import METADATA, make_engine, upgrade
from kelpie_sdk.server._pg import PgHotPath
from kelpie_sdk.server._store import _CLAIM_SQL, ReputationPolicy

from ..pg import fresh_database


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
            {
                "machine_id": "m",
                "group": "g",
                "user_id": "u",
                "now": 0,
                **ReputationPolicy().params(),
            },
        ).all()
    details = " | ".join(row[-1] for row in plan)
    assert "ix_jobs_running" in details
    assert "ix_jobs_pending" in details
    assert "SCAN jobs" not in details
    # The machine's record (quarantine, placement) is one primary-key lookup.
    assert "SCAN machines" not in details


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
        ("mysql://u@127.0.0.1/test", "the mysql database is not supported"),
        ("::nonsense::", "not a database URL"),
        # Nothing listens on port 1: refused at once, said in one line.
        ("postgresql://u@127.0.0.1:1/test", "cannot reach the database"),
    ],
)
def test_unsupported_database_urls_are_config_errors(url: str, message: str) -> None:
    """A URL the server cannot use is a ConfigError naming the problem."""
    with pytest.raises(ConfigError, match=message):
        open_store(url)


@pytest.fixture
def pg_url() -> Any:
    """A fresh, empty PostgreSQL database."""
    with fresh_database() as url:
        yield url


def test_postgresql_migrations_produce_the_declared_schema(pg_url: str) -> None:
    """The same migrations build the declared schema on PostgreSQL."""
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), METADATA)
        assert [] == diff
    finally:
        engine.dispose()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_postgresql_url_spellings_all_mean_psycopg(pg_url: str, scheme: str) -> None:
    """postgresql://, postgres:// and postgresql+psycopg:// all open the store."""
    store = open_store(scheme + pg_url.removeprefix("postgresql"))
    try:
        assert "psycopg" == store.engine.dialect.driver
        assert store.check_ready() is None
    finally:
        store.close()


def _fill(conn: Any, **counts: int) -> None:
    """Insert jobs of user ``u`` in group ``g`` (held by ``m``), per status."""
    for status, count in counts.items():
        conn.execute(
            "INSERT INTO jobs (id, user_id, status, created, command,"
            " container_group_id, machine_id) SELECT gen_random_uuid()::text,"
            " 'u', %s, n, 'x', 'g', 'm' FROM generate_series(1, %s) AS n",
            (status, count),
        )


@pytest.mark.parametrize(
    ("completed", "pending"),
    [(20_000, 1), (20_000, 20_000)],
    ids=["few-pending", "many-pending"],
)
def test_postgresql_claim_uses_the_partial_indexes_with_many_finished_jobs(
    pg_url: str, completed: int, pending: int
) -> None:
    """
    With 20,000 finished jobs ahead of the pending ones, the claim reads the
    partial indexes: never the whole table, and never the primary key (which
    would walk every finished job before the first pending one).
    """
    import psycopg

    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _fill(conn, completed=completed, pending=pending)
        conn.execute("ANALYZE jobs")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN " + PgHotPath.CLAIM,
                {
                    "machine_id": "m",
                    "group": "g",
                    "user_id": "u",
                    "now": 0,
                    **ReputationPolicy().params(),
                },
            )
        )
    assert "ix_jobs_running" in plan
    assert "ix_jobs_pending" in plan
    assert "Seq Scan on jobs" not in plan
    assert "jobs_pkey on jobs j" not in plan
    assert "Seq Scan on machines" not in plan


def _generic_plan(conn: Any, statement: str, params: dict[str, Any]) -> str:
    """
    The plan PostgreSQL caches for a hot-path statement once a server has run
    it a few times: a generic plan, made without the parameters' values (the
    server's connections prepare it, and PostgreSQL keeps a generic plan that
    costs no more than the custom ones; here it is forced).
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE hot AS {text}")
    try:
        args = ", ".join(
            "NULL" if params[n] is None else f"'{params[n]}'" for n in names
        )
        return "\n".join(row[0] for row in conn.execute(f"EXPLAIN EXECUTE hot({args})"))
    finally:
        conn.execute("DEALLOCATE hot")


@pytest.mark.parametrize(
    ("completed", "pending", "analyzed"),
    [(0, 3000, False), (20_000, 10, False), (20_000, 10, True)],
    ids=["new-queue", "stale-statistics", "analyzed"],
)
def test_postgresql_cached_claim_plan_reads_the_pending_index(
    pg_url: str, completed: int, pending: int, analyzed: bool
) -> None:
    """
    The plan a server process caches for the claim reads the partial index of
    pending jobs, whatever the statistics say: not an index over every job of
    the group, which walks each finished job ahead of the first pending one
    (claims got slower with every job done, until the next ANALYZE).
    """
    import psycopg

    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _fill(conn, completed=completed, pending=pending)
        if analyzed:
            conn.execute("ANALYZE jobs")
        plan = _generic_plan(
            conn,
            PgHotPath.CLAIM,
            {
                "machine_id": "m",
                "group": "g",
                "user_id": "u",
                "now": 0,
                **ReputationPolicy().params(),
            },
        )
    assert "ix_jobs_pending" in plan, plan
    assert "ix_jobs_user_group_seq" not in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


@pytest.mark.parametrize(
    "statement", ["HEARTBEAT", "COMPLETE", "FAIL", "RELEASE", "PROGRESS"]
)
@pytest.mark.parametrize("analyzed", [False, True], ids=["stale", "analyzed"])
def test_postgresql_cached_holder_plans_find_the_job_by_id(
    pg_url: str, statement: str, analyzed: bool
) -> None:
    """
    The plans a server caches for the holder's reports (heartbeat, completion,
    failure, release, progress) find the job by its id: not by scanning the
    partial index of running jobs, whose dead entries (one per heartbeat)
    every report would walk.
    """
    import psycopg

    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _fill(conn, pending=3000, running=1000)
        if analyzed:
            conn.execute("ANALYZE jobs")
        params = {
            "id": "j",
            "user_id": "u",
            "machine_id": "m",
            "attempt": None,
            "now": 0,
            "progress": None,
            "error": None,
            **ReputationPolicy().params(),
        }
        plan = _generic_plan(conn, getattr(PgHotPath, statement), params)
    assert "ix_jobs_running" not in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_schema_newer_than_known_is_refused(
    tmp_path: pathlib.Path, backend: str
) -> None:
    """A database migrated by a newer kelpie-sdk stops this one from starting."""
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path}/n.db"
            if backend == "sqlite"
            else stack.enter_context(fresh_database())
        )
        open_store(url).close()
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        engine.dispose()
        for migrate in (True, False):
            with pytest.raises(ConfigError, match="newer than this kelpie-sdk knows"):
                open_store(url, migrate=migrate)


def test_an_old_schema_is_refused_without_migrating(tmp_path: pathlib.Path) -> None:
    """migrate=False refuses an empty database, naming `kelpie db upgrade`."""
    with pytest.raises(ConfigError, match="run `kelpie db upgrade"):
        open_store(f"sqlite:///{tmp_path}/e.db", migrate=False)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_scaling_rules_move_to_tenant_keys_keeping_their_owner(
    dialect: str, tmp_path: pathlib.Path
) -> None:
    """A rule stored before the per-tenant key keeps its user; others can now add theirs."""
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path}/r.db"
        else:
            url = stack.enter_context(fresh_database())
        engine = make_engine(url)
        stack.callback(engine.dispose)
        upgrade(engine, "0005")
        insert = sa.text(
            "INSERT INTO scaling_rules VALUES "
            "('g', :user, 'acme', 'proj', 'workers', 0, 5, 60, 1, 2)"
        )
        with engine.begin() as conn:
            conn.execute(insert, {"user": "u-1"})
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(insert, {"user": "u-2"})
            rows = conn.execute(
                sa.text(
                    "SELECT user_id, container_group_id, container_group_name, "
                    "max_replicas FROM scaling_rules ORDER BY user_id"
                )
            ).all()
        assert [("u-1", "g", "workers", 5), ("u-2", "g", "workers", 5)] == [
            tuple(r) for r in rows
        ]
        assert ["user_id", "container_group_id"] == sa.inspect(
            engine
        ).get_pk_constraint("scaling_rules")["constrained_columns"]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"user": "u-2"})
