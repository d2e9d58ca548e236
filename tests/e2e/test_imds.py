"""
The worker and SaladCloud's instance metadata service, end to end: a worker
subprocess against the real server, with a loopback fake IMDS.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus, SyncConfig, SyncDirection, SyncSpec
from kelpie_sdk.worker import EXIT_IDLE, EXIT_MAX_FAILURES
from kelpie_sdk.worker._imds import (
    DELETION_COST_FINAL_UPLOAD,
    REALLOCATE_IDLE,
    REALLOCATE_MAX_FAILURES,
)
from tests.fake_imds import FakeImds, closed_port_url, fake_imds

from .conftest import GROUP, StartWorker, StorageSetup, wait_for

pytestmark = pytest.mark.slow

PY = sys.executable


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    yield from fake_imds()


def _on(imds_url: str, **env: str) -> dict[str, str]:
    return {"KELPIE_IMDS": "on", "KELPIE_IMDS_URL": imds_url, **env}


def test_deletion_cost_follows_the_job(
    client: Client,
    start_worker: StartWorker,
    imds: FakeImds,
    file_storage: StorageSetup,
    tmp_path: Path,
) -> None:
    """0 idle, 1 on claim, rising with heartbeats, the maximum while outputs
    upload, 0 again when the job is done."""
    out = tmp_path / "result"
    start_worker(storage_url=file_storage.url, **_on(imds.url))
    wait_for(lambda: imds.deletion_costs())
    script = (
        "import os, time; time.sleep(4); "
        f"open(os.path.join({str(out)!r}, 'r.txt'), 'w').write('done')"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync=SyncSpec(
            after=[
                SyncConfig(
                    bucket=file_storage.bucket,
                    prefix="imds/out/",
                    local_path=str(out),
                    direction=SyncDirection.UPLOAD,
                )
            ]
        ),
        heartbeat_interval=1,
    )
    wait_for(lambda: client.get_job(job.id).status is JobStatus.COMPLETED, 60)
    wait_for(lambda: imds.deletion_costs()[-1] == 0, 30)
    costs = imds.deletion_costs()
    assert 0 == costs[0]
    claim = costs.index(1)
    final = costs.index(DELETION_COST_FINAL_UPLOAD)
    running = costs[claim + 1 : final]
    assert 2 <= len(running), costs
    # One value per heartbeat: 3, 4, 5, ... (a value may be skipped when the
    # next heartbeat comes before it was sent).
    assert 3 == running[0], costs
    assert sorted(set(running)) == running, costs
    assert [0] == costs[final + 1 :]
    assert all(c.headers["Metadata"] == "true" for c in imds.snapshot())
    assert [] == imds.reallocations()


def test_max_failures_reallocates_the_node(
    client: Client, start_worker: StartWorker, imds: FakeImds
) -> None:
    """After MAX_JOB_FAILURES the worker asks for another node, stops claiming,
    and exits 0 once the wait for SaladCloud is over."""
    worker = start_worker(
        MAX_JOB_FAILURES="1", KELPIE_REALLOCATE_WAIT_S="2", **_on(imds.url)
    )
    for _ in range(2):
        client.submit_job(
            command=PY,
            arguments=["-c", "raise SystemExit(1)"],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=1,
        )
    assert 0 == worker.wait(timeout=60)
    assert [REALLOCATE_MAX_FAILURES] == imds.reallocations()
    # One job failed here; the other was never claimed by this node.
    jobs = client.list_jobs()
    assert [0, 1] == sorted(j.num_failures for j in jobs)
    assert all(j.status is not JobStatus.RUNNING for j in jobs)
    assert "reallocation requested" in worker.log()


def test_idle_worker_reallocates_and_a_sigterm_ends_the_wait(
    start_worker: StartWorker, imds: FakeImds
) -> None:
    """Idle past MAX_TIME_WITH_NO_WORK_S: reallocate with the idle time; while
    it waits to be stopped, SIGTERM ends the worker with code 0."""
    worker = start_worker(
        MAX_TIME_WITH_NO_WORK_S="1", KELPIE_LONG_POLL_S="0.5", **_on(imds.url)
    )
    wait_for(lambda: imds.reallocations(), 30)
    [reason] = imds.reallocations()
    assert reason.startswith(REALLOCATE_IDLE)
    assert 1000 <= int(reason.removeprefix(REALLOCATE_IDLE))
    wait_for(lambda: "waiting up to 60 s" in worker.log(), 30)
    assert worker.alive()
    started = time.monotonic()
    worker.terminate()
    assert 0 == worker.wait(timeout=30)
    assert time.monotonic() - started < 20


def test_unreachable_imds_keeps_exit_code_3(
    client: Client, start_worker: StartWorker
) -> None:
    """IMDS on but nothing answers: MAX_JOB_FAILURES still exits 3."""
    worker = start_worker(MAX_JOB_FAILURES="1", **_on(closed_port_url()))
    client.submit_job(
        command=PY,
        arguments=["-c", "raise SystemExit(1)"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    assert EXIT_MAX_FAILURES == worker.wait(timeout=60)


def test_unreachable_imds_keeps_exit_code_4(start_worker: StartWorker) -> None:
    """IMDS on but nothing answers: the idle limit still exits 4."""
    worker = start_worker(
        MAX_TIME_WITH_NO_WORK_S="1",
        KELPIE_LONG_POLL_S="0.5",
        **_on(closed_port_url()),
    )
    assert EXIT_IDLE == worker.wait(timeout=60)


def test_imds_is_off_by_default(
    client: Client, start_worker: StartWorker, imds: FakeImds
) -> None:
    """Outside SaladCloud (auto, the default) nothing reaches IMDS, even with
    its URL set: a job runs, the idle limit exits 4, the fake hears nothing."""
    worker = start_worker(
        MAX_TIME_WITH_NO_WORK_S="2",
        KELPIE_LONG_POLL_S="0.5",
        KELPIE_IMDS_URL=imds.url,
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", "import time; time.sleep(2)"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    assert EXIT_IDLE == worker.wait(timeout=60)
    assert JobStatus.COMPLETED == client.get_job(job.id).status
    assert [] == imds.snapshot()
