"""
Job logs: the lines each attempt of a job wrote, as the worker ships them.

The worker sends batches of lines (``POST /jobs/{id}/logs``); each batch is
stored as one row (its lines as a JSON array), which keeps thousands of lines a
second cheap. Each line gets a ``seq`` (its row's number times 65,536 plus its
place in the row) that orders all lines and is the reader's cursor. Each
attempt keeps at most ``limit`` bytes of lines: on insert, its oldest lines
beyond the bound are deleted (whole rows, and the front of the oldest row
kept). Lines go when their job does (the store's delete paths remove them).

Each batch carries ``offset``, the worker's number for its first line (the
worker numbers every line of an attempt, including lines it had to drop). The
server skips lines it already has (a batch sent again after a lost answer) and
records a gap as a ``kelpie`` line saying how many lines the worker dropped.

Portable SQLAlchemy Core: runs the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import attrs
import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kelpie_sdk.server._db import JOB_LOG_ATTEMPTS, JOB_LOGS, JOBS

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "MAX_LINE_CHARS",
    "STREAMS",
    "IncomingLine",
    "JobLogs",
    "StoredLine",
    "delete_all_logs",
    "delete_logs_of",
]

#: Bytes of lines kept per attempt unless configured otherwise (1 MiB).
DEFAULT_LOG_LIMIT = 1024 * 1024
#: Longer lines are cut to this many characters.
MAX_LINE_CHARS = 16 * 1024
#: The streams a line may come from; ``kelpie`` lines are the system's notes.
STREAMS = frozenset({"stdout", "stderr", "kelpie"})

#: What a shipped batch found: stored, unknown job, or not from the attempt's holder.
ShipOutcome = Literal["ok", "not_found", "not_holder"]


class IncomingLine(NamedTuple):
    """
    One line of a shipped batch (a named tuple: a batch holds hundreds).
    """

    stream: str
    time_ms: int
    line: str


@attrs.frozen
class StoredLine:
    """
    One stored line.
    """

    seq: int
    attempt: int
    stream: str
    time_ms: int
    line: str


def delete_logs_of(conn: sa.Connection, job_ids: sa.Select[tuple[str]]) -> None:
    """
    Delete the logs of the jobs a subquery selects (inside the caller's
    transaction, before the jobs themselves go).
    """
    conn.execute(JOB_LOGS.delete().where(JOB_LOGS.c.job_id.in_(job_ids)))
    conn.execute(
        JOB_LOG_ATTEMPTS.delete().where(JOB_LOG_ATTEMPTS.c.job_id.in_(job_ids))
    )


def delete_all_logs(conn: sa.Connection) -> None:
    """
    Delete every job's logs (inside the caller's transaction).
    """
    conn.execute(JOB_LOGS.delete())
    conn.execute(JOB_LOG_ATTEMPTS.delete())


#: ``append``'s statements, built once (building them per batch cost more
#: than running them): the job's holder and attempt, and the attempt's log
#: counters (``NULL`` before its first batch).
_FIND = (
    sa.select(
        JOBS.c.machine_id,
        JOBS.c.attempt,
        JOB_LOG_ATTEMPTS.c.bytes,
        JOB_LOG_ATTEMPTS.c.next_line,
        JOB_LOG_ATTEMPTS.c.dropped,
        JOB_LOG_ATTEMPTS.c.trimmed,
    )
    .select_from(
        JOBS.outerjoin(
            JOB_LOG_ATTEMPTS,
            (JOB_LOG_ATTEMPTS.c.job_id == JOBS.c.id)
            & (JOB_LOG_ATTEMPTS.c.attempt == sa.bindparam("attempt")),
        )
    )
    .where(
        JOBS.c.id == sa.bindparam("job_id"), JOBS.c.user_id == sa.bindparam("user_id")
    )
)
_NEW_ATTEMPT = JOB_LOG_ATTEMPTS.insert()
_ADD_ROW = JOB_LOGS.insert()
_UPDATE_ATTEMPT = JOB_LOG_ATTEMPTS.update().where(
    JOB_LOG_ATTEMPTS.c.job_id == sa.bindparam("key_job_id"),
    JOB_LOG_ATTEMPTS.c.attempt == sa.bindparam("key_attempt"),
)
#: ``_trim``'s, built once too (an attempt at its bound trims on every
#: batch): an attempt's oldest rows after a cursor, 16 at a time; its rows
#: up to one; one row's lines; cutting the front of a row.
_ATTEMPT_ROWS = (JOB_LOGS.c.job_id == sa.bindparam("job_id")) & (
    JOB_LOGS.c.attempt == sa.bindparam("attempt")
)
_OLDEST_ROWS = (
    sa.select(JOB_LOGS.c.seq, JOB_LOGS.c.count, JOB_LOGS.c.size)
    .where(_ATTEMPT_ROWS, JOB_LOGS.c.seq > sa.bindparam("after"))
    .order_by(JOB_LOGS.c.seq)
    .limit(16)
)
_DELETE_ROWS_UP_TO = JOB_LOGS.delete().where(
    _ATTEMPT_ROWS, JOB_LOGS.c.seq <= sa.bindparam("upto")
)
_ROW_LINES = sa.select(JOB_LOGS.c.skip, JOB_LOGS.c.data).where(
    JOB_LOGS.c.seq == sa.bindparam("seq")
)
_DELETE_ROW = JOB_LOGS.delete().where(JOB_LOGS.c.seq == sa.bindparam("seq"))
_CUT_ROW = JOB_LOGS.update().where(JOB_LOGS.c.seq == sa.bindparam("key_seq"))


class JobLogs:
    """
    The job log table's queries.

    Args:
        engine: The store's engine (schema migrated).
        limit: Bytes of lines kept per attempt.
    """

    def __init__(self, engine: Engine, *, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the log limit must be at least 1 byte, got {limit}")
        self.engine = engine
        self.limit = limit

    def append(
        self,
        *,
        job_id: str,
        user_id: str,
        machine_id: str,
        attempt: int,
        offset: int,
        lines: Sequence[IncomingLine],
    ) -> ShipOutcome:
        """
        Store a batch from the machine that holds (or last held) the attempt.

        A batch is accepted from the machine and attempt the job names, in any
        status: the last lines of an attempt may arrive just after the worker
        reported its end. A canceled job, or one claimed again, refuses it.
        """
        with self.engine.begin() as conn:
            found = conn.execute(
                _FIND, {"job_id": job_id, "user_id": user_id, "attempt": attempt}
            ).first()
            if found is None:
                return "not_found"
            holder, held, size, next_line, dropped, trimmed = found
            if holder != machine_id or held != attempt:
                return "not_holder"
            if next_line is None:
                size, next_line, dropped, trimmed = 0, 0, 0, 0
                conn.execute(
                    _NEW_ATTEMPT,
                    {
                        "job_id": job_id,
                        "attempt": attempt,
                        "bytes": 0,
                        "next_line": 0,
                        "dropped": 0,
                        "trimmed": 0,
                    },
                )
            fresh = lines[max(0, next_line - offset) :]
            end = offset + len(lines)
            if not fresh:
                return "ok"
            data: list[tuple[str, int, str]] = []
            gap = offset - next_line
            if gap > 0:
                note = (
                    f"[kelpie] {gap} line{'s' if gap != 1 else ''} dropped on the "
                    "worker (the server was slow or unreachable)"
                )
                data.append(("kelpie", fresh[0].time_ms, note))
                dropped += gap
            data.extend(
                (item.stream, item.time_ms, item.line[:MAX_LINE_CHARS])
                for item in fresh
            )
            added = _size_of(data)
            conn.execute(
                _ADD_ROW,
                {
                    "job_id": job_id,
                    "attempt": attempt,
                    "skip": 0,
                    "count": len(data),
                    "size": added,
                    "data": _encode(data),
                },
            )
            size += added
            if size > self.limit:
                removed, freed = self._trim(conn, job_id, attempt, size - self.limit)
                size -= freed
                trimmed += removed
            conn.execute(
                _UPDATE_ATTEMPT,
                {
                    "key_job_id": job_id,
                    "key_attempt": attempt,
                    "bytes": size,
                    "next_line": max(next_line, end),
                    "dropped": dropped,
                    "trimmed": trimmed,
                },
            )
        return "ok"

    @staticmethod
    def _trim(
        conn: sa.Connection, job_id: str, attempt: int, excess: int
    ) -> tuple[int, int]:
        """
        Delete an attempt's oldest lines until ``excess`` bytes are freed:
        whole rows first, then the front of the oldest row kept.

        Returns:
            (lines deleted, bytes freed).
        """
        key = {"job_id": job_id, "attempt": attempt}
        removed = freed = 0
        cut = -1
        partial: int | None = None
        while freed < excess and partial is None:
            rows = conn.execute(_OLDEST_ROWS, {**key, "after": cut}).all()
            if not rows:
                break
            for seq, count, size in rows:
                if freed >= excess:
                    break
                if freed + size <= excess:
                    cut, removed, freed = seq, removed + count, freed + size
                else:
                    partial = seq
                    break
        if cut >= 0:
            conn.execute(_DELETE_ROWS_UP_TO, {**key, "upto": cut})
        if partial is not None:
            row = conn.execute(_ROW_LINES, {"seq": partial}).one()
            data = _decode(row[1])
            drop = 0
            while freed < excess and drop < len(data):
                freed += _size(data[drop][2])
                drop += 1
            removed += drop
            rest = data[drop:]
            if not rest:
                conn.execute(_DELETE_ROW, {"seq": partial})
                return removed, freed
            conn.execute(
                _CUT_ROW,
                {
                    "key_seq": partial,
                    "skip": row[0] + drop,
                    "count": len(rest),
                    "size": _size_of(rest),
                    "data": _encode(rest),
                },
            )
        return removed, freed

    def read(
        self,
        job_id: str,
        *,
        attempt: int | None,
        since: int,
        limit: int,
    ) -> list[StoredLine]:
        """
        Up to ``limit`` lines of a job after the cursor ``since``, oldest first.
        """
        out: list[StoredLine] = []
        first = since >> _SEQ_BITS
        with (
            self.engine.connect().execution_options(readonly=True) as conn,
            conn.begin(),
        ):
            while len(out) < limit:
                query = sa.select(
                    JOB_LOGS.c.seq,
                    JOB_LOGS.c.attempt,
                    JOB_LOGS.c.skip,
                    JOB_LOGS.c.data,
                ).where(JOB_LOGS.c.job_id == job_id, JOB_LOGS.c.seq >= first)
                if attempt is not None:
                    query = query.where(JOB_LOGS.c.attempt == attempt)
                rows = conn.execute(query.order_by(JOB_LOGS.c.seq).limit(8)).all()
                if not rows:
                    break
                for seq, row_attempt, skip, data in rows:
                    base = (seq << _SEQ_BITS) + skip
                    for i, (stream, time_ms, line) in enumerate(_decode(data)):
                        if base + i > since and len(out) < limit:
                            out.append(
                                StoredLine(base + i, row_attempt, stream, time_ms, line)
                            )
                    first = seq + 1
        return out


#: Lines per row at most, as bits: a line's seq is its row's seq shifted by these.
_SEQ_BITS = 16

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(list[tuple[str, int, str]])


def _encode(data: list[tuple[str, int, str]]) -> str:
    return _ENCODER.encode(data).decode()


def _decode(text: str) -> list[tuple[str, int, str]]:
    return _DECODER.decode(text)


def _size_of(data: list[tuple[str, int, str]]) -> int:
    """The lines' cost against the bound: ``_size`` summed, in one encode."""
    if not data:
        return 0
    text = "\n".join([line for _, _, line in data])
    return len(text.encode("utf-8", errors="replace")) + 1


def _size(line: str) -> int:
    """A line's cost against the bound: its UTF-8 bytes plus its line break."""
    return len(line.encode("utf-8", errors="replace")) + 1
