"""
The PostgreSQL twin of the store's hot path, and cross-replica wake-ups.

The worker protocol's statements run on one psycopg 3 connection per thread,
in autocommit mode: every statement below is a complete transaction on its
own, so each call is one round trip, and psycopg prepares it on the server
after its first use (``prepare=True``).

- **Claim.** One ``UPDATE ... FROM`` over two ``SELECT ... FOR UPDATE SKIP
  LOCKED`` branches (expired leases first, then pending jobs), each served by
  its partial index and stopped after one row: replicas claiming the same queue
  never wait on each other's row locks, and a row is handed out once.
- **Failure.** The status change and the ban are one statement (a
  data-modifying ``WITH``), so a failure can never requeue a job without
  banning the machine.
- **Wake-ups.** A change that makes a job claimable sends ``NOTIFY
  kelpie_work`` with ``[user_id, container_group_id]``; every replica runs a
  ``LISTEN`` thread that wakes its own long polls.
"""

from __future__ import annotations

import json
import logging
import select
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
import sqlalchemy as sa

__all__ = ["CHANNEL", "PgHotPath", "PgListener", "classify", "conninfo"]

logger = logging.getLogger("kelpie_sdk.server")

#: The NOTIFY channel that announces queues which gained a claimable job.
CHANNEL = "kelpie_work"

#: Seconds to wait for a new connection before giving up (answered as 503).
CONNECT_TIMEOUT = 5

#: Longest a single statement may run, in milliseconds.
STATEMENT_TIMEOUT_MS = 10_000


def conninfo(url: sa.URL) -> str:
    """
    A libpq connection string for a SQLAlchemy PostgreSQL URL.
    """
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def connect_args() -> dict[str, Any]:
    """
    Connection options shared by the pooled and the hot-path connections.
    """
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        "application_name": "kelpie-server",
    }


def classify(exc: BaseException) -> str | None:
    """
    How a psycopg error may go away: ``"retry"`` (serialization failure or
    deadlock: repeat at once), ``"connection"`` (lost or refused: repeat on a
    new connection), ``"busy"`` (a statement timeout: do not repeat), or
    ``None`` (not transient).
    """
    if isinstance(exc, psycopg.errors.TransactionRollback):
        return "retry"
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "busy"
    if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
        # A value too large for an index, say: the request's fault, not an
        # outage; holding the database "unreachable" would fail every caller.
        return None
    if isinstance(exc, psycopg.OperationalError):
        return "connection"
    return None


# The holder's reports find the job by its id. The status test is written
# ``status || ''`` so that it does not imply the predicate of the partial index
# of running jobs: otherwise the generic plan a connection caches could scan
# that index for the user's running jobs (it looks empty while the statistics
# are stale), walking a dead entry for every heartbeat since the last vacuum.
_HOLDER = (
    "id = %(id)s AND user_id = %(user_id)s AND status || '' = 'running' "
    "AND machine_id = %(machine_id)s "
    "AND (%(attempt)s::integer IS NULL OR attempt = %(attempt)s::integer)"
)
# A failure quarantines its machine when (counting it) it has enough failures,
# on enough different jobs, at a high enough rate of its claims.
_QUARANTINE_RULE = """
    machines.failures + 1 >= %(q_failures)s::integer
    AND machines.failed_jobs + counted.new_job >= %(q_jobs)s::integer
    AND machines.failures + 1 >= %(q_rate)s::float8 * machines.claims
"""
_NOT_BANNED = """NOT EXISTS (SELECT 1 FROM job_bans b
                      WHERE b.job_id = j.id AND b.machine_id = %(machine_id)s)"""


class PgHotPath:
    """
    Per-thread autocommit psycopg connections for the worker protocol.

    The statement texts are attributes, named as on the SQLite hot path, so
    the store runs either without knowing which it has.
    """

    CLAIM = f"""
        WITH expired AS (
            SELECT j.seq, j.machine_id AS prev FROM jobs j
            WHERE j.user_id = %(user_id)s AND j.container_group_id = %(group)s
              AND j.status = 'running' AND j.lease_expires <= %(now)s
              AND {_NOT_BANNED}
            ORDER BY j.lease_expires LIMIT 1
            FOR UPDATE SKIP LOCKED
        ), head AS (
            -- The group and the user as ranges, ordered by (group, user,
            -- seq): only the partial index of pending jobs (or a sort)
            -- yields that order, so no plan, not even the generic one a
            -- server caches while the statistics are stale, walks the primary
            -- key or the index of all the group's jobs through the finished
            -- jobs ahead of the first pending one (PostgreSQL has no
            -- INDEXED BY). With equalities the index of all jobs would give
            -- the order too.
            -- Placement: a flaky machine looks at the first %(window)s jobs
            -- and takes the least-run one; any other takes the head.
            SELECT j.seq, j.attempt FROM jobs j
            WHERE j.container_group_id >= %(group)s
              AND j.container_group_id <= %(group)s
              AND j.user_id >= %(user_id)s
              AND j.user_id <= %(user_id)s
              AND j.status = 'pending'
              AND {_NOT_BANNED}
            ORDER BY j.container_group_id, j.user_id, j.seq
            LIMIT 1 + (%(window)s::integer - 1) * (
                SELECT count(*) FROM machines f
                WHERE f.user_id = %(user_id)s AND f.machine_id = %(machine_id)s
                  AND f.interruptions >= %(flaky_min)s::integer
                  AND f.interruptions >= %(flaky_rate)s::float8 * f.claims)
            FOR UPDATE SKIP LOCKED
        ), queued AS (
            SELECT seq FROM head ORDER BY attempt, seq LIMIT 1
        ), pick AS (
            SELECT * FROM (
                SELECT seq, prev FROM expired
                UNION ALL SELECT seq, NULL FROM queued LIMIT 1
            ) p
            WHERE NOT EXISTS (SELECT 1 FROM machines q
                              WHERE q.user_id = %(user_id)s
                                AND q.machine_id = %(machine_id)s
                                AND q.quarantined_until > %(now)s)
        ), claimed AS (
            UPDATE jobs SET
                status = 'running',
                machine_id = %(machine_id)s,
                attempt = jobs.attempt + 1,
                num_interruptions = jobs.num_interruptions
                    + CASE WHEN jobs.status = 'running' THEN 1 ELSE 0 END,
                started = %(now)s,
                heartbeat = %(now)s,
                lease_expires = %(now)s + jobs.heartbeat_interval::bigint * 2000
            FROM pick WHERE jobs.seq = pick.seq
            RETURNING jobs.*
        ), interrupted AS (
            -- The holder of the expired lease taken over (not the claimer).
            UPDATE machines SET interruptions = machines.interruptions + 1,
                run_started = NULL
            FROM pick
            WHERE machines.user_id = %(user_id)s
              AND machines.machine_id = pick.prev
              AND pick.prev <> %(machine_id)s
        ), seen AS (
            INSERT INTO machines (user_id, machine_id, container_group_id,
                                  first_seen, last_seen, run_started, claims)
            SELECT %(user_id)s, %(machine_id)s, %(group)s, %(now)s, %(now)s,
                   %(now)s, 1
            FROM pick
            ON CONFLICT (user_id, machine_id) DO UPDATE SET
                container_group_id = excluded.container_group_id,
                last_seen = excluded.last_seen,
                claims = machines.claims + 1,
                -- Taking over its own expired lease: interrupted, a new run.
                interruptions = machines.interruptions + CASE
                    WHEN EXISTS (SELECT 1 FROM pick
                                 WHERE pick.prev = %(machine_id)s)
                    THEN 1 ELSE 0 END,
                run_started = CASE
                    WHEN EXISTS (SELECT 1 FROM pick
                                 WHERE pick.prev = %(machine_id)s)
                    THEN excluded.run_started
                    ELSE COALESCE(machines.run_started, excluded.run_started)
                    END
        )
        SELECT * FROM claimed
    """  # noqa: S608 - built from constants only
    STATE = (
        "SELECT status, machine_id, attempt FROM jobs "
        "WHERE id = %(id)s AND user_id = %(user_id)s"
    )
    GET = "SELECT * FROM jobs WHERE id = %(id)s AND user_id = %(user_id)s"
    GET_ANY = "SELECT * FROM jobs WHERE id = %(id)s"
    HEARTBEAT = f"""
        UPDATE jobs SET heartbeat = %(now)s,
            lease_expires = %(now)s + heartbeat_interval::bigint * 2000,
            num_heartbeats = num_heartbeats + 1,
            progress = COALESCE(%(progress)s::text, progress),
            last_error = COALESCE(%(error)s::text, last_error)
        WHERE {_HOLDER}
    """  # noqa: S608 - built from constants only
    COMPLETE = f"""
        WITH done AS (
            UPDATE jobs SET status = 'completed', completed = %(now)s,
                heartbeat = %(now)s, lease_expires = NULL,
                progress = COALESCE(%(progress)s::text, progress)
            WHERE {_HOLDER}
            RETURNING id
        ), seen AS (
            UPDATE machines SET completions = completions + 1,
                last_seen = %(now)s, run_started = COALESCE(run_started, %(now)s)
            WHERE user_id = %(user_id)s AND machine_id = %(machine_id)s
              AND EXISTS (SELECT 1 FROM done)
        )
        SELECT 1 FROM done
    """  # noqa: S608 - built from constants only
    FAIL = f"""
        WITH failed AS (
            UPDATE jobs SET
                num_failures = num_failures + 1,
                status = CASE WHEN num_failures + 1 >= max_failures
                              THEN 'failed' ELSE 'pending' END,
                failed = CASE WHEN num_failures + 1 >= max_failures
                              THEN %(now)s ELSE failed END,
                heartbeat = %(now)s, lease_expires = NULL,
                last_error = %(error)s::text
            WHERE {_HOLDER}
            RETURNING id, status, container_group_id
        ), banned AS (
            INSERT INTO job_bans (job_id, machine_id, created)
            SELECT id, %(machine_id)s, %(now)s FROM failed
            ON CONFLICT DO NOTHING
            RETURNING job_id
        ), counted AS (
            SELECT count(*)::integer AS new_job FROM banned
        ), seen AS (
            UPDATE machines SET failures = failures + 1,
                failed_jobs = failed_jobs + counted.new_job,
                last_seen = %(now)s, run_started = COALESCE(run_started, %(now)s),
                quarantines = quarantines
                    + CASE WHEN {_QUARANTINE_RULE} THEN 1 ELSE 0 END,
                quarantined_until = CASE WHEN {_QUARANTINE_RULE}
                    THEN %(now)s + %(q_ms)s::bigint ELSE quarantined_until END
            FROM counted
            WHERE user_id = %(user_id)s AND machine_id = %(machine_id)s
              AND EXISTS (SELECT 1 FROM failed)
        )
        SELECT status, container_group_id FROM failed
    """  # noqa: S608 - built from constants only
    #: Part of FAIL here; SQLite runs it as a second statement.
    BAN: str | None = None
    RELEASE = f"""
        WITH released AS (
            UPDATE jobs SET status = 'pending', lease_expires = NULL,
                heartbeat = %(now)s, num_interruptions = num_interruptions + 1
            WHERE {_HOLDER}
            RETURNING status, container_group_id
        ), seen AS (
            UPDATE machines SET interruptions = interruptions + 1,
                last_seen = %(now)s, run_started = NULL
            WHERE user_id = %(user_id)s AND machine_id = %(machine_id)s
              AND EXISTS (SELECT 1 FROM released)
        )
        SELECT status, container_group_id FROM released
    """  # noqa: S608 - built from constants only
    PROGRESS = f"""
        UPDATE jobs SET progress = %(progress)s::text
        WHERE {_HOLDER}
    """  # noqa: S608 - built from constants only
    QUARANTINED = """
        SELECT quarantined_until FROM machines
        WHERE user_id = %(user_id)s AND machine_id = %(machine_id)s
          AND quarantined_until > %(now)s
    """
    # The machine records change inside CLAIM, COMPLETE, FAIL and RELEASE.
    INTERRUPT: str | None = None
    SEEN: str | None = None
    DONE: str | None = None
    FAILED: str | None = None
    RELEASED: str | None = None
    NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"
    # The event history: run with the transition in one transaction
    # (``transaction(atomic=True)``).
    EVENT = """
        INSERT INTO job_events (job_id, time, kind, attempt, machine_id, details)
        VALUES (%(job_id)s, %(time)s, %(kind)s, %(attempt)s::integer,
                %(event_machine)s, %(details)s)
    """
    ATTEMPT = """
        SELECT attempt, machine_id, started, heartbeat, progress,
            num_failures, max_failures, webhook, container_group_id
        FROM jobs WHERE id = %(id)s AND user_id = %(user_id)s
        FOR UPDATE
    """
    OUTBOX = """
        INSERT INTO webhook_deliveries (id, user_id, job_id, event, url, body,
            echo_key, created, state, attempts, next_attempt)
        VALUES (%(id)s, %(user_id)s, %(job_id)s, %(event)s, %(url)s, %(body)s,
            %(echo_key)s, %(now)s, 'pending', 0, %(now)s)
    """
    COMPUTE = """
        UPDATE jobs SET compute_ms = compute_ms + %(compute)s,
            lost_ms = lost_ms + %(lost)s
        WHERE id = %(id)s
    """
    TAKEOVER = f"""
        SELECT j.id, j.attempt, j.machine_id, j.started, j.heartbeat, j.progress,
            j.lease_expires
        FROM jobs j
        WHERE j.user_id = %(user_id)s AND j.container_group_id = %(group)s
          AND j.status = 'running' AND j.lease_expires <= %(now)s
          AND {_NOT_BANNED}
        ORDER BY j.lease_expires LIMIT 1
        FOR UPDATE SKIP LOCKED
    """  # noqa: S608 - built from constants only

    def __init__(self, url: sa.URL) -> None:
        self._conninfo = conninfo(url)
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def _connection(self, durable: bool) -> psycopg.Connection[Any]:
        name = "conn" if durable else "relaxed"
        conn: psycopg.Connection[Any] | None = getattr(self._local, name, None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                self._forget(conn, name)
            args = connect_args()
            if not durable:
                args["options"] += " -c synchronous_commit=off"
            conn = psycopg.connect(self._conninfo, autocommit=True, **args)
            setattr(self._local, name, conn)
            with self._lock:
                self._all.append(conn)
        return conn

    def _forget(self, conn: psycopg.Connection[Any], name: str) -> None:
        setattr(self._local, name, None)
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    @contextmanager
    def transaction(
        self, *, write: bool = True, durable: bool = True, atomic: bool = False
    ) -> Iterator[Any]:
        """
        A cursor; each statement commits on its own (autocommit), or, with
        ``atomic=True``, all of them together in one transaction (a
        transition and the event that records it).

        ``durable=False`` runs on a second connection with
        ``synchronous_commit=off``: the commit does not wait for the WAL to
        reach the disk, so a crash of PostgreSQL may forget its last fraction
        of a second. Only heartbeats use it; losing one shortens a lease by an
        interval at worst.
        """
        del write
        name = "conn" if durable else "relaxed"
        conn = self._connection(durable)
        try:
            if atomic:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            else:
                with conn.cursor() as cur:
                    yield cur
        except psycopg.OperationalError:
            # The connection may be unusable (server restarted): open a new
            # one next time.
            self._forget(conn, name)
            raise

    @staticmethod
    def execute(cur: Any, sql: str, params: Mapping[str, Any]) -> int:
        cur.execute(sql, params, prepare=True)
        return int(cur.rowcount)

    @staticmethod
    def fetch_one(
        cur: Any, sql: str, params: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        cur.execute(sql, params, prepare=True)
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip((d[0] for d in cur.description), row, strict=True))

    def notify(self, user_id: str, group: str) -> None:
        """
        Tell every replica that a queue gained a claimable job.

        Best effort: a lost notification only delays a long poll until its
        next periodic check.
        """
        payload = json.dumps([user_id, group])
        try:
            with self.transaction() as cur:
                cur.execute(
                    self.NOTIFY, {"channel": CHANNEL, "payload": payload}, prepare=True
                )
        except psycopg.Error as exc:
            logger.warning("could not send a wake-up notification: %s", exc)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class PgListener:
    """
    A daemon thread that ``LISTEN``s for wake-ups and passes them on.

    Reconnects by itself when the database goes away and comes back.
    """

    def __init__(self, url: sa.URL, deliver: Callable[[str, str], None]) -> None:
        self._conninfo = conninfo(url)
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="kelpie-pg-listen", daemon=True
        )
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, **connect_args()
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    while not self._stop.is_set():
                        # Sleep in select() (no GIL held, no periodic wake-ups
                        # of psycopg's own wait loop), then read what came.
                        readable, _, _ = select.select([conn.fileno()], [], [], 1.0)
                        if readable:
                            for note in conn.notifies(timeout=0, stop_after=0):
                                self._dispatch(note.payload)
            except psycopg.Error as exc:
                self.ready.clear()
                logger.warning("wake-up listener lost the database: %s", exc)
                self._stop.wait(1.0)

    def _dispatch(self, payload: str) -> None:
        try:
            user_id, group = json.loads(payload)
        except (ValueError, TypeError):
            logger.warning("ignored a malformed wake-up: %r", payload)
            return
        try:
            self._deliver(str(user_id), str(group))
        except Exception:  # e.g. the server's event loop already closed
            logger.warning("a wake-up could not be delivered", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
