"""
The autoscaler: the decision (formula, clamp, start, stop, stabilisation),
the demand query, leader election, and the loop against a fake SaladCloud.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk.client import Client
from kelpie_sdk.errors import ConfigError
from kelpie_sdk.models import ScalingRule
from kelpie_sdk.server import open_store
from kelpie_sdk.server._autoscale import (
    AdvisoryLockElection,
    Autoscaler,
    AutoscaleSettings,
    Demand,
    LeaseElection,
    decide,
    desired_replicas,
    make_election,
    read_demand,
)
from kelpie_sdk.server._providers import GroupState, SaladProvider
from kelpie_sdk.testing import run_server
from tests.salad_fake import FakeSalad, run_fake_salad
from tests.server.test_providers import rule

BUSY = "11111111-1111-4111-8111-111111111111"
EMPTY = "22222222-2222-4222-8222-222222222222"
G1 = "33333333-3333-4333-8333-333333333333"
RUNNING = GroupState(status="running", replicas=2)
STOPPED = GroupState(status="stopped", replicas=0)


# -- the formula -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("demand", "low", "high", "expected"),
    [
        (0, 0, 10, 0),
        (3, 0, 10, 3),
        (30, 0, 10, 10),
        (0, 2, 10, 2),
        (1, 2, 10, 2),
        (5, 5, 5, 5),
        (0, 0, 0, 0),
        (7, 0, 0, 0),
    ],
)
def test_desired_is_demand_clamped(
    demand: int, low: int, high: int, expected: int
) -> None:
    """The demand is clamped to [min_replicas, max_replicas]."""
    assert expected == desired_replicas(demand, low, high)


@given(
    pending=st.integers(0, 50),
    running=st.integers(0, 50),
    recent=st.integers(0, 50),
    low=st.integers(0, 20),
    extra=st.integers(0, 20),
)
def test_one_replica_per_job_within_the_limits(
    pending: int, running: int, recent: int, low: int, extra: int
) -> None:
    """Pending, running and recently finished jobs each want a replica."""
    high = low + extra
    d = decide(
        rule(low=low, high=high),
        Demand(pending=pending, running=running, recent=recent),
        RUNNING,
        now=0.0,
    )
    assert d.desired == d.target == min(high, max(low, pending + running + recent))
    assert low <= d.target <= high


# -- start, stop, resize ---------------------------------------------------------


def test_work_on_a_stopped_group_starts_it() -> None:
    """Jobs for a stopped group start it and set its replicas."""
    d = decide(rule(), Demand(pending=3), STOPPED, now=0.0)
    assert ("start", "set_replicas") == d.actions
    assert 3 == d.target


def test_no_work_stops_a_running_group_when_min_is_zero() -> None:
    """A running group with nothing to do and min_replicas 0 is stopped."""
    d = decide(rule(low=0), Demand(), RUNNING, now=0.0)
    assert ("stop",) == d.actions
    assert 0 == d.target


@pytest.mark.parametrize("status", ["deploying", "pending"])
def test_no_work_stops_a_group_on_its_way_up(status: str) -> None:
    """A group still deploying is stopped too when the work is gone."""
    d = decide(rule(), Demand(), GroupState(status=status, replicas=1), now=0.0)
    assert ("stop",) == d.actions


@pytest.mark.parametrize("status", ["stopped", "failed", "succeeded"])
def test_no_work_leaves_other_states_alone(status: str) -> None:
    """Stopped, failed or finished groups without work get no call."""
    d = decide(rule(), Demand(), GroupState(status=status, replicas=0), now=0.0)
    assert () == d.actions


def test_min_replicas_keeps_the_group_up() -> None:
    """min_replicas is the floor: no stop, replicas set to it."""
    d = decide(rule(low=1), Demand(), GroupState(status="running", replicas=3), now=0.0)
    assert ("set_replicas",) == d.actions
    assert 1 == d.target


def test_min_replicas_starts_a_stopped_group_without_work() -> None:
    """A stopped group with min_replicas > 0 is started even without work."""
    d = decide(rule(low=2), Demand(), STOPPED, now=0.0)
    assert ("start", "set_replicas") == d.actions
    assert 2 == d.target


def test_unchanged_count_makes_no_call() -> None:
    """The replica count is sent only when it changes."""
    d = decide(rule(), Demand(running=2), RUNNING, now=0.0)
    assert () == d.actions


def test_missing_group_is_left_alone() -> None:
    """A group the provider does not know gets no call."""
    d = decide(rule(), Demand(pending=4), None, now=0.0)
    assert () == d.actions


# -- stabilisation ---------------------------------------------------------------


def test_scale_up_is_immediate_despite_history() -> None:
    """Growth does not wait for the window."""
    d = decide(
        rule(), Demand(pending=6), RUNNING, now=100.0, history=[(90.0, 1)], window=300
    )
    assert 6 == d.target
    assert ("set_replicas",) == d.actions


def test_scale_down_waits_for_the_window() -> None:
    """The highest desired count of the window holds until it ages out."""
    group = GroupState(status="running", replicas=5)
    history = [(0.0, 5), (60.0, 2)]
    held = decide(
        rule(), Demand(running=1), group, now=120.0, history=history, window=300
    )
    assert (1, 5, ()) == (held.desired, held.target, held.actions)
    assert "stabilisation" in held.reason
    later = decide(
        rule(), Demand(running=1), group, now=300.0, history=history, window=300
    )
    assert (2, ("set_replicas",)) == (later.target, later.actions)
    last = decide(
        rule(), Demand(running=1), group, now=360.0, history=history, window=300
    )
    assert 1 == last.target


def test_stop_at_zero_also_waits_for_the_window() -> None:
    """Stopping at zero waits for the window like any scale-in."""
    history = [(0.0, 1)]
    held = decide(rule(), Demand(), RUNNING, now=100.0, history=history, window=300)
    assert 1 == held.target
    assert ("set_replicas",) == held.actions
    done = decide(rule(), Demand(), RUNNING, now=300.0, history=history, window=300)
    assert ("stop",) == done.actions


def test_history_is_clamped_to_the_current_limits() -> None:
    """A lowered max_replicas wins over a higher count remembered from before."""
    d = decide(
        rule(high=3), Demand(), RUNNING, now=10.0, history=[(0.0, 8)], window=300
    )
    assert 3 == d.target


def test_zero_window_scales_down_at_once() -> None:
    """Without a window the group follows the demand down at once."""
    d = decide(rule(), Demand(), RUNNING, now=10.0, history=[(9.0, 5)], window=0)
    assert ("stop",) == d.actions


# -- the demand query ------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[object]:
    with run_server() as handle:
        yield handle


def _rule(client: Client, group: str, **limits: int) -> None:
    client.create_scaling_rule(
        container_group_id=group,
        min_replicas=limits.get("low", 0),
        max_replicas=limits.get("high", 10),
        idle_threshold_seconds=limits.get("idle", 60),
        container_group_name="workers",
    )


def test_read_demand_counts_pending_running_and_recent(server: object) -> None:
    """Per group: pending, running, finished within the idle threshold."""
    handle = server
    store = handle.store  # type: ignore[attr-defined]
    with Client(handle.url, handle.admin_key) as client:  # type: ignore[attr-defined]
        _rule(client, BUSY, idle=60)
        _rule(client, EMPTY)
        for _ in range(4):
            client.submit_job(command="true", container_group_id=BUSY, sync={})
        client.submit_job(command="true", container_group_id="no-rule", sync={})
    now = store.now_ms()
    with store.engine.begin() as conn:
        ids = [
            r.id
            for r in conn.execute(
                sa.text("SELECT id FROM jobs WHERE container_group_id=:g ORDER BY seq"),
                {"g": BUSY},
            )
        ]
        conn.execute(
            sa.text("UPDATE jobs SET status='running' WHERE id=:i"), {"i": ids[0]}
        )
        conn.execute(
            sa.text("UPDATE jobs SET status='completed', completed=:t WHERE id=:i"),
            {"i": ids[1], "t": now - 30_000},
        )
        conn.execute(
            sa.text("UPDATE jobs SET status='failed', failed=:t WHERE id=:i"),
            {"i": ids[2], "t": now - 90_000},
        )
        result = read_demand(conn, now)
    by_group = {r.container_group_id: d for r, d in result}
    assert {BUSY, EMPTY} == set(by_group)
    assert Demand(pending=1, running=1, recent=1) == by_group[BUSY]
    assert Demand() == by_group[EMPTY]
    rules = {r.container_group_id: r for r, _ in result}
    assert "workers" == rules[BUSY].container_group_name


def _tenant(handle: object, org: str) -> Client:
    """The SDK client of a fresh user whose key names ``org`` / ``proj``."""
    store = handle.store  # type: ignore[attr-defined]
    user = store.create_user(f"u-{uuid.uuid4().hex}")
    key = store.create_key(user.id, org, "proj")
    return Client(handle.url, key)  # type: ignore[attr-defined]


def test_read_demand_counts_only_the_rules_tenants_jobs(server: object) -> None:
    """Two tenants' rules for one group id each count their own jobs only."""
    handle = server
    with _tenant(handle, "acme") as a, _tenant(handle, "globex") as b:
        _rule(a, G1)
        _rule(b, G1)
        for _ in range(3):
            a.submit_job(command="true", container_group_id=G1, sync={})
        b.submit_job(command="true", container_group_id=G1, sync={})
        a_id, b_id = a.me().id, b.me().id
    store = handle.store  # type: ignore[attr-defined]
    with store.engine.connect() as conn:
        result = read_demand(conn, store.now_ms())
    by_user = {r.user_id: d for r, d in result if r.container_group_id == G1}
    assert {a_id: Demand(pending=3), b_id: Demand(pending=1)} == by_user


def test_autoscaler_sizes_each_tenants_group_by_its_own_jobs(
    server: object, fake: FakeSalad
) -> None:
    """One pass sets each tenant's group to that tenant's queue, not the sum."""
    fake.add_group("globex", "proj", "workers", status="stopped", replicas=0)
    handle = server
    with _tenant(handle, "acme") as a, _tenant(handle, "globex") as b:
        _rule(a, G1)
        _rule(b, G1)
        for _ in range(3):
            a.submit_job(command="true", container_group_id=G1, sync={})
        b.submit_job(command="true", container_group_id=G1, sync={})
    provider = SaladProvider("salad-test-key", base_url=fake.url, sleep=lambda s: None)
    scaler = Autoscaler(handle.store, provider, interval=1)  # type: ignore[attr-defined]
    decisions = scaler.tick()
    assert [1, 3] == sorted(d.target for _, d in decisions)
    assert 3 == fake.group("acme", "proj", "workers")["replicas"]
    assert 1 == fake.group("globex", "proj", "workers")["replicas"]


# -- leader election -------------------------------------------------------------


def test_lease_election_between_two_stores(tmp_path: Path) -> None:
    """Two servers on one SQLite file: one leads; the other takes over on expiry."""
    url = f"sqlite:///{tmp_path}/k.db"
    clock = [1000.0]
    a = LeaseElection(open_store(url).engine, "a", ttl=30, clock=lambda: clock[0])
    b = LeaseElection(open_store(url).engine, "b", ttl=30, clock=lambda: clock[0])
    assert a.acquire()
    assert not b.acquire()
    clock[0] += 20
    assert a.acquire()  # renewed
    clock[0] += 20
    assert not b.acquire()  # a's renewal still holds
    clock[0] += 31  # a died
    assert b.acquire()
    assert not a.acquire()
    b.release()
    assert a.acquire()


def test_two_autoscalers_one_leads(tmp_path: Path) -> None:
    """Only the leader's pass acts; the other acts once the leader stops."""
    url = f"sqlite:///{tmp_path}/k.db"
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def get_group(self, r: object) -> GroupState:
            calls.append(self.name)
            return STOPPED

        def start(self, r: object) -> None: ...

        def stop(self, r: object) -> None: ...

        def set_replicas(self, r: object, n: int) -> None: ...

        def reallocate(self, r: object, i: str, reason: str) -> None: ...

    one = Autoscaler(open_store(url), Recorder("one"), interval=1)
    two = Autoscaler(open_store(url), Recorder("two"), interval=1)
    with one.store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scaling_rules VALUES ('g','u',NULL,NULL,'n',0,5,60,0,0)"
            )
        )
    one.tick()
    two.tick()
    one.tick()
    assert ["one", "one"] == calls
    assert one.leading
    assert not two.leading
    one.stop()
    two.tick()
    assert ["one", "one", "two"] == calls


def test_a_pass_stops_when_the_leadership_is_lost(tmp_path: Path) -> None:
    """The lease is renewed between groups; a lost lease ends the pass."""
    seen: list[str] = []

    class Recorder:
        def get_group(self, r: ScalingRule) -> GroupState:
            seen.append(r.container_group_id)
            return STOPPED

        def start(self, r: object) -> None: ...

        def stop(self, r: object) -> None: ...

        def set_replicas(self, r: object, n: int) -> None: ...

        def reallocate(self, r: object, i: str, reason: str) -> None: ...

    class Flaky:
        def __init__(self) -> None:
            self.answers = [True, True, False]

        def acquire(self) -> bool:
            return self.answers.pop(0)

        def release(self) -> None: ...

    store = open_store(f"sqlite:///{tmp_path}/k.db")
    with store.engine.begin() as conn:
        for group in ("a", "b", "c"):
            conn.execute(
                sa.text(
                    "INSERT INTO scaling_rules VALUES (:g,'u',NULL,NULL,'n',0,5,60,0,0)"
                ),
                {"g": group},
            )
    scaler = Autoscaler(store, Recorder(), interval=1, election=Flaky())
    assert 2 == len(scaler.tick())
    assert ["a", "b"] == seen
    assert not scaler.leading


def _pg_engine(database: str) -> sa.Engine:
    return sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        poolclass=sa.NullPool,
    )


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    admin = _pg_engine("test").execution_options(isolation_level="AUTOCOMMIT")
    name = f"kelpie_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is needed for this test: {exc}")
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_advisory_lock_election_on_postgres(pg_database: str) -> None:
    """One holder at a time; the lock goes with its connection."""
    engine_a, engine_b = _pg_engine(pg_database), _pg_engine(pg_database)
    assert isinstance(make_election(engine_a, "a"), AdvisoryLockElection)
    a, b = AdvisoryLockElection(engine_a), AdvisoryLockElection(engine_b)
    try:
        assert a.acquire()
        assert a.acquire()  # kept
        assert not b.acquire()
        a.release()
        assert b.acquire()
        assert not a.acquire()
        # The leader's connection dies: the lock is free at once.
        with engine_a.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
                    "JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = current_database() "
                    "AND l.pid <> pg_backend_pid()"
                )
            )
            # pg_terminate_backend only signals: wait for the backend to go.
            deadline = time.monotonic() + 30
            while conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d "
                    "ON d.oid = l.database WHERE l.locktype = 'advisory' "
                    "AND d.datname = current_database()"
                )
            ).scalar_one():
                assert time.monotonic() < deadline, "the backend did not exit"
                time.sleep(0.01)
        assert a.acquire()
        assert not b.acquire()  # b notices it lost its connection
    finally:
        a.release()
        b.release()
        engine_a.dispose()
        engine_b.dispose()


def test_lease_election_works_on_postgres(pg_database: str) -> None:
    """The lease table is portable SQL too."""
    from kelpie_sdk.server._db import upgrade

    engine = _pg_engine(pg_database)
    try:
        upgrade(engine)
        clock = [0.0]
        a = LeaseElection(engine, "a", ttl=10, clock=lambda: clock[0])
        b = LeaseElection(engine, "b", ttl=10, clock=lambda: clock[0])
        assert a.acquire()
        assert not b.acquire()
        clock[0] = 11
        assert b.acquire()
    finally:
        engine.dispose()


# -- configuration ---------------------------------------------------------------


def test_settings_need_a_key_and_a_known_provider() -> None:
    """The server's settings need a SaladCloud key and a known provider."""
    with pytest.raises(ConfigError, match="SALAD_API_KEY"):
        AutoscaleSettings().make_provider()
    with pytest.raises(ConfigError, match="unknown autoscale provider"):
        AutoscaleSettings(provider="aws", salad_api_key="k").make_provider()
    provider = AutoscaleSettings(salad_api_key="k").make_provider()
    assert isinstance(provider, SaladProvider)


def test_bad_interval_is_refused(tmp_path: Path) -> None:
    """An interval of 0 is a configuration error."""
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    with pytest.raises(ConfigError, match="interval > 0"):
        Autoscaler(store, SaladProvider("k"), interval=0)


# -- the loop against the fake SaladCloud ---------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeSalad]:
    with run_fake_salad("salad-test-key") as server:
        server.add_group("acme", "proj", "workers", status="stopped", replicas=0)
        yield server


def _wait(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.05)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What the autoscaler logs (the server's logging setup may not propagate)."""
    out: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = out.append  # type: ignore[method-assign]
    log = logging.getLogger("kelpie_sdk.server._autoscale")
    previous_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield out
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


@pytest.mark.slow
def test_end_to_end_start_scale_and_stop(
    fake: FakeSalad, records: list[logging.LogRecord]
) -> None:
    """Jobs start the group and set replicas; idle past the threshold stops it."""
    with run_server() as handle:
        provider = SaladProvider(
            "salad-test-key",
            base_url=fake.url,
            organization="acme",
            project="proj",
            sleep=lambda s: None,
        )
        scaler = Autoscaler(handle.store, provider, interval=0.2, window=0.5)
        with Client(handle.url, handle.admin_key) as client:
            client.create_scaling_rule(
                container_group_id=G1,
                min_replicas=0,
                max_replicas=3,
                idle_threshold_seconds=1,
                container_group_name="workers",
            )
            jobs = [
                client.submit_job(command="true", container_group_id=G1, sync={})
                for _ in range(5)
            ]
            scaler.start()
            try:
                _wait(lambda: fake.group("acme", "proj", "workers")["replicas"] == 3)
                assert "running" == fake.group("acme", "proj", "workers")["status"]
                for job in jobs:
                    client.cancel(job.id)
                _wait(
                    lambda: fake.group("acme", "proj", "workers")["status"] == "stopped"
                )
            finally:
                scaler.stop()
        writes = fake.writes()
        assert ("POST", "start", None) == writes[0]
        assert ("PATCH", "workers", {"replicas": 3}) == writes[1]
        assert ("POST", "stop", None) == writes[-1]
        assert all(w[0] != "PATCH" or w[2]["replicas"] <= 3 for w in writes)
    lines = [
        r.getMessage() for r in records if f"autoscale group={G1}" in r.getMessage()
    ]
    assert any(
        "pending=5" in line and "actions=start,set_replicas" in line for line in lines
    )
    assert any("actions=stop" in line and "recent=0" in line for line in lines)
    assert all("min=0 max=3 idle_threshold_s=1" in line for line in lines)


def test_provider_errors_are_logged_not_raised(
    fake: FakeSalad, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A group the provider cannot reach is skipped; the pass goes on."""
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scaling_rules VALUES ('g','u','acme','proj',NULL,0,5,60,0,0)"
            )
        )
    provider = SaladProvider("salad-test-key", base_url=fake.url, sleep=lambda s: None)
    scaler = Autoscaler(store, provider, interval=1)
    assert [] == scaler.tick()
    assert any("container_group_name" in r.getMessage() for r in caplog.records)
