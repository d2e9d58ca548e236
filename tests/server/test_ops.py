"""
Operating the server: ``kelpie db upgrade``, ``--no-upgrade``, /healthz, /readyz.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from rich.console import Console

from kelpie_sdk.cli import main
from kelpie_sdk.server._db import head_revision, make_engine
from kelpie_sdk.testing import run_server

from ..pg import fresh_database


def _kelpie(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), console=Console(file=out, width=200))
    return code, out.getvalue()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_db_upgrade_creates_the_schema_and_is_repeatable(
    tmp_path: pathlib.Path, backend: str
) -> None:
    """`kelpie db upgrade` migrates an empty database to head, twice harmlessly."""
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path}/u.db"
            if backend == "sqlite"
            else stack.enter_context(fresh_database())
        )
        for _ in range(2):
            code, out = _kelpie("db", "upgrade", "--database", url)
            assert 0 == code, out
            assert f"revision {head_revision()}" in out
        engine = make_engine(url)
        with engine.connect() as conn:
            version = conn.execute(
                sa.text("SELECT version_num FROM alembic_version")
            ).scalar()
        engine.dispose()
        assert head_revision() == version


def test_db_upgrade_refuses_a_newer_schema(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema from a newer kelpie-sdk is an error (exit 1), left untouched."""
    url = f"sqlite:///{tmp_path}/n.db"
    assert 0 == _kelpie("db", "upgrade", "--database", url)[0]
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'zzzz'"))
    engine.dispose()
    assert 1 == _kelpie("db", "upgrade", "--database", url)[0]
    assert "newer than this kelpie-sdk knows" in capsys.readouterr().err


def test_healthz_and_readyz_need_no_key(api_server: Any) -> None:
    """Both probes answer 200 without a key while the database is fine."""
    health = requests.get(api_server.url + "/healthz", timeout=10)
    assert (200, {"status": "ok"}) == (health.status_code, health.json())
    ready = requests.get(api_server.url + "/readyz", timeout=10)
    assert (200, {"status": "ready"}) == (ready.status_code, ready.json())


def test_readyz_is_503_when_the_schema_is_not_current(tmp_path: pathlib.Path) -> None:
    """A server whose database schema moved on is alive but not ready."""
    url = f"sqlite:///{tmp_path}/r.db"
    with run_server(database_url=url) as server:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'zzzz'"))
        engine.dispose()
        assert 200 == requests.get(server.url + "/healthz", timeout=10).status_code
        ready = requests.get(server.url + "/readyz", timeout=10)
        assert 503 == ready.status_code
        assert ready.headers["Retry-After"].isdigit()
        assert "schema is at revision zzzz" in ready.json()["message"]


def test_readyz_is_503_when_the_database_is_gone() -> None:
    """Dropping the PostgreSQL database under a server makes /readyz say so."""
    with contextlib.ExitStack() as stack:
        dropped = contextlib.ExitStack()
        url = dropped.enter_context(fresh_database())
        server = stack.enter_context(run_server(database_url=url))
        assert 200 == requests.get(server.url + "/readyz", timeout=10).status_code
        dropped.close()  # DROP DATABASE ... WITH (FORCE)
        ready = requests.get(server.url + "/readyz", timeout=30)
        assert 503 == ready.status_code
        assert "database unreachable" in ready.json()["message"]
