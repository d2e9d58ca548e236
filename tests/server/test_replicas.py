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


@pytest.fixture
def two_replicas() -> Iterator[tuple[ServerHandle, ServerHandle]]:
    """Two in-process servers sharing one fresh PostgreSQL database and key."""
    with (
        fresh_database() as url,
        run_server(database_url=url, admin_key="k") as a,
        run_server(database_url=url, admin_key="k") as b,
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
        answer = Api(a.url, "k").get(
            "/work",
            params={"machine_id": "m", "container_group_id": group, "wait": 30},
        )
        got.append((time.monotonic(), answer.json()))

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(1.0)  # the poll is waiting by now
    assert not got
    submitted = time.monotonic()
    job = Api(b.url, "k").post("/jobs", json=sync_job(group)).json()
    waiter.join(timeout=30)
    ((answered, claimed),) = got
    assert [job["id"]] == [j["id"] for j in claimed]
    assert answered - submitted < 2.0
