"""
The job store: every query the API server runs, as plain synchronous methods.

The queue's guarantees live here, in single SQL statements:

- **Atomic claim.** ``claim()`` is one ``UPDATE ... WHERE seq = (SELECT ...)
  RETURNING`` inside a write transaction (``BEGIN IMMEDIATE`` on SQLite, where
  the single writer serialises claims). It hands a job to exactly one caller,
  bumps the job's ``attempt`` and sets its lease.
- **Leases.** A running job's lease is ``heartbeat + 2 x heartbeat_interval``
  (the original's stale rule, stored so that an index can serve it). A claim
  takes a running job whose lease expired before any pending job, and counts
  that as an *interruption*, never as a failure.
- **Fencing.** Heartbeats, completion, failure and release only take effect for
  the current holder: ``status = 'running' AND machine_id = :m`` (and the
  claim's ``attempt`` when the worker sends it). Final states never change.
- **Failures.** Below ``max_failures`` a failure bans that machine from the job
  and puts the job straight back in the queue.
- **Idempotent submission.** ``insert_jobs_once()`` inserts the tenant's
  ``Idempotency-Key`` row (primary key ``(user_id, key)``, ``ON CONFLICT DO
  NOTHING``) in the jobs' transaction: one set of jobs per key, whatever runs
  at the same time.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Literal,
    ParamSpec,
    TypeVar,
)

import attrs
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, RowMapping

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.models import (
    LEGACY_STORAGE_FIELDS,
    ApiKey,
    Job,
    JobEvent,
    JobStatus,
    JobSubmission,
    Machine,
    MachineTable,
    ScalingRule,
    ScalingRuleSubmission,
    ScalingRuleUpdate,
    SyncSpec,
    User,
    WorkerReport,
)
from kelpie_sdk.server._db import (
    ADMIN_ID,
    API_KEYS,
    IDEMPOTENCY_KEYS,
    JOB_BANS,
    JOB_EVENTS,
    JOBS,
    MACHINES,
    SCALING_RULES,
    USERS,
    WEBHOOK_DELIVERIES,
    current_revision,
    head_revision,
)
from kelpie_sdk.server._logs import delete_all_logs, delete_logs_of
from kelpie_sdk.server._webhooks import delivery_row

if TYPE_CHECKING:
    from kelpie_sdk.server._pg import PgHotPath, PgListener

__all__ = [
    "IDEMPOTENCY_KEY_SECONDS",
    "KEY_PREFIX",
    "LAST_USED_EVERY_MS",
    "MIN_ADMIN_KEY_LENGTH",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "Principal",
    "ReportOutcome",
    "ReputationPolicy",
    "Store",
    "SubmitAnswer",
    "check_admin_key",
    "hash_key",
    "key_id_of",
    "new_key",
]

#: What a fenced worker report found: it took effect, the job is not known,
#: or the caller does not hold the job (any more).
ReportOutcome = Literal["ok", "not_found", "not_holder"]


class DatabaseUnavailable(Exception):
    """
    The database cannot be reached (or stays busy) even after retries; the
    request may succeed if repeated later (the API answers 503).
    """


class IdempotencyConflict(Exception):
    """
    An ``Idempotency-Key`` already used by the tenant for another request (a
    different body or endpoint); the API answers 409.
    """


#: How long a submission's ``Idempotency-Key`` is remembered (at least), in
#: seconds: a repeat within this time replays the first answer.
IDEMPOTENCY_KEY_SECONDS = 24 * 3600
#: The most expired keys one keyed submission deletes in passing: enough to
#: keep up with the rate keys are made, too few to slow a submission down.
_KEY_SWEEP_LIMIT = 100


@attrs.frozen
class SubmitAnswer:
    """
    The answer to a keyed submission: the status and JSON body sent the first
    time, and whether this is a repeat that queued nothing.
    """

    status: int
    body: str
    replayed: bool


#: Pauses before each retry of a lost connection, a serialization failure or a
#: deadlock, in seconds: one at once (a fresh connection), one shortly after.
#: Kept short, since the caller (the SDK, the worker) retries a 503 with its
#: own backoff.
RETRY_DELAYS = (0.0, 0.05)

#: After the database was found unreachable, calls fail fast (503) for this
#: long instead of each waiting for a connection timeout of its own.
UNREACHABLE_HOLD_SECONDS = 1.0

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _classify(exc: BaseException) -> str | None:
    """
    How a database error may go away: ``"retry"`` (serialization failure,
    deadlock), ``"connection"`` (lost or refused), ``"busy"`` (a timeout or a
    lock held too long: not worth repeating at once), or ``None``.
    """
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection free
        return "busy"
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return "connection"
        if exc.orig is None:
            return None
        exc = exc.orig
    if isinstance(exc, sqlite3.OperationalError):
        # SQLite already waited out its 10 s busy timeout.
        return "busy" if "locked" in str(exc) or "busy" in str(exc) else None
    if type(exc).__module__.startswith("psycopg"):
        from kelpie_sdk.server._pg import classify

        return classify(exc)
    return None


def _resilient(
    method: Callable[Concatenate[Store, _P], _R],
) -> Callable[Concatenate[Store, _P], _R]:
    """
    Retry a store method on transient database errors; raise
    ``DatabaseUnavailable`` when they persist.

    Every retried method is one transaction that either committed or did not
    (a lost connection rolls it back).
    """

    @functools.wraps(method)
    def run(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._unreachable_until > time.monotonic():
            raise DatabaseUnavailable(self._unreachable_reason)
        for delay in (*RETRY_DELAYS, None):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                kind = _classify(exc)
                if kind is None:
                    raise
                if kind != "busy" and delay is not None:
                    time.sleep(delay)
                    continue
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"the database is unavailable ({type(exc).__name__}: {first})"
                if kind == "connection":
                    self._unreachable_reason = reason
                    self._unreachable_until = (
                        time.monotonic() + UNREACHABLE_HOLD_SECONDS
                    )
                raise DatabaseUnavailable(reason) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    return run


def hash_key(key: str) -> str:
    """
    The stored form of an API key.
    """
    return hashlib.sha256(key.encode()).hexdigest()


#: The range of times a row may hold (milliseconds since the epoch): years
#: 1 to 9999, what a ``datetime`` can represent.
_MIN_MS = -62_135_596_800_000
_MAX_MS = 253_402_300_799_999
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ms_to_dt(value: int | None) -> dt.datetime | None:
    if value is None:
        return None
    # A time beyond what a datetime holds (a row written by an older server
    # that took any heartbeat interval) is read as the nearest it can hold:
    # one such row must not make every listing fail.
    if _MIN_MS < value < _MAX_MS - 1000:
        return dt.datetime.fromtimestamp(value / 1000, dt.UTC)
    clamped = min(max(value, _MIN_MS), _MAX_MS)
    return _EPOCH + dt.timedelta(milliseconds=clamped)


#: The admin named no tenant, and several have a rule for the group.
_AMBIGUOUS = object()


@attrs.frozen
class Principal:
    """
    Who is calling: the user behind an API key, and the key's role.

    Attributes:
        role: ``admin``, ``user`` or ``worker``; by default ``admin`` for the
            admin user, else ``user``.
        key_id: The key's id (``""`` for a principal made in code).
        container_groups: A worker key's only container groups; ``None``: all.
        last_used: When the key was last marked used (ms), if ever.
    """

    user_id: str
    org_name: str
    project_name: str
    role: str = attrs.field(default="", kw_only=True)
    key_id: str = attrs.field(default="", kw_only=True)
    container_groups: tuple[str, ...] | None = attrs.field(default=None, kw_only=True)
    last_used: int | None = attrs.field(
        default=None, kw_only=True, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if not self.role:
            role = "admin" if self.user_id == ADMIN_ID else "user"
            object.__setattr__(self, "role", role)

    @property
    def is_admin(self) -> bool:
        """
        Whether the key is an admin key (it sees every user's jobs).
        """
        return self.role == "admin"


#: Every key starts with this, then the role's letter and ``_``.
KEY_PREFIX = "kelpie_"
#: The shortest admin key accepted (``KELPIE_ADMIN_KEY``).
MIN_ADMIN_KEY_LENGTH = 32
#: How often (ms) a key's ``last_used`` is written at most.
LAST_USED_EVERY_MS = 60_000


def check_admin_key(admin_key: str | None) -> None:
    """
    Refuse an admin key shorter than ``MIN_ADMIN_KEY_LENGTH``.

    Raises:
        ConfigError: The key is too short (the message says how to make one).
    """
    if admin_key is not None and len(admin_key) < MIN_ADMIN_KEY_LENGTH:
        raise ConfigError(
            f"the admin key (KELPIE_ADMIN_KEY) has {len(admin_key)} characters; "
            f"it must have at least {MIN_ADMIN_KEY_LENGTH}, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )


def new_key(role: str) -> str:
    """
    A fresh random key: ``kelpie_`` + the role's letter (``a``, ``u``, ``w``)
    + ``_`` + 43 URL-safe characters (256 random bits).
    """
    return f"{KEY_PREFIX}{role[0]}_{secrets.token_urlsafe(32)}"


def key_id_of(digest: str) -> str:
    """
    The id of the key with this hash: the hash's first 16 hex digits.
    """
    return digest[:16]


@attrs.frozen(kw_only=True)
class ReputationPolicy:
    """
    When a machine is quarantined, which machines count as flaky, and which
    count as live (see docs/server.md, "Machines").

    A failure quarantines its machine for ``quarantine_seconds`` when, counting
    it, the machine has at least ``quarantine_failures`` failures, on at least
    ``quarantine_jobs`` different jobs, and failed at least
    ``quarantine_rate`` of its claims. A machine is *flaky* once it has at
    least ``flaky_interruptions`` interruptions and they are at least
    ``flaky_rate`` of its claims: it then takes the least-run job among the
    first ``placement_window`` pending ones instead of the head of the queue.
    A machine is *live* while it holds an unexpired lease or was seen in the
    last ``live_seconds``, and is not quarantined.
    """

    quarantine_failures: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    quarantine_jobs: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    quarantine_rate: float = attrs.field(
        default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    quarantine_seconds: float = attrs.field(
        default=3600.0, validator=attrs.validators.ge(0.0)
    )
    flaky_interruptions: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    flaky_rate: float = attrs.field(
        default=0.25, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    placement_window: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    live_seconds: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))

    #: The environment variable of each setting.
    ENV: ClassVar[Mapping[str, str]] = {
        "quarantine_failures": "KELPIE_QUARANTINE_FAILURES",
        "quarantine_jobs": "KELPIE_QUARANTINE_JOBS",
        "quarantine_rate": "KELPIE_QUARANTINE_RATE",
        "quarantine_seconds": "KELPIE_QUARANTINE_SECONDS",
        "flaky_interruptions": "KELPIE_FLAKY_INTERRUPTIONS",
        "flaky_rate": "KELPIE_FLAKY_RATE",
        "placement_window": "KELPIE_PLACEMENT_WINDOW",
        "live_seconds": "KELPIE_LIVE_SECONDS",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ReputationPolicy:
        """
        The policy with the settings given in the environment.

        Raises:
            ConfigError: A setting is not a number, or out of range.
        """
        from kelpie_sdk.errors import ConfigError

        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            var = cls.ENV[field.name]
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            kind = int if field.type in (int, "int") else float
            what = "an integer" if kind is int else "a number"
            try:
                values[field.name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not {what}") from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"invalid reputation setting: {exc}") from None

    def params(self) -> dict[str, Any]:
        """
        The statements' parameters.
        """
        return {
            "q_failures": self.quarantine_failures,
            "q_jobs": self.quarantine_jobs,
            "q_rate": self.quarantine_rate,
            "q_ms": int(self.quarantine_seconds * 1000),
            "flaky_min": self.flaky_interruptions,
            "flaky_rate": self.flaky_rate,
            "window": self.placement_window,
        }


_JOB_COLUMNS = [c for c in JOBS.c if c.name != "seq"]
# What ``Store._canceled_events`` reads of each job, before the cancel.
_CANCELED_COLUMNS = (
    JOBS.c.id,
    JOBS.c.status,
    JOBS.c.attempt,
    JOBS.c.machine_id,
    JOBS.c.started,
    JOBS.c.progress,
    JOBS.c.webhook,
    JOBS.c.container_group_id,
    JOBS.c.user_id,
)

# SQLite's planner may pick the plain (user, group, seq) index for the pending
# branch, which also walks finished jobs; INDEXED BY pins the partial indexes so
# a claim costs the same however many jobs a queue has finished.
_CLAIM_SQL = sa.text(
    """
    UPDATE jobs SET
        status = 'running',
        machine_id = :machine_id,
        attempt = attempt + 1,
        num_interruptions = num_interruptions
            + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
        started = :now,
        heartbeat = :now,
        lease_expires = :now + heartbeat_interval * 2000
    WHERE seq = (
        SELECT seq FROM (
            SELECT seq, 0 AS pri FROM (
                SELECT seq FROM jobs INDEXED BY ix_jobs_running
                WHERE user_id = :user_id AND container_group_id = :group
                  AND status = 'running' AND lease_expires <= :now
                  AND NOT EXISTS (SELECT 1 FROM job_bans b
                                  WHERE b.job_id = jobs.id
                                    AND b.machine_id = :machine_id)
                ORDER BY lease_expires LIMIT 1
            )
            UNION ALL
            SELECT seq, 1 AS pri FROM (
                -- Placement: a flaky machine picks, among the first `window`
                -- pending jobs, the least-run one; any other takes the head.
                SELECT seq FROM (
                    SELECT seq, attempt FROM jobs INDEXED BY ix_jobs_pending
                    WHERE user_id = :user_id AND container_group_id = :group
                      AND status = 'pending'
                      AND NOT EXISTS (SELECT 1 FROM job_bans b
                                      WHERE b.job_id = jobs.id
                                        AND b.machine_id = :machine_id)
                    ORDER BY seq
                    LIMIT 1 + (:window - 1) * (
                        SELECT COUNT(*) FROM machines f
                        WHERE f.user_id = :user_id AND f.machine_id = :machine_id
                          AND f.interruptions >= :flaky_min
                          AND f.interruptions >= :flaky_rate * f.claims)
                ) ORDER BY attempt, seq LIMIT 1
            )
        ) ORDER BY pri LIMIT 1
    )
      AND NOT EXISTS (SELECT 1 FROM machines q
                      WHERE q.user_id = :user_id AND q.machine_id = :machine_id
                        AND q.quarantined_until > :now)
    RETURNING *
    """
)

# Run just before the claim, in its transaction: the holder of the expired
# lease that the claim is about to take over was interrupted.
_INTERRUPT_SQL = """
    UPDATE machines SET interruptions = interruptions + 1, run_started = NULL
    WHERE user_id = :user_id AND machine_id = (
        SELECT machine_id FROM jobs INDEXED BY ix_jobs_running
        WHERE user_id = :user_id AND container_group_id = :group
          AND status = 'running' AND lease_expires <= :now
          AND NOT EXISTS (SELECT 1 FROM job_bans b
                          WHERE b.job_id = jobs.id AND b.machine_id = :machine_id)
        ORDER BY lease_expires LIMIT 1
    )
      AND NOT EXISTS (SELECT 1 FROM machines q
                      WHERE q.user_id = :user_id AND q.machine_id = :machine_id
                        AND q.quarantined_until > :now)
"""
# After a claim that handed out a job: the claimer's record.
_SEEN_SQL = """
    INSERT INTO machines (user_id, machine_id, container_group_id, first_seen,
                          last_seen, run_started, claims)
    VALUES (:user_id, :machine_id, :group, :now, :now, :now, 1)
    ON CONFLICT (user_id, machine_id) DO UPDATE SET
        container_group_id = excluded.container_group_id,
        last_seen = excluded.last_seen,
        run_started = COALESCE(machines.run_started, excluded.run_started),
        claims = machines.claims + 1
"""
_QUARANTINED_SQL = """
    SELECT quarantined_until FROM machines
    WHERE user_id = :user_id AND machine_id = :machine_id
      AND quarantined_until > :now
"""


_HOLDER = (
    "id = :id AND user_id = :user_id AND status = 'running' "
    "AND machine_id = :machine_id AND (:attempt IS NULL OR attempt = :attempt)"
)
_STATE_SQL = (
    "SELECT status, machine_id, attempt FROM jobs WHERE id = :id AND user_id = :user_id"
)
_GET_SQL = "SELECT * FROM jobs WHERE id = :id AND user_id = :user_id"
_GET_ANY_SQL = "SELECT * FROM jobs WHERE id = :id"
_HEARTBEAT_SQL = f"""
    UPDATE jobs SET heartbeat = :now,
        lease_expires = :now + heartbeat_interval * 2000,
        num_heartbeats = num_heartbeats + 1,
        progress = COALESCE(:progress, progress),
        last_error = COALESCE(:error, last_error)
    WHERE {_HOLDER}
"""  # noqa: S608 - built from constants only
_COMPLETE_SQL = f"""
    UPDATE jobs SET status = 'completed', completed = :now, heartbeat = :now,
        lease_expires = NULL, progress = COALESCE(:progress, progress)
    WHERE {_HOLDER}
"""  # noqa: S608 - built from constants only
_FAIL_SQL = f"""
    UPDATE jobs SET
        num_failures = num_failures + 1,
        status = CASE WHEN num_failures + 1 >= max_failures
                      THEN 'failed' ELSE 'pending' END,
        failed = CASE WHEN num_failures + 1 >= max_failures
                      THEN :now ELSE failed END,
        heartbeat = :now, lease_expires = NULL, last_error = :error
    WHERE {_HOLDER}
    RETURNING status, container_group_id
"""  # noqa: S608 - built from constants only
_BAN_SQL = """
    INSERT INTO job_bans (job_id, machine_id, created)
    SELECT :id, :machine_id, :now
    WHERE NOT EXISTS (SELECT 1 FROM job_bans
                      WHERE job_id = :id AND machine_id = :machine_id)
"""
_DONE_SQL = """
    UPDATE machines SET completions = completions + 1, last_seen = :now,
        run_started = COALESCE(run_started, :now)
    WHERE user_id = :user_id AND machine_id = :machine_id
"""
# A failure; the quarantine rule is checked on the counts it produces.
_QUARANTINE_RULE = """
    failures + 1 >= :q_failures AND failed_jobs + :new_job >= :q_jobs
    AND failures + 1 >= :q_rate * claims
"""
_FAILED_SQL = f"""
    UPDATE machines SET failures = failures + 1,
        failed_jobs = failed_jobs + :new_job,
        last_seen = :now, run_started = COALESCE(run_started, :now),
        quarantines = quarantines
            + CASE WHEN {_QUARANTINE_RULE} THEN 1 ELSE 0 END,
        quarantined_until = CASE WHEN {_QUARANTINE_RULE}
                                 THEN :now + :q_ms ELSE quarantined_until END
    WHERE user_id = :user_id AND machine_id = :machine_id
"""  # noqa: S608 - built from constants only
_RELEASED_SQL = """
    UPDATE machines SET interruptions = interruptions + 1, last_seen = :now,
        run_started = NULL
    WHERE user_id = :user_id AND machine_id = :machine_id
"""
_RELEASE_SQL = f"""
    UPDATE jobs SET status = 'pending', lease_expires = NULL, heartbeat = :now,
        num_interruptions = num_interruptions + 1
    WHERE {_HOLDER}
    RETURNING status, container_group_id
"""  # noqa: S608 - built from constants only


_PROGRESS_SQL = f"""
    UPDATE jobs SET progress = :progress
    WHERE {_HOLDER}
"""  # noqa: S608 - built from constants only


# -- the event history: statements added to each transition's transaction ---------

_EVENT_SQL = """
    INSERT INTO job_events (job_id, time, kind, attempt, machine_id, details)
    VALUES (:job_id, :time, :kind, :attempt, :event_machine, :details)
"""
# The holder's attempt as it stands before the transition ends it.
_ATTEMPT_SQL = """
    SELECT attempt, machine_id, started, heartbeat, progress,
        num_failures, max_failures, webhook, container_group_id
    FROM jobs WHERE id = :id AND user_id = :user_id
"""
# A webhook delivery, written with the status change it announces (only for
# jobs that have a webhook URL).
_OUTBOX_SQL = """
    INSERT INTO webhook_deliveries (id, user_id, job_id, event, url, body,
        echo_key, created, state, attempts, next_attempt)
    VALUES (:id, :user_id, :job_id, :event, :url, :body, :echo_key, :now,
        'pending', 0, :now)
"""
_COMPUTE_SQL = """
    UPDATE jobs SET compute_ms = compute_ms + :compute, lost_ms = lost_ms + :lost
    WHERE id = :id
"""
# The running job whose lease the claim that follows takes over, if any: the
# claim's first branch, read in the claim's own transaction.
_TAKEOVER_SQL = """
    SELECT id, attempt, machine_id, started, heartbeat, progress, lease_expires
    FROM jobs INDEXED BY ix_jobs_running
    WHERE user_id = :user_id AND container_group_id = :group
      AND status = 'running' AND lease_expires <= :now
      AND NOT EXISTS (SELECT 1 FROM job_bans b
                      WHERE b.job_id = jobs.id AND b.machine_id = :machine_id)
    ORDER BY lease_expires LIMIT 1
"""


def _checkpoint_ms(progress: Any) -> int | None:
    """
    When the attempt last committed a checkpoint, from its progress record.
    """
    if isinstance(progress, str):
        try:
            progress = json.loads(progress)
        except ValueError:
            return None
    if not isinstance(progress, dict):
        return None
    value = progress.get("checkpoint_time")
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def attempt_compute(
    attempt: Mapping[str, Any] | RowMapping, end: int, *, useful: bool
) -> tuple[int, int]:
    """
    An attempt's compute (claim to ``end``) and the part of it lost, in ms.

    A useful attempt (completed) loses nothing. Otherwise the compute since its
    last committed checkpoint is lost; all of it if it committed none.
    """
    started = attempt.get("started")
    if started is None:
        return 0, 0
    compute = max(0, end - int(started))
    if useful:
        return compute, 0
    checkpoint = _checkpoint_ms(attempt.get("progress"))
    if checkpoint is None or checkpoint < started:
        return compute, compute
    return compute, min(compute, max(0, end - checkpoint))


#: How much of a failure's error (the end: the last lines of stderr) an event keeps.
_EVENT_ERROR_CHARS = 2000


def _clip(text: str | None, limit: int = 500) -> str | None:
    return None if text is None else text[:limit]


def _iso(ms: int | None) -> str | None:
    value = _ms_to_dt(ms)
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _compute_details(compute: int, lost: int) -> dict[str, Any]:
    return {"compute_seconds": compute / 1000, "lost_seconds": lost / 1000}


def _goodput(compute: int | None, lost: int | None) -> float | None:
    if not compute:
        return None
    return round((compute - (lost or 0)) / compute, 4)


def _tag_filter(dialect: str, tag: str) -> Any:
    """
    Jobs carrying ``tag``: its JSON form inside the stored JSON list. Tags
    cannot contain quotes, so the match is a whole tag; ``instr``/``strpos``
    compare case-sensitively on both backends (SQLite's ``LIKE`` would not).
    """
    needle = json.dumps(tag)
    find = sa.func.strpos if dialect == "postgresql" else sa.func.instr
    return find(JOBS.c.tags, needle) > 0


def _holder_view(
    state: Mapping[str, Any] | None, machine_id: str, attempt: int | None
) -> JobStatus | None:
    if state is None:
        return None
    if state["status"] != "running":
        return JobStatus(state["status"])
    holds = state["machine_id"] == machine_id and attempt in (None, state["attempt"])
    return JobStatus.RUNNING if holds else JobStatus.CANCELED


class _HotPath:
    """
    Per-thread DBAPI connections for the few statements on the hot path
    (SQLite; ``kelpie_sdk.server._pg.PgHotPath`` is its PostgreSQL twin).

    Each thread keeps one connection from the engine's pool for its lifetime.
    Write transactions start with ``BEGIN IMMEDIATE`` on SQLite. The statement
    texts are attributes, so that the store runs either backend alike.
    """

    CLAIM = _CLAIM_SQL.text
    STATE = _STATE_SQL
    GET = _GET_SQL
    GET_ANY = _GET_ANY_SQL
    HEARTBEAT = _HEARTBEAT_SQL
    COMPLETE = _COMPLETE_SQL
    FAIL = _FAIL_SQL
    BAN: str | None = _BAN_SQL
    RELEASE = _RELEASE_SQL
    PROGRESS = _PROGRESS_SQL
    EVENT = _EVENT_SQL
    ATTEMPT = _ATTEMPT_SQL
    OUTBOX = _OUTBOX_SQL
    COMPUTE = _COMPUTE_SQL
    TAKEOVER = _TAKEOVER_SQL
    QUARANTINED = _QUARANTINED_SQL
    # The machine-record statements that PostgreSQL folds into the ones above.
    INTERRUPT: str | None = _INTERRUPT_SQL
    SEEN: str | None = _SEEN_SQL
    DONE: str | None = _DONE_SQL
    FAILED: str | None = _FAILED_SQL
    RELEASED: str | None = _RELEASED_SQL

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._engine.raw_connection()
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(
        self, *, write: bool = True, durable: bool = True, atomic: bool = False
    ) -> Iterator[Any]:
        # SQLite commits the same way either way (WAL, NORMAL), and every
        # write transaction is atomic.
        del durable, atomic
        conn = self._connection()
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    @staticmethod
    def execute(cur: Any, sql: str, params: Mapping[str, Any]) -> int:
        cur.execute(sql, params)
        return int(cur.rowcount)

    @staticmethod
    def fetch_one(
        cur: Any, sql: str, params: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        cur.execute(sql, params)
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip((d[0] for d in cur.description), row, strict=True))

    def notify(self, user_id: str, group: str) -> None:
        """
        One process serves a SQLite file: the in-process listeners suffice.
        """

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class Store:
    """
    All persistent state of the API server.

    Thread-safe: each method runs in its own connection and transaction.

    Args:
        engine: From ``kelpie_sdk.server._db.make_engine`` (schema migrated).
        clock: Returns the current time in seconds since the epoch; tests pass
            a fake clock to move leases forward without sleeping.
        policy: Quarantine and placement settings (default: the defaults).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        policy: ReputationPolicy | None = None,
    ):
        self.engine = engine
        self._clock = clock
        self.policy = policy or ReputationPolicy()
        self._policy_params = self.policy.params()
        self._unreachable_until = 0.0
        self._unreachable_reason = ""
        self._listeners: list[Callable[[str, str], None]] = []
        self._takeover_listeners: list[Callable[[], None]] = []
        self._hot: _HotPath | PgHotPath
        self._listen: PgListener | None = None
        if engine.dialect.name == "postgresql":
            from kelpie_sdk.server._pg import PgHotPath, PgListener

            self._hot = PgHotPath(engine.url)
            self._listen = PgListener(engine.url, self._wake)
            self._listen.start()
            # Wake-ups cross replicas; the periodic re-check only has to
            # catch leases that expire.
            self.wake_recheck_seconds = 5.0
        else:
            self._hot = _HotPath(engine)
            self.wake_recheck_seconds = 1.0

    def on_available(self, listener: Callable[[str, str], None]) -> None:
        """
        Call ``listener(user_id, container_group_id)`` after a queue may have
        gained a claimable job: jobs inserted, a failure requeued, a release.

        The listener runs in the thread that made the change; on PostgreSQL
        also in a listener thread, when any replica made the change.
        """
        self._listeners.append(listener)

    def on_lease_expired(self, listener: Callable[[], None]) -> None:
        """
        Call ``listener()`` after a claim took over a running job whose lease
        ran out (an interruption without a report), once it committed.
        """
        self._takeover_listeners.append(listener)

    def _wake(self, user_id: str, group: str) -> None:
        for listener in self._listeners:
            listener(user_id, group)

    def _available(self, user_id: str, row: Mapping[str, Any]) -> None:
        if row["status"] == "pending":
            self._wake(user_id, row["container_group_id"])
            self._hot.notify(user_id, row["container_group_id"])

    def wait_listening(self, timeout: float) -> bool:
        """
        Wait until cross-replica wake-ups are being received (always true on
        SQLite, where there are none to receive).
        """
        return self._listen is None or self._listen.ready.wait(timeout)

    def check_ready(self) -> str | None:
        """
        Why the store cannot serve now (database unreachable, schema not
        current), or ``None`` when it can.
        """
        try:
            with self.engine.connect() as conn:
                current = current_revision(conn)
        except sa.exc.DBAPIError as exc:
            return f"database unreachable: {type(exc.orig).__name__}"
        head = head_revision()
        if current != head:
            return f"database schema is at revision {current}, expected {head}"
        return None

    def close(self) -> None:
        """
        Close every connection (call once no other thread uses the store).
        """
        if self._listen is not None:
            self._listen.stop()
        self._hot.close()
        self.engine.dispose()

    def now_ms(self) -> int:
        """
        The store's clock, in integer milliseconds.
        """
        return int(self._clock() * 1000)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with (
            self.engine.connect().execution_options(readonly=True) as conn,
            conn.begin(),
        ):
            yield conn

    # -- users and keys ----------------------------------------------------

    @_resilient
    def ensure_admin(self, admin_key: str | None) -> str | None:
        """
        Seed the admin user, and its key.

        A key given here replaces the admin key given (or generated) at an
        earlier start; admin keys made with ``POST /keys`` stay.

        Args:
            admin_key: A key to accept for the admin (``KELPIE_ADMIN_KEY``),
                at least 32 characters. If ``None`` and the admin has no
                seeded key yet, one is generated.

        Returns:
            The generated key (to be shown once), or ``None``.

        Raises:
            ConfigError: The key is shorter than 32 characters.
        """
        check_admin_key(admin_key)
        try:
            return self._seed_admin(admin_key)
        except sa.exc.IntegrityError:
            # Another replica seeded the same rows after our check (replicas
            # starting together on a new database): check again.
            return self._seed_admin(admin_key)

    def _seed_admin(self, admin_key: str | None) -> str | None:
        now = self.now_ms()
        seeded = sa.and_(API_KEYS.c.user_id == ADMIN_ID, API_KEYS.c.seeded)
        with self._write() as conn:
            if not conn.execute(
                sa.select(USERS.c.id).where(USERS.c.id == ADMIN_ID)
            ).first():
                conn.execute(
                    USERS.insert().values(id=ADMIN_ID, username="admin", created=now)
                )
            generated = None
            if admin_key is None:
                has_key = conn.execute(
                    sa.select(API_KEYS.c.key_hash).where(
                        seeded, API_KEYS.c.revoked.is_(None)
                    )
                ).first()
                if has_key:
                    return None
                admin_key = generated = new_key("admin")
            digest = hash_key(admin_key)
            # The previous seeded key stops working: changing
            # KELPIE_ADMIN_KEY is how a leaked admin key is replaced.
            conn.execute(API_KEYS.delete().where(seeded, API_KEYS.c.key_hash != digest))
            if not conn.execute(
                sa.select(API_KEYS.c.key_hash).where(API_KEYS.c.key_hash == digest)
            ).first():
                conn.execute(
                    API_KEYS.insert().values(
                        key_hash=digest,
                        key_id=key_id_of(digest),
                        user_id=ADMIN_ID,
                        role="admin",
                        seeded=True,
                        created=now,
                    )
                )
            else:
                conn.execute(
                    API_KEYS.update()
                    .where(API_KEYS.c.key_hash == digest)
                    .values(
                        key_id=key_id_of(digest),
                        user_id=ADMIN_ID,
                        role="admin",
                        seeded=True,
                        revoked=None,
                        expires=None,
                        container_groups=None,
                    )
                )
            return generated

    @_resilient
    def principal_for_key(self, key: str) -> Principal | None:
        """
        Look up the user and role behind an API key; ``None`` for an unknown,
        revoked or expired key.
        """
        query = (
            sa.select(
                API_KEYS.c.user_id,
                API_KEYS.c.org_name,
                API_KEYS.c.project_name,
                API_KEYS.c.key_id,
                API_KEYS.c.role,
                API_KEYS.c.container_groups,
                API_KEYS.c.last_used,
            )
            .join(USERS, USERS.c.id == API_KEYS.c.user_id)
            .where(
                API_KEYS.c.key_hash == hash_key(key),
                API_KEYS.c.revoked.is_(None),
                sa.or_(
                    API_KEYS.c.expires.is_(None),
                    API_KEYS.c.expires > self.now_ms(),
                ),
            )
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return Principal(
            row.user_id,
            row.org_name,
            row.project_name,
            role=row.role,
            key_id=row.key_id or "",
            container_groups=(
                None
                if row.container_groups is None
                else tuple(json.loads(row.container_groups))
            ),
            last_used=row.last_used,
        )

    @_resilient
    def mark_key_used(self, key_id: str) -> None:
        """
        Record that a key was used now (callers do so at most once a minute).
        """
        with self._write() as conn:
            conn.execute(
                API_KEYS.update()
                .where(API_KEYS.c.key_id == key_id)
                .values(last_used=self.now_ms())
            )

    @_resilient
    def create_api_key(
        self,
        user_id: str,
        *,
        role: str = "user",
        org_name: str = "",
        project_name: str = "",
        container_groups: Sequence[str] | None = None,
        expires_in: float | None = None,
    ) -> ApiKey | None:
        """
        Issue a new API key; ``None`` if there is no such user.

        The answer's ``key`` is the secret: only its hash is stored.
        """
        if role == "admin" and user_id != ADMIN_ID:
            raise ValueError("admin keys belong to the admin user")
        key = new_key(role)
        digest = hash_key(key)
        now = self.now_ms()
        expires = None if expires_in is None else now + int(expires_in * 1000)
        groups = None if container_groups is None else list(container_groups)
        with self._write() as conn:
            if not conn.execute(
                sa.select(USERS.c.id).where(USERS.c.id == user_id)
            ).first():
                return None
            conn.execute(
                API_KEYS.insert().values(
                    key_hash=digest,
                    key_id=key_id_of(digest),
                    user_id=user_id,
                    org_name=org_name,
                    project_name=project_name,
                    role=role,
                    container_groups=None if groups is None else json.dumps(groups),
                    expires=expires,
                    created=now,
                )
            )
        return ApiKey(
            id=key_id_of(digest),
            user_id=user_id,
            role=role,
            container_groups=None if groups is None else tuple(groups),
            created=_ms_to_dt(now),  # type: ignore[arg-type]
            expires=_ms_to_dt(expires),
            last_used=None,
            key=key,
        )

    def create_key(self, user_id: str, org_name: str, project_name: str) -> str | None:
        """
        Issue a new ``user`` key for a user; ``None`` if there is no such user.
        """
        made = self.create_api_key(
            user_id, org_name=org_name, project_name=project_name
        )
        return None if made is None else made.key

    @_resilient
    def list_api_keys(self, user_id: str | None) -> list[ApiKey]:
        """
        The live (not revoked, not expired) keys of a user, or of every user
        (``None``), oldest first; without their secrets.
        """
        query = (
            sa.select(API_KEYS)
            .where(
                API_KEYS.c.revoked.is_(None),
                sa.or_(
                    API_KEYS.c.expires.is_(None),
                    API_KEYS.c.expires > self.now_ms(),
                ),
            )
            .order_by(API_KEYS.c.created, API_KEYS.c.key_id)
        )
        if user_id is not None:
            query = query.where(API_KEYS.c.user_id == user_id)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            ApiKey(
                id=row.key_id,
                user_id=row.user_id,
                role=row.role,
                container_groups=(
                    None
                    if row.container_groups is None
                    else tuple(json.loads(row.container_groups))
                ),
                created=_ms_to_dt(row.created),  # type: ignore[arg-type]
                expires=_ms_to_dt(row.expires),
                last_used=_ms_to_dt(row.last_used),
            )
            for row in rows
        ]

    @_resilient
    def revoke_api_key(self, principal: Principal, key_id: str) -> bool:
        """
        Revoke a key at once; ``False`` if the caller has no such live key.

        The admin may revoke any key; anyone else only the non-admin keys of
        its own user.
        """
        where = [API_KEYS.c.key_id == key_id, API_KEYS.c.revoked.is_(None)]
        if not principal.is_admin:
            where += [
                API_KEYS.c.user_id == principal.user_id,
                API_KEYS.c.role != "admin",
            ]
        with self._write() as conn:
            done = conn.execute(
                API_KEYS.update().where(*where).values(revoked=self.now_ms())
            )
        return bool(done.rowcount)

    @_resilient
    def create_user(self, username: str) -> User | None:
        """
        Create a user; ``None`` if the username is taken.
        """
        now = self.now_ms()
        with self._write() as conn:
            taken = conn.execute(
                sa.select(USERS.c.id).where(USERS.c.username == username)
            ).first()
            if taken:
                return None
            user_id = str(uuid.uuid4())
            conn.execute(
                USERS.insert().values(id=user_id, username=username, created=now)
            )
        return User(id=user_id, username=username, created=_ms_to_dt(now))  # type: ignore[arg-type]

    @_resilient
    def ensure_user(self, user_id: str, username: str) -> None:
        """
        Create a user with this id unless it exists (SaladCloud tenants are
        created on first sight).
        """
        try:
            with self._write() as conn:
                if conn.execute(
                    sa.select(USERS.c.id).where(USERS.c.id == user_id)
                ).first():
                    return
                conn.execute(
                    USERS.insert().values(
                        id=user_id, username=username, created=self.now_ms()
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another request or replica created it after our check

    @_resilient
    def get_user(self, user_id: str) -> User | None:
        """
        A user by id.
        """
        with self._read() as conn:
            row = conn.execute(sa.select(USERS).where(USERS.c.id == user_id)).first()
        if row is None:
            return None
        return User(id=row.id, username=row.username, created=_ms_to_dt(row.created))  # type: ignore[arg-type]

    @_resilient
    def job_group(self, user_id: str, job_id: str) -> str | None:
        """
        The container group of one of the user's jobs, if it exists.
        """
        with self._read() as conn:
            group: str | None = conn.execute(
                sa.select(JOBS.c.container_group_id).where(
                    JOBS.c.id == job_id, JOBS.c.user_id == user_id
                )
            ).scalar()
        return group

    @_resilient
    def delete_users(self) -> None:
        """
        Delete every user but the admin, and their keys.
        """
        with self._write() as conn:
            conn.execute(API_KEYS.delete().where(API_KEYS.c.user_id != ADMIN_ID))
            conn.execute(USERS.delete().where(USERS.c.id != ADMIN_ID))

    # -- jobs: submission and reading ----------------------------------------

    @_resilient
    def insert_jobs(self, user_id: str, subs: Sequence[JobSubmission]) -> list[Job]:
        """
        Insert jobs in one transaction, in order; all or nothing.

        The submissions must already be validated and normalised.
        """
        rows, events = self._new_jobs(user_id, subs, self.now_ms())
        with self._write() as conn:
            conn.execute(JOBS.insert(), rows)
            conn.execute(JOB_EVENTS.insert(), events)
        self._announce(user_id, rows)
        return [self._row_to_job(row) for row in rows]

    @_resilient
    def insert_jobs_once(
        self,
        user_id: str,
        subs: Sequence[JobSubmission],
        *,
        key: str,
        fingerprint: str,
        status: int,
        render: Callable[[list[Job]], str],
    ) -> SubmitAnswer:
        """
        Insert jobs as ``insert_jobs`` does, unless the tenant already used
        ``key``: then insert nothing and return the first answer.

        The key's row is inserted in the jobs' transaction, under the primary
        key ``(user_id, key)``: a repeat running at the same time (on any
        replica) waits for the first to commit and then finds its row, or, if
        the first rolled back, inserts its own. A failed submission leaves no
        key behind. Keys expire after ``IDEMPOTENCY_KEY_SECONDS``; each keyed
        submission deletes up to 100 expired ones.

        Args:
            user_id: The tenant.
            subs: Validated, normalised submissions.
            key: The request's ``Idempotency-Key``.
            fingerprint: A digest of what was asked (endpoint and body); a
                repeat must match it.
            status: The HTTP status of the answer.
            render: Makes the answer's JSON body from the queued jobs.

        Raises:
            IdempotencyConflict: The key was used for another request.
        """
        now = self.now_ms()
        rows, events = self._new_jobs(user_id, subs, now)
        body = render([self._row_to_job(row) for row in rows])
        keys = IDEMPOTENCY_KEYS.c
        mine = sa.and_(keys.user_id == user_id, keys.key == key)
        insert: Any = (
            pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        )
        claim_key = (
            insert(IDEMPOTENCY_KEYS)
            .values(
                user_id=user_id,
                key=key,
                fingerprint=fingerprint,
                status=status,
                response=body,
                created=now,
                expires=now + IDEMPOTENCY_KEY_SECONDS * 1000,
            )
            .on_conflict_do_nothing()
            # A row back means this statement inserted the key (rowcount
            # after ON CONFLICT is not reliable across drivers).
            .returning(keys.key)
        )
        with self._write() as conn:
            self._sweep_keys(conn, now)
            conn.execute(IDEMPOTENCY_KEYS.delete().where(mine, keys.expires <= now))
            if conn.execute(claim_key).first() is not None:
                conn.execute(JOBS.insert(), rows)
                conn.execute(JOB_EVENTS.insert(), events)
                first = None
            else:
                # Committed by an earlier request (on PostgreSQL the insert
                # waited for it), so this statement's snapshot sees it.
                first = conn.execute(
                    sa.select(keys.fingerprint, keys.status, keys.response).where(mine)
                ).first()
                if first is None:  # pragma: no cover - deleted in between
                    raise DatabaseUnavailable(
                        "an idempotency key vanished while it was read; retry"
                    )
        if first is None:
            self._announce(user_id, rows)
            return SubmitAnswer(status, body, replayed=False)
        if first.fingerprint != fingerprint:
            raise IdempotencyConflict(key)
        return SubmitAnswer(first.status, first.response, replayed=True)

    @staticmethod
    def _sweep_keys(conn: Connection, now: int) -> None:
        keys = IDEMPOTENCY_KEYS.c
        expired = (
            sa.select(keys.user_id, keys.key)
            .where(keys.expires <= now)
            .order_by(keys.expires)
            .limit(_KEY_SWEEP_LIMIT)
            # PostgreSQL: sweeps running at once take different rows.
            .with_for_update(skip_locked=True)
        )
        conn.execute(
            IDEMPOTENCY_KEYS.delete().where(
                sa.tuple_(keys.user_id, keys.key).in_(expired)
            )
        )

    def _new_jobs(
        self, user_id: str, subs: Sequence[JobSubmission], now: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = [self._submission_row(user_id, sub, now) for sub in subs]
        events = [
            {
                "job_id": row["id"],
                "time": now,
                "kind": "submitted",
                "attempt": None,
                "machine_id": None,
                "details": "{}" if len(rows) == 1 else json.dumps({"batch": len(rows)}),
            }
            for row in rows
        ]
        return rows, events

    def _announce(self, user_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        for group in dict.fromkeys(row["container_group_id"] for row in rows):
            self._available(user_id, {"status": "pending", "container_group_id": group})

    @staticmethod
    def _submission_row(user_id: str, sub: JobSubmission, now: int) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "user_id": user_id,
            "status": JobStatus.PENDING.value,
            "created": now,
            "started": None,
            "completed": None,
            "canceled": None,
            "failed": None,
            "heartbeat": None,
            "num_failures": 0,
            "machine_id": None,
            "command": sub.command,
            "arguments": json.dumps(list(sub.arguments)),
            "environment": json.dumps(sub.environment),
            "max_failures": sub.max_failures,
            "heartbeat_interval": sub.heartbeat_interval,
            "container_group_id": sub.container_group_id,
            "webhook": sub.webhook,
            "compression": sub.compression,
            "num_heartbeats": 0,
            "sync": None if sub.sync is None else json.dumps(sub.sync.to_json()),
            "attempt": 0,
            "num_interruptions": 0,
            "lease_expires": None,
            "progress": None,
            "last_error": None,
            "name": sub.name,
            "tags": json.dumps(list(sub.tags)) if sub.tags else None,
            "compute_ms": 0,
            "lost_ms": 0,
        }
        for key in LEGACY_STORAGE_FIELDS:
            row[key] = getattr(sub, key)
        return row

    @staticmethod
    def _row_to_job(row: Mapping[str, Any] | RowMapping) -> Job:
        sync = row["sync"]
        progress = row["progress"]
        return Job(
            id=row["id"],
            user_id=row["user_id"],
            status=JobStatus(row["status"]),
            created=_ms_to_dt(row["created"]),  # type: ignore[arg-type]
            started=_ms_to_dt(row["started"]),
            completed=_ms_to_dt(row["completed"]),
            canceled=_ms_to_dt(row["canceled"]),
            failed=_ms_to_dt(row["failed"]),
            heartbeat=_ms_to_dt(row["heartbeat"]),
            num_failures=row["num_failures"],
            machine_id=row["machine_id"],
            command=row["command"],
            arguments=json.loads(row["arguments"]),
            environment=json.loads(row["environment"]),
            **{k: row[k] for k in LEGACY_STORAGE_FIELDS},
            max_failures=row["max_failures"],
            heartbeat_interval=row["heartbeat_interval"],
            container_group_id=row["container_group_id"],
            webhook=row["webhook"],
            compression=bool(row["compression"]),
            num_heartbeats=row["num_heartbeats"],
            sync=None if sync is None else SyncSpec.from_json(json.loads(sync)),
            attempt=row["attempt"],
            num_interruptions=row["num_interruptions"],
            lease_expires=_ms_to_dt(row["lease_expires"]),
            progress=None if progress is None else json.loads(progress),
            last_error=row["last_error"],
            name=row["name"],
            tags=json.loads(row["tags"]) if row["tags"] else (),
            goodput=_goodput(row["compute_ms"], row["lost_ms"]),
        )

    @_resilient
    def get_job(self, principal: Principal, job_id: str) -> Job | None:
        """
        A job, if it exists and the caller may see it (admins see all).
        """
        sql = self._hot.GET_ANY if principal.is_admin else self._hot.GET
        with self._hot.transaction(write=False) as cur:
            row = self._hot.fetch_one(
                cur, sql, {"id": job_id, "user_id": principal.user_id}
            )
        return None if row is None else self._row_to_job(row)

    @_resilient
    def list_jobs(
        self,
        principal: Principal,
        *,
        status: JobStatus | None,
        container_group_id: str | None,
        page: int,
        page_size: int,
        asc: bool,
        id_prefix: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> list[Job]:
        """
        One page of the caller's jobs (all jobs for the admin), oldest or newest first.

        ``id_prefix`` keeps the jobs whose id starts with it (case-sensitive;
        no wildcards), compared with ``substr`` so that SQLite's
        case-insensitive ``LIKE`` cannot match ``ABC`` to ``abc``. ``name``
        keeps the jobs with exactly that name, ``tags`` those carrying every
        tag given.
        """
        query = sa.select(*_JOB_COLUMNS)
        if not principal.is_admin:
            query = query.where(JOBS.c.user_id == principal.user_id)
        if status is not None:
            query = query.where(JOBS.c.status == status.value)
        if container_group_id is not None:
            query = query.where(JOBS.c.container_group_id == container_group_id)
        if id_prefix:
            query = query.where(
                sa.func.substr(JOBS.c.id, 1, len(id_prefix)) == id_prefix
            )
        if name is not None:
            query = query.where(JOBS.c.name == name)
        for tag in tags:
            query = query.where(_tag_filter(self.engine.dialect.name, tag))
        order = JOBS.c.seq.asc() if asc else JOBS.c.seq.desc()
        query = query.order_by(order).limit(page_size).offset((page - 1) * page_size)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [self._row_to_job(r) for r in rows]

    @_resilient
    def group_counts(self, principal: Principal) -> dict[str, dict[str, int]]:
        """
        How many of the caller's jobs (all jobs for the admin) each container
        group holds in each status: ``{group: {status: count}}``, in one
        grouped query.
        """
        count = sa.func.count().label("n")
        query = sa.select(JOBS.c.container_group_id, JOBS.c.status, count)
        if not principal.is_admin:
            query = query.where(JOBS.c.user_id == principal.user_id)
        query = query.group_by(JOBS.c.container_group_id, JOBS.c.status)
        with self._read() as conn:
            rows = conn.execute(query).all()
        counts: dict[str, dict[str, int]] = {}
        for group, status, n in rows:
            counts.setdefault(str(group), {})[str(status)] = int(n)
        return counts

    # -- jobs: user actions ---------------------------------------------------

    @_resilient
    def cancel(
        self, principal: Principal, job_id: str, *, echo_key: str | None = None
    ) -> Literal["canceled", "not_found"] | JobStatus:
        """
        Cancel a pending or running job.

        Returns:
            ``"canceled"`` if it was canceled now or before, ``"not_found"``,
            or the final status (completed/failed) that it keeps.
        """
        now = self.now_ms()
        owner = JOBS.c.id == job_id
        if not principal.is_admin:
            owner = owner & (JOBS.c.user_id == principal.user_id)
        with self._write() as conn:
            before = (
                conn.execute(
                    sa.select(*_CANCELED_COLUMNS).where(owner).with_for_update()
                )
                .mappings()
                .first()
            )
            done = conn.execute(
                JOBS.update()
                .where(owner, JOBS.c.status.in_(["pending", "running"]))
                .values(
                    status="canceled",
                    canceled=now,
                    heartbeat=now,
                    machine_id="user",
                    lease_expires=None,
                )
            ).rowcount
            if done and before is not None:
                self._canceled_events(
                    conn, principal, [before], now, via=None, echo_key=echo_key
                )
                return "canceled"
            status = conn.execute(sa.select(JOBS.c.status).where(owner)).scalar()
        if status is None:
            return "not_found"
        if status == "canceled":
            return "canceled"
        return JobStatus(status)

    @_resilient
    def purge_group(
        self, principal: Principal, group: str, *, echo_key: str | None = None
    ) -> int:
        """
        Delete the caller's pending jobs in a group and cancel its running ones.
        """
        now = self.now_ms()
        mine = (JOBS.c.user_id == principal.user_id) & (
            JOBS.c.container_group_id == group
        )
        with self._write() as conn:
            deleted_ids = sa.select(JOBS.c.id).where(mine, JOBS.c.status == "pending")
            conn.execute(JOB_BANS.delete().where(JOB_BANS.c.job_id.in_(deleted_ids)))
            delete_logs_of(conn, deleted_ids)
            conn.execute(
                JOB_EVENTS.delete().where(JOB_EVENTS.c.job_id.in_(deleted_ids))
            )
            running = (
                conn.execute(
                    sa.select(*_CANCELED_COLUMNS)
                    .where(mine, JOBS.c.status == "running")
                    .with_for_update()
                )
                .mappings()
                .all()
            )
            deleted = conn.execute(
                JOBS.delete().where(mine, JOBS.c.status == "pending")
            ).rowcount
            canceled = conn.execute(
                JOBS.update()
                .where(mine, JOBS.c.status == "running")
                .values(status="canceled", canceled=now, lease_expires=None)
            ).rowcount
            self._canceled_events(
                conn, principal, running, now, via="purge", echo_key=echo_key
            )
        return int(deleted) + int(canceled)

    def _canceled_events(
        self,
        conn: Connection,
        principal: Principal,
        jobs: Sequence[Mapping[str, Any] | RowMapping],
        now: int,
        *,
        via: str | None,
        echo_key: str | None = None,
    ) -> None:
        """
        Record the cancellation of each job, in the transaction that made it.

        A running attempt's compute is counted but not as lost: the user ended
        it, the infrastructure did not.
        """
        by = "admin" if principal.is_admin else principal.user_id
        for job in jobs:
            details: dict[str, Any] = {"by": by}
            if via is not None:
                details["via"] = via
            attempt = machine = None
            if job["status"] == "running":
                attempt, machine = job["attempt"], job["machine_id"]
                compute, _ = attempt_compute(job, now, useful=True)
                details.update(_compute_details(compute, 0))
                conn.execute(
                    JOBS.update()
                    .where(JOBS.c.id == job["id"])
                    .values(compute_ms=JOBS.c.compute_ms + compute)
                )
            if job["webhook"]:
                row = delivery_row(
                    user_id=job["user_id"],
                    job_id=job["id"],
                    url=job["webhook"],
                    event="canceled",
                    machine_id=machine,
                    group=job["container_group_id"],
                    now=now,
                    echo_key=echo_key,
                )
                now_ = row.pop("now")
                conn.execute(
                    WEBHOOK_DELIVERIES.insert().values(
                        **row, created=now_, next_attempt=now_
                    )
                )
            conn.execute(
                JOB_EVENTS.insert().values(
                    job_id=job["id"],
                    time=now,
                    kind="canceled",
                    attempt=attempt,
                    machine_id=machine,
                    details=json.dumps(details),
                )
            )

    @_resilient
    def events(self, principal: Principal, job_id: str) -> list[JobEvent] | None:
        """
        A job's history, oldest first; ``None`` if the caller may not see the
        job (admins see all).
        """
        owner = JOBS.c.id == job_id
        if not principal.is_admin:
            owner = owner & (JOBS.c.user_id == principal.user_id)
        with self._read() as conn:
            if conn.execute(sa.select(JOBS.c.id).where(owner)).first() is None:
                return None
            rows = conn.execute(
                sa.select(JOB_EVENTS)
                .where(JOB_EVENTS.c.job_id == job_id)
                .order_by(JOB_EVENTS.c.seq)
            ).all()
        return [
            JobEvent(
                seq=r.seq,
                job_id=r.job_id,
                time=_ms_to_dt(r.time),  # type: ignore[arg-type]
                kind=r.kind,
                attempt=r.attempt,
                machine_id=r.machine_id,
                details=json.loads(r.details),
            )
            for r in rows
        ]

    @_resilient
    def delete_all_jobs(self) -> None:
        """
        Delete every job (admin), and the submissions' idempotency keys.
        """
        with self._write() as conn:
            conn.execute(JOB_BANS.delete())
            delete_all_logs(conn)
            conn.execute(JOB_EVENTS.delete())
            conn.execute(JOBS.delete())
            conn.execute(IDEMPOTENCY_KEYS.delete())

    # -- jobs: the worker protocol --------------------------------------------
    #
    # These run once or more per second per running job, so they skip
    # SQLAlchemy's execution machinery and run fixed SQL on a per-thread DBAPI
    # connection: measured 5x less time per transaction (docs/server.md).

    @_resilient
    def claim(
        self,
        principal: Principal,
        *,
        machine_id: str,
        group: str,
        echo_key: str | None = None,
    ) -> Job | None:
        """
        Atomically hand the next job of a queue to one machine.

        Running jobs whose lease expired come first (oldest lease first), then
        pending jobs in submission order; jobs that banned this machine are
        skipped. The claim bumps ``attempt`` and starts a new lease.

        A quarantined machine gets nothing. A flaky one (many interruptions)
        takes the least-run job among the first pending ones. The machines'
        records (the claimer's claims, the interrupted holder's
        interruptions) change in the same transaction.
        """
        now = self.now_ms()
        params: dict[str, Any] = {
            "machine_id": machine_id,
            "group": group,
            "user_id": principal.user_id,
            "now": now,
            **self._policy_params,
        }
        hot = self._hot
        with hot.transaction(atomic=True) as cur:
            previous = hot.fetch_one(cur, hot.TAKEOVER, params)
            if hot.INTERRUPT is not None and previous is not None:
                # Its subquery is TAKEOVER's: with no expired lease it changes nothing.
                hot.execute(cur, hot.INTERRUPT, params)
            row = hot.fetch_one(cur, hot.CLAIM, params)
            if row is None:
                return None
            if hot.SEEN is not None:
                hot.execute(cur, hot.SEEN, params)
            took_over = previous is not None and previous["id"] == row["id"]
            if previous is not None and took_over:
                # The previous holder's lease ran out: its attempt ends at its
                # last heartbeat, the last time it was known to be alive. The
                # lease-expiry listeners hear of it once this commits.
                end = previous["heartbeat"] or now
                compute, lost = attempt_compute(previous, end, useful=False)
                details = {
                    "last_heartbeat": _iso(previous["heartbeat"]),
                    "lease_expired": _iso(previous["lease_expires"]),
                    **_compute_details(compute, lost),
                }
                self._event(
                    cur,
                    row["id"],
                    "lease_expired",
                    previous["attempt"],
                    previous["machine_id"],
                    details,
                    now,
                )
                self._add_compute(cur, row["id"], compute, lost)
            self._event(cur, row["id"], "claimed", row["attempt"], machine_id, {}, now)
            if row["webhook"]:
                self._webhook(
                    cur, row, row["id"], principal, "running", machine_id, now, echo_key
                )
        if took_over:
            for listener in self._takeover_listeners:
                listener()
        return self._row_to_job(row)

    def _event(
        self,
        cur: Any,
        job_id: str,
        kind: str,
        attempt: int | None,
        machine_id: str | None,
        details: Mapping[str, Any],
        now: int,
    ) -> None:
        self._hot.execute(
            cur,
            self._hot.EVENT,
            {
                "job_id": job_id,
                "time": now,
                "kind": kind,
                "attempt": attempt,
                "event_machine": machine_id,
                "details": json.dumps(details),
            },
        )

    def _webhook(
        self,
        cur: Any,
        job: Mapping[str, Any],
        job_id: str,
        principal: Principal,
        event: str,
        machine_id: str | None,
        now: int,
        echo_key: str | None,
    ) -> None:
        """
        Queue the webhook of a status change in its transaction (the caller
        checked that the job has a webhook URL).
        """
        self._hot.execute(
            cur,
            self._hot.OUTBOX,
            delivery_row(
                user_id=principal.user_id,
                job_id=job_id,
                url=job["webhook"],
                event=event,
                machine_id=machine_id,
                group=job["container_group_id"],
                now=now,
                echo_key=echo_key,
            ),
        )

    def _add_compute(self, cur: Any, job_id: str, compute: int, lost: int) -> None:
        self._hot.execute(
            cur, self._hot.COMPUTE, {"id": job_id, "compute": compute, "lost": lost}
        )

    def _ending(
        self, cur: Any, params: Mapping[str, Any], report: WorkerReport
    ) -> dict[str, Any] | None:
        """
        The holder's attempt before the transition that ends it (the report's
        progress record, when it carries one, is the newest).
        """
        attempt = self._hot.fetch_one(cur, self._hot.ATTEMPT, params)
        if attempt is not None and report.progress is not None:
            attempt["progress"] = report.progress
        return attempt

    @_resilient
    def quarantined_until(
        self, principal: Principal, machine_id: str
    ) -> dt.datetime | None:
        """
        Until when the machine gets no work, or ``None`` if it is not
        quarantined.
        """
        params = {
            "machine_id": machine_id,
            "user_id": principal.user_id,
            "now": self.now_ms(),
        }
        with self._hot.transaction(write=False) as cur:
            row = self._hot.fetch_one(cur, self._hot.QUARANTINED, params)
        return None if row is None else _ms_to_dt(row["quarantined_until"])

    @staticmethod
    def _fence(
        principal: Principal, job_id: str, report: WorkerReport
    ) -> dict[str, Any]:
        return {
            "id": job_id,
            "user_id": principal.user_id,
            "machine_id": report.machine_id,
            "attempt": report.attempt,
        }

    def _state(
        self, cur: Any, principal: Principal, job_id: str
    ) -> dict[str, Any] | None:
        return self._hot.fetch_one(
            cur, self._hot.STATE, {"id": job_id, "user_id": principal.user_id}
        )

    @_resilient
    def heartbeat(
        self, principal: Principal, job_id: str, report: WorkerReport
    ) -> JobStatus | None:
        """
        Record a heartbeat from the holder and extend its lease.

        Returns:
            ``None`` for an unknown job; ``RUNNING`` when recorded;
            ``CANCELED`` when the caller no longer holds the job (canceled,
            or claimed by another machine or attempt); otherwise the job's
            final status.
        """
        params = self._fence(principal, job_id, report)
        params["now"] = self.now_ms()
        params["progress"] = (
            None if report.progress is None else json.dumps(report.progress)
        )
        # A worker's warning about the running job (e.g. checkpoints that will
        # not survive the node) is shown as its last_error.
        params["error"] = report.error
        with self._hot.transaction(durable=False) as cur:
            if self._hot.execute(cur, self._hot.HEARTBEAT, params):
                return JobStatus.RUNNING
            state = self._state(cur, principal, job_id)
        if state is None:
            return None
        if state["status"] == "running":
            return JobStatus.CANCELED
        return JobStatus(state["status"])

    @_resilient
    def complete(
        self,
        principal: Principal,
        job_id: str,
        report: WorkerReport,
        *,
        echo_key: str | None = None,
    ) -> ReportOutcome:
        """
        Mark the holder's job completed. Repeating the same report is harmless.
        """
        params = self._fence(principal, job_id, report)
        params["now"] = self.now_ms()
        params["progress"] = (
            None if report.progress is None else json.dumps(report.progress)
        )
        with self._hot.transaction(atomic=True) as cur:
            before = self._ending(cur, params, report)
            if before is not None and self._hot.execute(
                cur, self._hot.COMPLETE, params
            ):
                if self._hot.DONE is not None:
                    self._hot.execute(cur, self._hot.DONE, params)
                compute, _ = attempt_compute(before, params["now"], useful=True)
                self._event(
                    cur,
                    job_id,
                    "completed",
                    before["attempt"],
                    report.machine_id,
                    _compute_details(compute, 0),
                    params["now"],
                )
                self._add_compute(cur, job_id, compute, 0)
                if before["webhook"]:
                    self._webhook(
                        cur,
                        before,
                        job_id,
                        principal,
                        "completed",
                        report.machine_id,
                        params["now"],
                        echo_key,
                    )
                return "ok"
            state = self._state(cur, principal, job_id)
        if state is None:
            return "not_found"
        if (
            state["status"] == "completed"
            and state["machine_id"] == report.machine_id
            and report.attempt in (None, state["attempt"])
        ):
            return "ok"
        return "not_holder"

    @_resilient
    def fail(
        self,
        principal: Principal,
        job_id: str,
        report: WorkerReport,
        *,
        echo_key: str | None = None,
    ) -> ReportOutcome:
        """
        Record a failure from the holder.

        The machine is banned from the job. Below ``max_failures`` the job goes
        straight back to ``pending``; at the threshold it becomes ``failed``.
        The machine's failure counts change with it, and it is quarantined when
        they reach the policy's threshold.
        """
        error = report.error
        if error is None and report.exit_code is not None:
            error = f"exited with code {report.exit_code}"
        params = self._fence(principal, job_id, report)
        params["now"] = self.now_ms()
        params["error"] = error
        now = params["now"]
        params.update(self._policy_params)
        with self._hot.transaction(atomic=True) as cur:
            before = self._ending(cur, params, report)
            row = (
                None
                if before is None
                else self._hot.fetch_one(cur, self._hot.FAIL, params)
            )
            if before is None or row is None:
                found = self._state(cur, principal, job_id) is not None
                return "not_holder" if found else "not_found"
            if self._hot.BAN is not None:
                params["new_job"] = self._hot.execute(cur, self._hot.BAN, params)
            if self._hot.FAILED is not None:
                self._hot.execute(cur, self._hot.FAILED, params)
            attempt = before["attempt"]
            compute, lost = attempt_compute(before, now, useful=False)
            final = row["status"] != "pending"
            details: dict[str, Any] = {
                "exit_code": report.exit_code,
                "error": None if error is None else error[-_EVENT_ERROR_CHARS:],
                **_compute_details(compute, lost),
            }
            if final:
                details["final"] = True
                if before["webhook"]:
                    self._webhook(
                        cur,
                        before,
                        job_id,
                        principal,
                        "failed",
                        report.machine_id,
                        now,
                        echo_key,
                    )
            self._event(cur, job_id, "failed", attempt, report.machine_id, details, now)
            self._event(cur, job_id, "banned", attempt, report.machine_id, {}, now)
            if not final:
                remaining = before["max_failures"] - before["num_failures"] - 1
                self._event(
                    cur,
                    job_id,
                    "requeued",
                    attempt,
                    report.machine_id,
                    {"remaining": remaining},
                    now,
                )
            self._add_compute(cur, job_id, compute, lost)
        self._available(principal.user_id, row)
        return "ok"

    @_resilient
    def release(
        self, principal: Principal, job_id: str, report: WorkerReport
    ) -> ReportOutcome:
        """
        Hand the holder's job back to the queue at once, as an interruption.
        """
        params = self._fence(principal, job_id, report)
        now = params["now"] = self.now_ms()
        with self._hot.transaction(atomic=True) as cur:
            before = self._ending(cur, params, report)
            row = (
                None
                if before is None
                else self._hot.fetch_one(cur, self._hot.RELEASE, params)
            )
            if before is None or row is None:
                found = self._state(cur, principal, job_id) is not None
                return "not_holder" if found else "not_found"
            if self._hot.RELEASED is not None:
                self._hot.execute(cur, self._hot.RELEASED, params)
            compute, lost = attempt_compute(before, now, useful=False)
            details: dict[str, Any] = {"reason": _clip(report.reason)}
            details.update(_compute_details(compute, lost))
            self._event(
                cur,
                job_id,
                "released",
                before["attempt"],
                report.machine_id,
                details,
                now,
            )
            self._add_compute(cur, job_id, compute, lost)
        self._available(principal.user_id, row)
        return "ok"

    # -- jobs: progress and status between heartbeats ------------------------------
    #
    # Optional additions: a light progress report, and the holder's view of
    # its job for the status long poll (GET /jobs/{id}/status).

    @_resilient
    def report_progress(
        self, principal: Principal, job_id: str, report: WorkerReport
    ) -> JobStatus | None:
        """
        Store the holder's latest progress record; the lease is not extended.

        Returns:
            As :meth:`heartbeat`: ``None`` for an unknown job, ``RUNNING`` when
            stored, ``CANCELED`` or the final status otherwise.
        """
        params = self._fence(principal, job_id, report)
        params["progress"] = json.dumps(report.progress)
        with self._hot.transaction() as cur:
            if self._hot.execute(cur, self._hot.PROGRESS, params):
                return JobStatus.RUNNING
            state = self._state(cur, principal, job_id)
        return _holder_view(state, report.machine_id, report.attempt)

    @_resilient
    def holder_status(
        self,
        principal: Principal,
        job_id: str,
        *,
        machine_id: str,
        attempt: int | None,
    ) -> JobStatus | None:
        """
        The job's status as its (former) holder sees it, changing nothing.

        Returns:
            ``None`` for an unknown job; ``RUNNING`` if this machine (and
            attempt) holds it; ``CANCELED`` if it is running for someone else;
            otherwise the job's status.
        """
        with self._hot.transaction(write=False) as cur:
            state = self._state(cur, principal, job_id)
        return _holder_view(state, machine_id, attempt)

    # -- machines ---------------------------------------------------------------

    @_resilient
    def list_machines(self, principal: Principal) -> MachineTable:
        """
        The caller's machines (every user's for the admin), most recently seen
        first, and the caller's groups with pending jobs but no live machine.
        """
        now = self.now_ms()
        live_after = now - int(self.policy.live_seconds * 1000)
        running = (
            sa.select(
                JOBS.c.user_id,
                JOBS.c.machine_id,
                JOBS.c.id,
                JOBS.c.heartbeat,
                JOBS.c.lease_expires,
                JOBS.c.container_group_id,
            )
            .where(JOBS.c.status == "running")
            .order_by(JOBS.c.seq)
        )
        machines = sa.select(MACHINES)
        pending = (
            sa.select(
                JOBS.c.user_id, JOBS.c.container_group_id, sa.func.count().label("n")
            )
            .where(JOBS.c.status == "pending")
            .group_by(JOBS.c.user_id, JOBS.c.container_group_id)
        )
        if not principal.is_admin:
            running = running.where(JOBS.c.user_id == principal.user_id)
            machines = machines.where(MACHINES.c.user_id == principal.user_id)
            pending = pending.where(JOBS.c.user_id == principal.user_id)
        with self._read() as conn:
            holding: dict[tuple[str, str], Any] = {}
            served: set[tuple[str, str]] = set()
            for held in conn.execute(running):
                holding[(held.user_id, held.machine_id)] = held
                if held.lease_expires is not None and held.lease_expires > now:
                    served.add((held.user_id, held.container_group_id))
            records = conn.execute(machines).all()
            waiting = conn.execute(pending).all()
        table: list[Machine] = []
        for r in records:
            job = holding.get((r.user_id, r.machine_id))
            last = r.last_seen
            if job is not None and job.heartbeat is not None:
                last = max(last, job.heartbeat)
            quarantined = r.quarantined_until is not None and r.quarantined_until > now
            leased = job is not None and (job.lease_expires or 0) > now
            live = not quarantined and (leased or last >= live_after)
            if live:
                served.add((r.user_id, r.container_group_id))
            table.append(
                Machine(
                    machine_id=r.machine_id,
                    user_id=r.user_id,
                    container_group_id=r.container_group_id,
                    first_seen=_ms_to_dt(r.first_seen),  # type: ignore[arg-type]
                    last_seen=_ms_to_dt(last),  # type: ignore[arg-type]
                    job_id=None if job is None else job.id,
                    claims=r.claims,
                    completions=r.completions,
                    failures=r.failures,
                    failed_jobs=r.failed_jobs,
                    interruptions=r.interruptions,
                    uptime_seconds=0.0
                    if r.run_started is None
                    else max(0, last - r.run_started) / 1000,
                    quarantined_until=_ms_to_dt(r.quarantined_until)
                    if quarantined
                    else None,
                    live=live,
                )
            )
        table.sort(key=lambda m: (m.last_seen, m.machine_id), reverse=True)
        unserved = {
            w.container_group_id: int(w.n)
            for w in waiting
            if (w.user_id, w.container_group_id) not in served
        }
        return MachineTable(machines=tuple(table), unserved=unserved)

    # -- scaling rules ----------------------------------------------------------

    @staticmethod
    def _row_to_rule(row: Any) -> ScalingRule:
        return ScalingRule(
            container_group_id=row.container_group_id,
            org_name=row.org_name,
            project_name=row.project_name,
            container_group_name=row.container_group_name,
            user_id=row.user_id,
            created=_ms_to_dt(row.created),  # type: ignore[arg-type]
            updated=_ms_to_dt(row.updated),  # type: ignore[arg-type]
            min_replicas=row.min_replicas,
            max_replicas=row.max_replicas,
            idle_threshold_seconds=row.idle_threshold_seconds,
        )

    @staticmethod
    def _find_rule(
        conn: Connection, principal: Principal, group: str, owner: str | None
    ) -> Any:
        """
        The row of the rule a request addresses: the caller's own rule for the
        group. The admin may name another tenant's (``owner``); without one,
        the admin's own rule, else the group's only rule, else ``_AMBIGUOUS``.
        """
        rules = SCALING_RULES
        cond = rules.c.container_group_id == group
        if not principal.is_admin:
            if owner is not None and owner != principal.user_id:
                return None
            return conn.execute(
                sa.select(rules).where(cond & (rules.c.user_id == principal.user_id))
            ).first()
        if owner is not None:
            return conn.execute(
                sa.select(rules).where(cond & (rules.c.user_id == owner))
            ).first()
        rows = conn.execute(
            sa.select(rules)
            .where(cond)
            .order_by((rules.c.user_id != principal.user_id), rules.c.created)
            .limit(2)
        ).all()
        if not rows:
            return None
        if rows[0].user_id == principal.user_id or len(rows) == 1:
            return rows[0]
        return _AMBIGUOUS

    @staticmethod
    def _rule_row(conn: Connection, user_id: str, group: str) -> Any:
        rules = SCALING_RULES
        return conn.execute(
            sa.select(rules).where(
                (rules.c.user_id == user_id) & (rules.c.container_group_id == group)
            )
        ).first()

    @_resilient
    def create_rule(
        self, principal: Principal, sub: ScalingRuleSubmission
    ) -> ScalingRule | None:
        """
        Store the caller's scaling rule for a group; ``None`` if the caller
        already has one (other tenants' rules for the same group do not count).
        """
        now = self.now_ms()
        try:
            return self._insert_rule(principal, sub, now)
        except sa.exc.IntegrityError:
            # Another replica stored the caller's rule after our check.
            return None

    def _insert_rule(
        self, principal: Principal, sub: ScalingRuleSubmission, now: int
    ) -> ScalingRule | None:
        group = sub.container_group_id
        with self._write() as conn:
            if self._rule_row(conn, principal.user_id, group) is not None:
                return None
            conn.execute(
                SCALING_RULES.insert().values(
                    container_group_id=group,
                    user_id=principal.user_id,
                    org_name=principal.org_name or None,
                    project_name=principal.project_name or None,
                    container_group_name=sub.container_group_name,
                    min_replicas=sub.min_replicas,
                    max_replicas=sub.max_replicas,
                    idle_threshold_seconds=sub.idle_threshold_seconds,
                    created=now,
                    updated=now,
                )
            )
            row = self._rule_row(conn, principal.user_id, group)
        return self._row_to_rule(row)

    @_resilient
    def list_rules(self, principal: Principal) -> list[ScalingRule]:
        """
        The caller's rules (all tenants' rules for the admin).
        """
        query = sa.select(SCALING_RULES).order_by(
            SCALING_RULES.c.created, SCALING_RULES.c.user_id
        )
        if not principal.is_admin:
            query = query.where(SCALING_RULES.c.user_id == principal.user_id)
        with self._read() as conn:
            return [self._row_to_rule(r) for r in conn.execute(query)]

    @_resilient
    def get_rule(
        self, principal: Principal, group: str, owner: str | None = None
    ) -> ScalingRule | Literal["ambiguous"] | None:
        """
        One rule, if the caller may see it.

        Args:
            principal: The caller: a tenant sees only its own rule.
            group: The container group id.
            owner: The admin's choice of tenant (see ``_find_rule``).

        Returns:
            The rule, ``None`` if not found, or ``"ambiguous"`` when the admin
            named no tenant and several others have a rule for the group.
        """
        with self._read() as conn:
            row = self._find_rule(conn, principal, group, owner)
        if row is _AMBIGUOUS:
            return "ambiguous"
        return None if row is None else self._row_to_rule(row)

    @_resilient
    def update_rule(
        self,
        principal: Principal,
        group: str,
        update: ScalingRuleUpdate,
        owner: str | None = None,
    ) -> ScalingRule | Literal["invalid", "ambiguous"] | None:
        """
        Change some limits of a rule (addressed as in ``get_rule``).

        Returns:
            The updated rule, ``None`` if not found, ``"ambiguous"`` as in
            ``get_rule``, or ``"invalid"`` if the result would have
            ``min_replicas > max_replicas``.
        """
        with self._write() as conn:
            row = self._find_rule(conn, principal, group, owner)
            if row is None:
                return None
            if row is _AMBIGUOUS:
                return "ambiguous"
            values = update.to_json()
            low = values.get("min_replicas", row.min_replicas)
            high = values.get("max_replicas", row.max_replicas)
            if low > high:
                return "invalid"
            key = (SCALING_RULES.c.user_id == row.user_id) & (
                SCALING_RULES.c.container_group_id == group
            )
            conn.execute(
                SCALING_RULES.update()
                .where(key)
                .values(**values, updated=self.now_ms())
            )
            row = self._rule_row(conn, row.user_id, group)
        return self._row_to_rule(row)

    @_resilient
    def delete_rule(
        self, principal: Principal, group: str, owner: str | None = None
    ) -> Literal["ambiguous"] | None:
        """
        Delete one rule, addressed as in ``get_rule`` (no error if there is
        none); ``"ambiguous"`` as in ``get_rule``.
        """
        with self._write() as conn:
            row = self._find_rule(conn, principal, group, owner)
            if row is _AMBIGUOUS:
                return "ambiguous"
            if row is not None:
                conn.execute(
                    SCALING_RULES.delete().where(
                        (SCALING_RULES.c.user_id == row.user_id)
                        & (SCALING_RULES.c.container_group_id == group)
                    )
                )
        return None

    @_resilient
    def delete_all_rules(self) -> None:
        """
        Delete every rule (admin).
        """
        with self._write() as conn:
            conn.execute(SCALING_RULES.delete())
