"""
The autoscaler: sizes each container group that has a scaling rule to its
queue.

Three parts:

- ``decide``: a pure function from a rule, the group's demand, the group's
  state, the time and recent history to a decision (target and actions).
- ``read_demand``: one read query for every rule and its demand (pending,
  running, and jobs finished within the rule's idle threshold).
- ``Autoscaler``: the loop, run by one server process only (the one that
  holds the leadership, see ``make_election``), which logs every decision
  with its inputs and asks the provider to act.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from kelpie_sdk.config import (
    SALAD_API_KEY_ENV,
    SALAD_ORGANIZATION_ENVS,
    SALAD_PROJECT_ENVS,
)
from kelpie_sdk.errors import ConfigError, KelpieError
from kelpie_sdk.models import ScalingRule
from kelpie_sdk.server._db import JOBS, LEADER_LEASES, SCALING_RULES
from kelpie_sdk.server._providers import (
    DEFAULT_SALAD_API_URL,
    GroupState,
    Provider,
    SaladProvider,
)
from kelpie_sdk.server._store import Store

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_WINDOW",
    "AdvisoryLockElection",
    "AutoscaleSettings",
    "Autoscaler",
    "Decision",
    "Demand",
    "Election",
    "LeaseElection",
    "add_autoscale_arguments",
    "autoscale_settings",
    "decide",
    "desired_replicas",
    "make_election",
    "read_demand",
]

logger = logging.getLogger(__name__)

#: Seconds between two passes of the autoscaler.
DEFAULT_INTERVAL = 60.0
#: Seconds the desired count must stay lower before the group shrinks.
DEFAULT_WINDOW = 300.0

_FINISHED = ("completed", "failed", "canceled")


@attrs.frozen(kw_only=True)
class Demand:
    """
    The work of one container group.

    Attributes:
        pending: Jobs waiting for a worker.
        running: Jobs on a worker (interrupted ones until their lease expires).
        recent: Jobs that finished within the rule's idle threshold: their
            workers are kept for the next job instead of being stopped.
    """

    pending: int = 0
    running: int = 0
    recent: int = 0

    @property
    def total(self) -> int:
        """
        One replica per job.
        """
        return self.pending + self.running + self.recent


@attrs.frozen(kw_only=True)
class Decision:
    """
    What the autoscaler chose for one group, and why.

    Attributes:
        desired: The demand clamped to the rule's limits, before stabilisation.
        target: The replica count to run (after stabilisation).
        actions: In order, among ``start``, ``set_replicas`` and ``stop``.
        reason: One phrase for the log.
    """

    desired: int
    target: int
    actions: tuple[str, ...]
    reason: str


def desired_replicas(demand: int, min_replicas: int, max_replicas: int) -> int:
    """
    ``clamp(demand, min_replicas, max_replicas)``; the maximum wins if a rule
    has them the wrong way round.
    """
    return min(max_replicas, max(min_replicas, demand))


def decide(
    rule: ScalingRule,
    demand: Demand,
    group: GroupState | None,
    *,
    now: float,
    history: Sequence[tuple[float, int]] = (),
    window: float = DEFAULT_WINDOW,
) -> Decision:
    """
    Choose the replica count of one group and the calls that get it there.

    Growth is immediate; shrinking waits until the desired count has stayed
    lower for ``window`` seconds: the target is the highest desired count
    seen in the last ``window`` seconds (``history`` holds earlier
    ``(time, desired)`` samples of this group), clamped to the rule's current
    limits.

    Then: a group that does not exist is left alone; a target of 0 stops a
    group that runs (or is on its way up) and leaves any other alone; a
    positive target starts a stopped group and sets its replicas, and
    otherwise sets the replicas only when they differ.
    """
    low, high = rule.min_replicas, rule.max_replicas
    desired = desired_replicas(demand.total, low, high)
    recent = [d for t, d in history if now - t < window]
    target = desired_replicas(max([desired, *recent]), low, high)
    held = target > desired
    if group is None:
        return Decision(
            desired=desired, target=target, actions=(), reason="group not found"
        )
    if target == 0:
        if group.status in ("running", "deploying", "pending"):
            return Decision(
                desired=desired, target=0, actions=("stop",), reason="no work"
            )
        return Decision(desired=desired, target=0, actions=(), reason="stopped, idle")
    if group.status == "stopped":
        return Decision(
            desired=desired,
            target=target,
            actions=("start", "set_replicas"),
            reason="work arrived",
        )
    if group.replicas != target:
        reason = "scale up" if target > group.replicas else "scale down"
        return Decision(
            desired=desired, target=target, actions=("set_replicas",), reason=reason
        )
    reason = "held by the stabilisation window" if held else "steady"
    return Decision(desired=desired, target=target, actions=(), reason=reason)


def read_demand(conn: Connection, now_ms: int) -> list[tuple[ScalingRule, Demand]]:
    """
    Every scaling rule with its group's demand, in one query.

    A rule counts only its tenant's jobs for the group (the hosted service
    counted everyone's, so that one tenant could grow another's group).
    Portable SQL: ``SUM(CASE ...)`` over an outer join.
    """
    jobs, rules = JOBS, SCALING_RULES
    cutoff = now_ms - rules.c.idle_threshold_seconds * 1000
    finished_recently = jobs.c.status.in_(_FINISHED) & sa.or_(
        jobs.c.completed >= cutoff, jobs.c.failed >= cutoff, jobs.c.canceled >= cutoff
    )
    on = (
        (jobs.c.user_id == rules.c.user_id)
        & (jobs.c.container_group_id == rules.c.container_group_id)
        & sa.or_(jobs.c.status.in_(("pending", "running")), finished_recently)
    )

    def count(cond: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0)

    query = (
        sa.select(
            *rules.c,
            count(jobs.c.status == "pending").label("n_pending"),
            count(jobs.c.status == "running").label("n_running"),
            count(finished_recently).label("n_recent"),
        )
        .select_from(rules.outerjoin(jobs, on))
        .group_by(*rules.c)
        .order_by(rules.c.container_group_id, rules.c.user_id)
    )
    out = []
    for row in conn.execute(query):
        demand = Demand(
            pending=int(row.n_pending),
            running=int(row.n_running),
            recent=int(row.n_recent),
        )
        out.append((Store._row_to_rule(row), demand))
    return out


class Election(Protocol):
    """
    Says whether this process may run the autoscaler now.
    """

    def acquire(self) -> bool:
        """Take or keep the leadership; ``True`` while this process has it."""
        ...

    def release(self) -> None:
        """Give the leadership up (another process may take it at once)."""
        ...


class LeaseElection:
    """
    Leadership as a lease row (``leader_leases``), for SQLite and any database.

    ``acquire`` renews the lease if this holder has it, or takes it if it
    expired, with one conditional UPDATE; a process that dies loses it after
    ``ttl`` seconds.
    """

    def __init__(
        self,
        engine: Engine,
        holder: str,
        *,
        name: str = "autoscaler",
        ttl: float = 180.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.holder = holder
        self.name = name
        self.ttl = ttl
        self._clock = clock

    def acquire(self) -> bool:
        now = int(self._clock() * 1000)
        table = LEADER_LEASES
        with self.engine.begin() as conn:
            taken = conn.execute(
                table.update()
                .where(
                    (table.c.name == self.name)
                    & ((table.c.holder == self.holder) | (table.c.expires <= now))
                )
                .values(holder=self.holder, expires=now + int(self.ttl * 1000))
            ).rowcount
            if taken:
                return True
            exists = conn.execute(
                sa.select(table.c.name).where(table.c.name == self.name)
            ).first()
            if exists:
                return False
            try:
                with conn.begin_nested():
                    conn.execute(
                        table.insert().values(
                            name=self.name,
                            holder=self.holder,
                            expires=now + int(self.ttl * 1000),
                        )
                    )
            except sa.exc.IntegrityError:
                return False  # another process inserted it first
        return True

    def release(self) -> None:
        table = LEADER_LEASES
        with self.engine.begin() as conn:
            conn.execute(
                table.update()
                .where((table.c.name == self.name) & (table.c.holder == self.holder))
                .values(expires=0)
            )


def _lock_key(name: str) -> int:
    digest = hashlib.sha256(f"kelpie:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLockElection:
    """
    Leadership as a PostgreSQL session-level advisory lock, held on a
    dedicated connection: it goes with the connection, so a process that dies
    (or loses its connection) loses it at once.
    """

    def __init__(self, engine: Engine, *, name: str = "autoscaler") -> None:
        self.engine = engine
        self.key = _lock_key(name)
        self._conn: Connection | None = None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sa.exc.SQLAlchemyError:
                logger.debug("closing the leader connection failed", exc_info=True)
            self._conn = None

    def acquire(self) -> bool:
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.SQLAlchemyError:
                logger.warning("lost the leader connection; trying to lead again")
                self._drop()
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = conn.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            ).scalar()
        except sa.exc.SQLAlchemyError:
            logger.warning("cannot reach the database to lead", exc_info=True)
            return False
        if got:
            self._conn = conn
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(
                    sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}
                )
            except sa.exc.SQLAlchemyError:
                logger.debug("unlocking failed", exc_info=True)
            self._drop()


def make_election(engine: Engine, holder: str, *, ttl: float = 180.0) -> Election:
    """
    An advisory lock on PostgreSQL, a lease row elsewhere.
    """
    if engine.dialect.name == "postgresql":
        return AdvisoryLockElection(engine)
    return LeaseElection(engine, holder, ttl=ttl)


def _key(rule: ScalingRule) -> tuple[str, str]:
    return (rule.user_id, rule.container_group_id)


def _holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Autoscaler:
    """
    The loop: every ``interval`` seconds, if this process leads, size every
    group that has a scaling rule.

    Args:
        store: The server's store.
        provider: Starts, stops and resizes the groups.
        interval: Seconds between passes.
        window: The stabilisation window for shrinking, in seconds.
        election: Who leads; default ``make_election`` with a lease of three
            intervals (at least 30 s).
        clock: Seconds since the epoch.
    """

    def __init__(
        self,
        store: Store,
        provider: Provider,
        *,
        interval: float = DEFAULT_INTERVAL,
        window: float = DEFAULT_WINDOW,
        election: Election | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0 or window < 0:
            raise ConfigError(
                f"the autoscaler needs interval > 0 and window >= 0 seconds, got "
                f"{interval} and {window}"
            )
        self.store = store
        self.provider = provider
        self.interval = interval
        self.window = window
        self.election = election or make_election(
            store.engine, _holder_id(), ttl=max(3 * interval, 30.0)
        )
        self._clock = clock
        #: Per (tenant, group): recent ``(time, desired)`` samples.
        self._history: dict[tuple[str, str], list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leading = False

    def tick(self) -> list[tuple[ScalingRule, Decision]]:
        """
        One pass; returns the decisions (none when another process leads).
        """
        leading = self.election.acquire()
        if leading != self.leading:
            logger.info(
                "autoscaler: %s",
                "this process leads" if leading else "another process leads",
            )
            self.leading = leading
        if not leading:
            self._history.clear()  # stale by the time we lead again
            return []
        now = self._clock()
        with (
            self.store.engine.connect().execution_options(readonly=True) as conn,
            conn.begin(),
        ):
            groups = read_demand(conn, int(now * 1000))
        self._history = {
            _key(rule): self._history.get(_key(rule), []) for rule, _ in groups
        }
        decisions = []
        for i, (rule, demand) in enumerate(groups):
            # Renew between groups: slow provider calls (Retry-After, backoff)
            # must not let the lease run out under a pass still acting.
            if i and not self.election.acquire():
                logger.warning("autoscaler: lost the leadership during a pass")
                self.leading = False
                break
            decision = self._one(rule, demand, now)
            if decision is not None:
                decisions.append((rule, decision))
        return decisions

    def _one(self, rule: ScalingRule, demand: Demand, now: float) -> Decision | None:
        group_id = rule.container_group_id
        try:
            group = self.provider.get_group(rule)
        except KelpieError as exc:
            logger.warning("autoscale group=%s error=%r", group_id, str(exc))
            return None
        history = self._history[_key(rule)]
        decision = decide(
            rule, demand, group, now=now, history=history, window=self.window
        )
        history.append((now, decision.desired))
        history[:] = [(t, d) for t, d in history if now - t < self.window]
        logger.info(
            "autoscale group=%s user=%s pending=%d running=%d recent=%d min=%d max=%d "
            "idle_threshold_s=%d status=%s replicas=%s desired=%d target=%d "
            "actions=%s reason=%r",
            group_id,
            rule.user_id,
            demand.pending,
            demand.running,
            demand.recent,
            rule.min_replicas,
            rule.max_replicas,
            rule.idle_threshold_seconds,
            group.status if group else "missing",
            group.replicas if group else "-",
            decision.desired,
            decision.target,
            ",".join(decision.actions) or "none",
            decision.reason,
        )
        for action in decision.actions:
            try:
                if action == "start":
                    self.provider.start(rule)
                elif action == "stop":
                    self.provider.stop(rule)
                else:
                    self.provider.set_replicas(rule, decision.target)
            except KelpieError as exc:
                logger.warning(
                    "autoscale group=%s action=%s error=%r", group_id, action, str(exc)
                )
                break
        return decision

    def run(self) -> None:
        """
        Pass every ``interval`` seconds until ``stop``; errors are logged.
        """
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("autoscaler pass failed; trying again next time")
            self._stop.wait(self.interval)

    def start(self) -> None:
        """
        Run the loop in a daemon thread.
        """
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, name="kelpie-autoscaler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """
        End the loop and give the leadership up.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.election.release()
        except sa.exc.SQLAlchemyError:
            logger.warning("could not give the leadership up", exc_info=True)
        self.leading = False


@attrs.frozen(kw_only=True)
class AutoscaleSettings:
    """
    How ``kelpie server`` runs the autoscaler.

    Attributes:
        provider: ``salad`` (the only provider a server can drive; ``kelpie up
            --autoscale`` drives local workers itself).
        interval: Seconds between passes.
        window: The stabilisation window, in seconds.
        salad_api_url: SaladCloud's public API base URL.
        salad_api_key: A SaladCloud API key.
        salad_organization: The organization of rules that do not name one.
        salad_project: The project of rules that do not name one.
    """

    provider: str = "salad"
    interval: float = DEFAULT_INTERVAL
    window: float = DEFAULT_WINDOW
    salad_api_url: str = DEFAULT_SALAD_API_URL
    salad_api_key: str | None = None
    salad_organization: str | None = None
    salad_project: str | None = None

    def check(self) -> None:
        """
        Raises:
            ConfigError: An unknown provider, or no SaladCloud API key.
        """
        if self.provider != "salad":
            raise ConfigError(
                f"unknown autoscale provider {self.provider!r}; the server "
                "supports 'salad'"
            )
        if not self.salad_api_key:
            raise ConfigError(
                "the salad autoscale provider needs a SaladCloud API key; "
                "set SALAD_API_KEY"
            )

    def make_provider(self) -> Provider:
        """
        Build the provider.

        Raises:
            ConfigError: An unknown provider, or no SaladCloud API key.
        """
        self.check()
        assert self.salad_api_key is not None  # noqa: S101 - checked above
        return SaladProvider(
            self.salad_api_key,
            base_url=self.salad_api_url,
            organization=self.salad_organization,
            project=self.salad_project,
        )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def add_autoscale_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> None:
    """
    Add the autoscaler's options (defaults from the environment).
    """
    env = os.environ if environ is None else environ
    group = parser.add_argument_group(
        "autoscaler",
        "Size container groups that have a scaling rule. The SaladCloud API "
        f"key comes from {SALAD_API_KEY_ENV}.",
    )
    group.add_argument(
        "--autoscale",
        choices=["off", "salad"],
        default=env.get("KELPIE_AUTOSCALE", "off"),
        help="the provider to drive, or off (default: $KELPIE_AUTOSCALE or off)",
    )
    group.add_argument(
        "--autoscale-interval",
        type=_seconds,
        metavar="SECONDS",
        default=env.get("KELPIE_AUTOSCALE_INTERVAL", str(DEFAULT_INTERVAL)),
        help="seconds between passes (default: $KELPIE_AUTOSCALE_INTERVAL or 60)",
    )
    group.add_argument(
        "--autoscale-window",
        type=_seconds,
        metavar="SECONDS",
        default=env.get("KELPIE_AUTOSCALE_WINDOW", str(DEFAULT_WINDOW)),
        help="how long the desired count must stay lower before a group "
        "shrinks (default: $KELPIE_AUTOSCALE_WINDOW or 300)",
    )
    group.add_argument(
        "--salad-api-url",
        metavar="URL",
        default=env.get("KELPIE_SALAD_API_URL", DEFAULT_SALAD_API_URL),
        help=f"SaladCloud's public API (default: $KELPIE_SALAD_API_URL or "
        f"{DEFAULT_SALAD_API_URL})",
    )
    group.add_argument(
        "--salad-organization",
        metavar="NAME",
        default=next((env[n] for n in SALAD_ORGANIZATION_ENVS if env.get(n)), None),
        help="organization of rules that name none (default: $SALAD_ORGANIZATION)",
    )
    group.add_argument(
        "--salad-project",
        metavar="NAME",
        default=next((env[n] for n in SALAD_PROJECT_ENVS if env.get(n)), None),
        help="project of rules that name none (default: $SALAD_PROJECT)",
    )


def autoscale_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AutoscaleSettings | None:
    """
    The settings from ``add_autoscale_arguments``' options; ``None`` when off.

    Raises:
        ConfigError: The autoscaler is on but cannot work (no API key).
    """
    if args.autoscale == "off":
        return None
    env = os.environ if environ is None else environ
    settings = AutoscaleSettings(
        provider=args.autoscale,
        interval=float(args.autoscale_interval),
        window=float(args.autoscale_window),
        salad_api_url=args.salad_api_url,
        salad_api_key=env.get(SALAD_API_KEY_ENV),
        salad_organization=args.salad_organization,
        salad_project=args.salad_project,
    )
    settings.check()  # fail at start-up, not at the first pass
    return settings
