"""
A quarantined machine's worker: it asks IMDS for another node (SaladCloud), or
stops with exit code 5, against a real server (SQLite) that quarantined it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import WorkerReport
from kelpie_sdk.server import ReputationPolicy
from kelpie_sdk.testing import run_server
from kelpie_sdk.worker import EXIT_OK, EXIT_QUARANTINED, Worker, WorkerConfig
from kelpie_sdk.worker._imds import REALLOCATE_QUARANTINED, Imds
from tests.fake_imds import FakeImds, fake_imds

GROUP = "g-quarantine"
MACHINE = "m-bad"


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    yield from fake_imds()


@pytest.fixture
def quarantined() -> Iterator[Any]:
    """A server on which MACHINE is quarantined after one failure."""
    policy = ReputationPolicy(
        quarantine_failures=1, quarantine_jobs=1, quarantine_rate=0.0
    )
    with run_server(policy=policy) as server:
        with Client(server.url, server.admin_key) as client:
            client.submit_job(command="true", container_group_id=GROUP, sync={})
            client.submit_job(command="true", container_group_id=GROUP, sync={})
            job = client.claim_work(machine_id=MACHINE, container_group_id=GROUP)
            assert job is not None
            client.report_failed(
                job.id, WorkerReport(machine_id=MACHINE, container_group_id=GROUP)
            )
        yield server


def _run(tmp_path: Path, server: Any, imds_url: str | None) -> tuple[int, Worker]:
    config = WorkerConfig.from_env(
        {
            "SALAD_CONTAINER_GROUP_ID": GROUP,
            "SALAD_MACHINE_ID": MACHINE,
            "KELPIE_API_URL": server.url,
            "KELPIE_API_KEY": server.admin_key,
        },
        state_file=tmp_path / "state.json",
        reallocate_wait_s=0.1,
        long_poll_s=1.0,
    )
    worker = Worker(config, imds=None if imds_url is None else Imds(imds_url))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the quarantined worker did not stop"
    return result[0], worker


def test_without_imds_the_worker_exits_5(tmp_path: Path, quarantined: Any) -> None:
    """No IMDS: the worker stops with EXIT_QUARANTINED and runs nothing."""
    code, _ = _run(tmp_path, quarantined, None)
    assert EXIT_QUARANTINED == code
    with Client(quarantined.url, quarantined.admin_key) as client:
        # Both jobs (one failed once) wait for another machine.
        assert 2 == len(list(client.list_jobs(status="pending")))


def test_on_saladcloud_the_worker_asks_for_another_node(
    tmp_path: Path, quarantined: Any, imds: FakeImds
) -> None:
    """With IMDS: a reallocation request, then a clean stop."""
    code, _ = _run(tmp_path, quarantined, imds.url)
    assert [REALLOCATE_QUARANTINED] == imds.reallocations()
    assert EXIT_OK == code
