"""
The job log table's queries, on SQLite and on PostgreSQL (portable Core SQL).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk.server._db import (
    JOB_LOG_ATTEMPTS,
    JOB_LOGS,
    JOBS,
    METADATA,
    make_engine,
)
from kelpie_sdk.server._logs import (
    MAX_LINE_CHARS,
    IncomingLine,
    JobLogs,
    _size,
    _size_of,
    delete_all_logs,
    delete_logs_of,
)

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """The schema on a fresh SQLite file, or in a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/logs.db")
        METADATA.create_all(eng)
        yield eng
        eng.dispose()
        return
    schema = f"logs_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    eng = sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        METADATA.create_all(eng)
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _job(engine: sa.Engine, machine: str = "m1", attempt: int = 1) -> str:
    job_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            JOBS.insert().values(
                id=job_id,
                user_id="u",
                status="running",
                created=0,
                command="x",
                container_group_id="g",
                machine_id=machine,
                attempt=attempt,
            )
        )
    return job_id


def _lines(*texts: str) -> list[IncomingLine]:
    return [IncomingLine("stdout", 1000, t) for t in texts]


def test_append_dedupes_reports_gaps_and_trims(engine: sa.Engine) -> None:
    """Overlap skipped, a gap noted, the oldest lines trimmed past the limit."""
    logs = JobLogs(engine, limit=120)
    job_id = _job(engine)

    def add(offset: int, *texts: str, machine: str = "m1") -> str:
        return logs.append(
            job_id=job_id,
            user_id="u",
            machine_id=machine,
            attempt=1,
            offset=offset,
            lines=_lines(*texts),
        )

    assert "ok" == add(0, "aaaa", "bbbb")
    assert "ok" == add(1, "bbbb", "cccc")
    assert "not_holder" == add(3, "x", machine="m2")
    assert "not_found" == logs.append(
        job_id=job_id, user_id="other", machine_id="m1", attempt=1, offset=0, lines=[]
    )
    assert ["aaaa", "bbbb", "cccc"] == [
        x.line for x in logs.read(job_id, attempt=None, since=0, limit=10)
    ]
    assert "ok" == add(5, "ffff")  # lines 3 and 4 dropped on the worker
    note = "[kelpie] 2 lines dropped on the worker (the server was slow or unreachable)"
    assert ["aaaa", "bbbb", "cccc", note, "ffff"] == [
        x.line for x in logs.read(job_id, attempt=1, since=0, limit=10)
    ]
    # 3 x 5 + 76 + 5 = 96 bytes; 31 more make 127: the two oldest lines go.
    assert "ok" == add(6, "g" * 30)
    kept = logs.read(job_id, attempt=1, since=0, limit=10)
    assert [
        ("stdout", "cccc"),
        ("kelpie", note),
        ("stdout", "ffff"),
        ("stdout", "g" * 30),
    ] == [(x.stream, x.line) for x in kept]
    with engine.connect() as conn:
        row = conn.execute(sa.select(JOB_LOG_ATTEMPTS)).mappings().one()
        stored = conn.execute(
            sa.select(sa.func.sum(JOB_LOGS.c.size), sa.func.count())
        ).one()
    # The first batch ("aaaa", "bbbb") went whole; no empty row is left.
    assert (117, 3) == tuple(stored)
    assert (7, 2, 2, 117) == (
        row["next_line"],
        row["dropped"],
        row["trimmed"],
        row["bytes"],
    )


def test_long_lines_are_cut(engine: sa.Engine) -> None:
    """A line longer than MAX_LINE_CHARS is stored cut to that length."""
    logs = JobLogs(engine, limit=1024 * 1024)
    job_id = _job(engine)
    logs.append(
        job_id=job_id,
        user_id="u",
        machine_id="m1",
        attempt=1,
        offset=0,
        lines=_lines("é" * (MAX_LINE_CHARS + 10)),
    )
    [line] = logs.read(job_id, attempt=None, since=0, limit=10)
    assert MAX_LINE_CHARS == len(line.line)


def test_delete_helpers_remove_lines_and_counters(engine: sa.Engine) -> None:
    """delete_logs_of takes a subquery of job ids; delete_all_logs takes all."""
    logs = JobLogs(engine, limit=1024)
    first, second = _job(engine), _job(engine)
    for job_id in (first, second):
        logs.append(
            job_id=job_id,
            user_id="u",
            machine_id="m1",
            attempt=1,
            offset=0,
            lines=_lines("hi"),
        )
    with engine.begin() as conn:
        delete_logs_of(conn, sa.select(JOBS.c.id).where(JOBS.c.id == first))
    with engine.connect() as conn:
        assert [second] == list(conn.execute(sa.select(JOB_LOGS.c.job_id)).scalars())
        assert [second] == list(
            conn.execute(sa.select(JOB_LOG_ATTEMPTS.c.job_id)).scalars()
        )
    with engine.begin() as conn:
        delete_all_logs(conn)
    with engine.connect() as conn:
        assert (
            0 == conn.execute(sa.select(sa.func.count()).select_from(JOB_LOGS)).scalar()
        )


def test_the_limit_must_be_positive(engine: sa.Engine) -> None:
    """A zero limit is refused with a message that says what is wrong."""
    with pytest.raises(ValueError, match="at least 1 byte"):
        JobLogs(engine, limit=0)


@given(st.lists(st.text(), max_size=20))
def test_a_batch_costs_the_sum_of_its_lines(texts: list[str]) -> None:
    """The one-encode size of a batch equals its lines' sizes summed."""
    data = [("stdout", 0, text) for text in texts]
    assert sum(_size(text) for text in texts) == _size_of(data)
