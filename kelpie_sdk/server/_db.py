"""
The database schema (SQLAlchemy Core) and engine set-up.

Times are stored as integer milliseconds since the Unix epoch (UTC): they sort,
index and compare the same way on SQLite and PostgreSQL, and the lease test
``lease_expires <= now`` is a plain indexed range scan.

The schema is created and upgraded only by the Alembic migrations in
``kelpie_sdk/server/migrations``; ``METADATA`` mirrors them, and a test checks
that the two agree.
"""

from __future__ import annotations

import logging
import os
import pathlib
import stat
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from kelpie_sdk.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ADMIN_ID",
    "API_KEYS",
    "IDEMPOTENCY_KEYS",
    "JOBS",
    "JOB_BANS",
    "JOB_EVENTS",
    "JOB_LOGS",
    "JOB_LOG_ATTEMPTS",
    "LEADER_LEASES",
    "MACHINES",
    "METADATA",
    "SCALING_RULES",
    "USERS",
    "WEBHOOK_DELIVERIES",
    "WEBHOOK_SECRETS",
    "check_schema",
    "current_revision",
    "head_revision",
    "make_engine",
    "normalise_url",
    "upgrade",
]

#: The seeded admin user (the original's ADMIN_ID).
ADMIN_ID = "00000000-0000-0000-0000-000000000000"

METADATA = sa.MetaData()

USERS = sa.Table(
    "users",
    METADATA,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("username", sa.Text, nullable=False, index=True),
    sa.Column("created", sa.BigInteger, nullable=False),
)

API_KEYS = sa.Table(
    "api_keys",
    METADATA,
    # SHA-256 of the key: a leaked database does not leak usable keys.
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.String(36),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("org_name", sa.Text, nullable=False, server_default=""),
    sa.Column("project_name", sa.Text, nullable=False, server_default=""),
    sa.Column("created", sa.BigInteger, nullable=False),
    # Names the key without revealing it: the first 16 hex digits of its hash.
    sa.Column("key_id", sa.String(16), index=True, unique=True),
    # admin, user or worker.
    sa.Column("role", sa.String(16), nullable=False, server_default="user"),
    # A worker key's container groups, as a JSON list; NULL: all of its user's.
    sa.Column("container_groups", sa.Text),
    sa.Column("expires", sa.BigInteger),
    # Updated at most once a minute per key.
    sa.Column("last_used", sa.BigInteger),
    sa.Column("revoked", sa.BigInteger),
    # An admin key from KELPIE_ADMIN_KEY (or generated at first start): the
    # next one replaces it.
    sa.Column("seeded", sa.Boolean, nullable=False, server_default=sa.false()),
)

_PENDING = sa.text("status = 'pending'")
_RUNNING = sa.text("status = 'running'")

JOBS = sa.Table(
    "jobs",
    METADATA,
    # Insertion order: FIFO within a queue, and batches keep request order.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("started", sa.BigInteger),
    sa.Column("completed", sa.BigInteger),
    sa.Column("canceled", sa.BigInteger),
    sa.Column("failed", sa.BigInteger),
    sa.Column("heartbeat", sa.BigInteger),
    sa.Column("num_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("machine_id", sa.Text),
    sa.Column("command", sa.Text, nullable=False),
    sa.Column("arguments", sa.Text, nullable=False, server_default="[]"),
    sa.Column("environment", sa.Text, nullable=False, server_default="{}"),
    sa.Column("input_bucket", sa.Text),
    sa.Column("input_prefix", sa.Text),
    sa.Column("checkpoint_bucket", sa.Text),
    sa.Column("checkpoint_prefix", sa.Text),
    sa.Column("output_bucket", sa.Text),
    sa.Column("output_prefix", sa.Text),
    sa.Column("max_failures", sa.Integer, nullable=False, server_default="3"),
    sa.Column("heartbeat_interval", sa.Integer, nullable=False, server_default="30"),
    sa.Column("container_group_id", sa.Text, nullable=False),
    sa.Column("webhook", sa.Text),
    sa.Column("compression", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("num_heartbeats", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sync", sa.Text),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("num_interruptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_expires", sa.BigInteger),
    sa.Column("progress", sa.Text),
    sa.Column("last_error", sa.Text),
    sa.Column("name", sa.Text),
    # A JSON list of tags, or NULL for none.
    sa.Column("tags", sa.Text),
    # Compute (claim to end) of the job's finished attempts, and the part of it
    # lost to interruptions and failures, in milliseconds: its goodput.
    sa.Column("compute_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lost_ms", sa.BigInteger, nullable=False, server_default="0"),
    # The group leads: the PostgreSQL claim orders by (group, user, seq), an
    # order no other index gives (migration 0010).
    sa.Index(
        "ix_jobs_pending",
        "container_group_id",
        "user_id",
        "seq",
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    ),
    sa.Index(
        "ix_jobs_running",
        "user_id",
        "container_group_id",
        "lease_expires",
        sqlite_where=_RUNNING,
        postgresql_where=_RUNNING,
    ),
    sa.Index("ix_jobs_user_seq", "user_id", "seq"),
    sa.Index("ix_jobs_user_status_seq", "user_id", "status", "seq"),
    sa.Index("ix_jobs_user_group_seq", "user_id", "container_group_id", "seq"),
    sa.Index("ix_jobs_user_name_seq", "user_id", "name", "seq"),
)

#: Every transition of every job, written in the transaction that made it.
JOB_EVENTS = sa.Table(
    "job_events",
    METADATA,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer),
    sa.Column("machine_id", sa.Text),
    # A JSON object: the cause and, for an attempt's end, its compute.
    sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    sa.Index("ix_job_events_job_seq", "job_id", "seq"),
)

JOB_BANS = sa.Table(
    "job_bans",
    METADATA,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("machine_id", sa.Text, primary_key=True),
    sa.Column("created", sa.BigInteger, nullable=False),
)

#: Each job attempt's output: one row per batch the worker sent (thousands of
#: lines a second cost a few rows, not thousands). ``data`` is a JSON array of
#: ``[stream, time_ms, line]``; line ``i`` of a row is number ``skip + i`` in
#: it, and ``seq * 65536 + skip + i`` is its cursor in ``GET /jobs/{id}/logs``.
JOB_LOGS = sa.Table(
    "job_logs",
    METADATA,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    # Lines trimmed from the front of this batch (the oldest of the attempt).
    sa.Column("skip", sa.Integer, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    # The lines' UTF-8 bytes, each plus one, summed to keep each attempt's bound.
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_job_logs_job_seq", "job_id", "seq"),
    sa.Index("ix_job_logs_job_attempt_seq", "job_id", "attempt", "seq"),
)

#: Per attempt: the bytes kept, the worker's next line number (to skip a batch
#: sent twice and to count lines the worker dropped), and what was dropped.
JOB_LOG_ATTEMPTS = sa.Table(
    "job_log_attempts",
    METADATA,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("next_line", sa.BigInteger, nullable=False),
    sa.Column("dropped", sa.BigInteger, nullable=False),
    sa.Column("trimmed", sa.BigInteger, nullable=False),
)

#: One rule per tenant (user) and container group: tenants do not share or
#: see each other's rules, even for the same group id.
SCALING_RULES = sa.Table(
    "scaling_rules",
    METADATA,
    sa.Column("container_group_id", sa.String(36), nullable=False),
    sa.Column("user_id", sa.String(36), nullable=False, index=True),
    sa.Column("org_name", sa.Text),
    sa.Column("project_name", sa.Text),
    sa.Column("container_group_name", sa.Text),
    sa.Column("min_replicas", sa.Integer, nullable=False),
    sa.Column("max_replicas", sa.Integer, nullable=False),
    sa.Column("idle_threshold_seconds", sa.Integer, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("updated", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("user_id", "container_group_id", name="scaling_rules_pkey"),
)

#: Who runs the singletons (the autoscaler) when several servers share a
#: database without advisory locks (SQLite): one row per role, taken with a
#: conditional UPDATE and renewed before it expires.
LEADER_LEASES = sa.Table(
    "leader_leases",
    METADATA,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),
)

#: Each machine's record, per tenant: what it claimed, finished, failed and
#: lost, and whether it is quarantined. Updated in the same transactions as
#: the job transitions (claim, completion, failure, release).
MACHINES = sa.Table(
    "machines",
    METADATA,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("machine_id", sa.Text, primary_key=True),
    sa.Column("container_group_id", sa.Text, nullable=False),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # Start of the current run: the first contact since its last interruption.
    sa.Column("run_started", sa.BigInteger),
    sa.Column("claims", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    # Distinct jobs among the failures.
    sa.Column("failed_jobs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("interruptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("quarantined_until", sa.BigInteger),
    sa.Column("quarantines", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_machines_user_group", "user_id", "container_group_id"),
)

#: The webhook outbox: one row per event to send, written in the transaction
#: that changed the job's status (only for jobs with a webhook URL), sent and
#: retried by the dispatcher, and deleted a while after it was delivered or
#: given up. ``next_attempt`` doubles as the lease of the replica sending it.
WEBHOOK_DELIVERIES = sa.Table(
    "webhook_deliveries",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    # The exact bytes sent (and signed) on every attempt.
    sa.Column("body", sa.Text, nullable=False),
    # The triggering request's X-Kelpie-Key, only with the opt-in echo.
    sa.Column("echo_key", sa.Text),
    sa.Column("created", sa.BigInteger, nullable=False),
    # pending, delivered or abandoned.
    sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt", sa.BigInteger, nullable=False),
    sa.Column("finished", sa.BigInteger),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_webhook_deliveries_due", "state", "next_attempt"),
    sa.Index("ix_webhook_deliveries_finished", "finished"),
)

#: Each tenant's webhook signing secret, and the one it replaced while that
#: is still accepted (signed with both until ``previous_until``).
WEBHOOK_SECRETS = sa.Table(
    "webhook_secrets",
    METADATA,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("previous", sa.Text),
    sa.Column("previous_until", sa.BigInteger),
    sa.Column("created", sa.BigInteger, nullable=False),
)


#: Each tenant's ``Idempotency-Key`` of a job submission, inserted in the
#: transaction that queues the jobs (so a key exists only if its jobs do), with
#: the answer to replay. The primary key makes concurrent repeats queue once.
IDEMPOTENCY_KEYS = sa.Table(
    "idempotency_keys",
    METADATA,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    # SHA-256 of the route and the canonical JSON body.
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),
    sa.Index("ix_idempotency_keys_expires", "expires"),
)


def normalise_url(url: str) -> str:
    """
    Map ``postgresql://`` and ``postgres://`` to psycopg 3's SQLAlchemy URL.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    """
    Create an engine for a SQLAlchemy URL.

    For PostgreSQL (psycopg 3): a pool of 8 (+8 overflow) connections checked
    before use, a 5 s connect timeout and a 10 s statement timeout.

    For SQLite: WAL journal, ``synchronous=NORMAL`` (durable against a crash of
    the server process; see docs/server.md), a 10 s busy timeout, and every
    write transaction opened with ``BEGIN IMMEDIATE`` so that it takes the write
    lock up front instead of failing with SQLITE_BUSY on upgrade. Connections
    with the execution option ``readonly=True`` open a plain deferred ``BEGIN``.
    The parent directory of a database file is created (mode 0700), and the
    file itself with mode 0600, since it holds the jobs' environments in
    plain text; see ``secure_sqlite_file``.
    """
    sa_url = sa.make_url(normalise_url(url))
    if sa_url.get_backend_name() == "postgresql":
        from kelpie_sdk.server._pg import connect_args

        return sa.create_engine(
            sa_url,
            pool_pre_ping=True,
            pool_size=8,
            max_overflow=8,
            pool_timeout=5,
            connect_args=connect_args(),
        )
    if sa_url.get_backend_name() != "sqlite":
        return sa.create_engine(sa_url, pool_pre_ping=True)
    database = sa_url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        secure_sqlite_file(pathlib.Path(database).expanduser())
    engine = sa.create_engine(
        sa_url,
        connect_args={"check_same_thread": False, "timeout": 10.0},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's own transaction handling
        # would open DEFERRED transactions).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=10000",
            "PRAGMA foreign_keys=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: The permission bits of a SQLite database file (and its -wal and -shm).
SQLITE_FILE_MODE = 0o600


def secure_sqlite_file(path: pathlib.Path) -> None:
    """
    Make a SQLite database readable and writable by its owner only (W-34).

    A new file is created empty with mode 0600 (SQLite gives the -wal and
    -shm files it creates later the database file's mode); an existing file,
    -wal or -shm with looser bits is tightened, with a warning in the log.
    The parent directory is created (mode 0700) if missing.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for suffix in ("", "-wal", "-shm"):
        one = path.with_name(path.name + suffix)
        try:
            mode = stat.S_IMODE(one.stat().st_mode)
        except FileNotFoundError:
            continue
        if not mode & ~SQLITE_FILE_MODE:
            continue
        try:
            one.chmod(SQLITE_FILE_MODE)
        except OSError as exc:  # not the owner: say so, and carry on
            logger.warning(
                "the database file %s has mode %04o (open to others; it holds "
                "job environments) and could not be changed: %s",
                one,
                mode,
                exc,
            )
        else:
            logger.warning(
                "the database file %s had mode %04o (open to others; it holds "
                "job environments): changed to %04o",
                one,
                mode,
                SQLITE_FILE_MODE,
            )


def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(pathlib.Path(__file__).with_name("migrations")))


def head_revision() -> str:
    """
    The newest schema revision this version of kelpie-sdk knows.
    """
    head: str = _script().get_current_head()
    return head


def current_revision(conn: Connection) -> str | None:
    """
    The database's schema revision (``None`` for an empty database).
    """
    from alembic.migration import MigrationContext

    revision: str | None = MigrationContext.configure(conn).get_current_revision()
    return revision


def _refuse_newer(current: str | None) -> None:
    if current is None:
        return
    from alembic.util import CommandError

    try:
        known = _script().get_revision(current)
    except CommandError:
        known = None
    if known is None:
        raise ConfigError(
            f"the database schema is at revision {current}, newer than this "
            f"kelpie-sdk knows (up to {head_revision()}); upgrade kelpie-sdk on "
            "this machine"
        )


def check_schema(engine: Engine) -> None:
    """
    Refuse a database whose schema is not exactly the current one.

    Raises:
        ConfigError: The schema is older (run ``kelpie db upgrade``) or newer
            (upgrade kelpie-sdk) than this version's.
    """
    with engine.connect() as conn:
        current = current_revision(conn)
    _refuse_newer(current)
    if current != head_revision():
        raise ConfigError(
            f"the database schema is at revision {current or '(none)'}, not "
            f"{head_revision()}; run `kelpie db upgrade --database URL` first"
        )


#: The PostgreSQL advisory lock that serialises migrations between replicas.
_MIGRATION_LOCK = 0x6B656C70


def upgrade(engine: Engine, revision: str = "head") -> None:
    """
    Create or upgrade the schema with the packaged Alembic migrations.

    Replicas starting together on PostgreSQL take turns (an advisory lock).

    Raises:
        ConfigError: The database's schema is newer than this version knows.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option(
        "script_location", str(pathlib.Path(__file__).with_name("migrations"))
    )
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
            )
        _refuse_newer(current_revision(conn))
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
