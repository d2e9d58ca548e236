"""
Several server replicas on one PostgreSQL database.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kelpie_sdk.testing import ServerHandle, run_server

from ..conftest import Api
from ..pg import fresh_database
from .helpers import sync_job

#: Admin keys (at least 32 characters).
REPLICA_KEY = "replica-admin-key-" + "k" * 16
SHARED_KEY = "shared-admin-key-" + "s" * 16


@pytest.fixture
def two_replicas() -> Iterator[tuple[ServerHandle, ServerHandle]]:
    """Two in-process servers sharing one fresh PostgreSQL database and key."""
    with (
        fresh_database() as url,
        run_server(database_url=url, admin_key=REPLICA_KEY) as a,
        run_server(database_url=url, admin_key=REPLICA_KEY) as b,
    ):
        assert a.store.wait_listening(10)
        assert b.store.wait_listening(10)
        yield a, b


def test_a_long_poll_wakes_when_another_replica_gets_the_job(
    two_replicas: tuple[ServerHandle, ServerHandle],
) -> None:
    """
    A GET /work waiting on replica A returns within 2 s of a submission to
    replica B; without a wake-up it would wait for A's periodic re-check
    (5 s on PostgreSQL).
    """
    a, b = two_replicas
    assert a.store.wake_recheck_seconds >= 5
    group = str(uuid.uuid4())
    got: list[tuple[float, Any]] = []

    def poll() -> None:
        answer = Api(a.url, REPLICA_KEY).get(
            "/work",
            params={"machine_id": "m", "container_group_id": group, "wait": 30},
        )
        got.append((time.monotonic(), answer.json()))

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(1.0)  # the poll is waiting by now
    assert not got
    submitted = time.monotonic()
    job = Api(b.url, REPLICA_KEY).post("/jobs", json=sync_job(group)).json()
    waiter.join(timeout=30)
    ((answered, claimed),) = got
    assert [job["id"]] == [j["id"] for j in claimed]
    assert answered - submitted < 2.0


def test_two_replicas_creating_the_same_rule_at_once_give_one_409() -> None:
    """
    Another replica's uncommitted rule for the same group: when it commits,
    this replica's create_rule answers "exists" (409), not a database error.
    """
    import psycopg

    from kelpie_sdk.models import ScalingRuleSubmission
    from kelpie_sdk.server import ADMIN_ID, Principal, open_store

    group = str(uuid.uuid4())
    with fresh_database() as url:
        store = open_store(url)
        try:
            with psycopg.connect(url) as other:
                other.execute(
                    "INSERT INTO scaling_rules (container_group_id, user_id,"
                    " min_replicas, max_replicas, idle_threshold_seconds,"
                    " created, updated) VALUES (%s, %s, 0, 1, 60, 0, 0)",
                    (group, ADMIN_ID),
                )
                result: list[Any] = []
                racer = threading.Thread(
                    target=lambda: result.append(
                        store.create_rule(
                            Principal(ADMIN_ID, "", ""),
                            ScalingRuleSubmission(
                                container_group_id=group,
                                min_replicas=0,
                                max_replicas=2,
                                idle_threshold_seconds=60,
                            ),
                        )
                    )
                )
                racer.start()
                time.sleep(1.0)  # create_rule is now waiting on the row lock
                other.commit()
                racer.join(timeout=30)
            assert [None] == result
        finally:
            store.close()


def test_replicas_starting_together_both_seed_the_admin() -> None:
    """
    Another replica's uncommitted admin seed: when it commits, this replica's
    ensure_admin still succeeds (the start-up of N replicas on a new database).
    """
    import psycopg

    from kelpie_sdk.server import ADMIN_ID, open_store
    from kelpie_sdk.server._store import hash_key

    with fresh_database() as url:
        store = open_store(url)
        try:
            with psycopg.connect(url) as other:
                other.execute(
                    "INSERT INTO users (id, username, created) VALUES (%s, 'admin', 0)",
                    (ADMIN_ID,),
                )
                other.execute(
                    "INSERT INTO api_keys (key_hash, user_id, created)"
                    " VALUES (%s, %s, 0)",
                    (hash_key(SHARED_KEY), ADMIN_ID),
                )
                outcome: list[Any] = []

                def seed() -> None:
                    try:
                        outcome.append(store.ensure_admin(SHARED_KEY))
                    except Exception as exc:
                        outcome.append(exc)

                racer = threading.Thread(target=seed)
                racer.start()
                time.sleep(1.0)  # ensure_admin is now waiting on the row lock
                other.commit()
                racer.join(timeout=30)
            assert [None] == outcome
            assert store.principal_for_key(SHARED_KEY) is not None
        finally:
            store.close()
