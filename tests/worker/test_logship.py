"""
The log shipper: bounded, never blocking the job, and honest about drops.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from kelpie_sdk.client import Client
from kelpie_sdk.worker._logship import LogShipper


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _claimed(client: Client, group: str, machine: str = "m1") -> str:
    job = client.submit_job(command="x", container_group_id=group, sync={})
    claimed = client.claim_work(machine_id=machine, container_group_id=group)
    assert claimed is not None
    assert job.id == claimed.id
    return job.id


def test_a_dead_server_never_blocks_the_job_and_drops_are_counted() -> None:
    """With the server down, add() stays fast, the buffer stays bounded, drops are counted."""
    url = f"http://127.0.0.1:{_closed_port()}"
    shipper = LogShipper(
        make_client=lambda: Client(url, "k", max_retries=0),
        job_id="j",
        machine_id="m1",
        attempt=1,
        max_lines=1000,
        interval=0.05,
    )
    shipper.start()
    started = time.monotonic()
    for i in range(50_000):
        shipper.add("stdout", f"line {i}")
    took = time.monotonic() - started
    assert took < 5.0  # about 0.1 s; generous for a loaded machine
    assert shipper.buffered <= 1000
    assert (49_000, 0) == (shipper.dropped, shipper.shipped)
    started = time.monotonic()
    shipper.stop(timeout=10.0)
    assert time.monotonic() - started < 10.0


def test_the_oldest_lines_are_dropped_and_the_server_is_told(
    client: Client, container_group_id: str
) -> None:
    """A full buffer keeps the newest lines; the server shows how many were dropped."""
    job_id = _claimed(client, container_group_id)
    shipper = LogShipper(
        make_client=lambda: client.with_options(),
        job_id=job_id,
        machine_id="m1",
        attempt=1,
        max_lines=10,
        interval=3600.0,  # nothing is sent before stop()
    )
    shipper.start()
    for i in range(25):
        shipper.add("stderr" if i % 2 else "stdout", f"n{i}")
    shipper.stop()
    lines = [(x.stream, x.line) for x in client.logs(job_id)]
    assert (
        "kelpie",
        "[kelpie] 15 lines dropped on the worker (the server was slow or unreachable)",
    ) == lines[0]
    assert [f"n{i}" for i in range(15, 25)] == [line for _, line in lines[1:]]
    assert ("stderr", "n15") == lines[1]
    assert (15, 10) == (shipper.dropped, shipper.shipped)


def test_lines_arrive_in_batches_about_a_second_behind(
    client: Client, container_group_id: str
) -> None:
    """Lines added while the job runs reach the server without waiting for stop()."""
    job_id = _claimed(client, container_group_id)
    shipper = LogShipper(
        make_client=lambda: client.with_options(),
        job_id=job_id,
        machine_id="m1",
        attempt=1,
    )
    shipper.start()
    try:
        for i in range(12_000):  # more than one batch
            shipper.add("stdout", f"l{i}")
        deadline = time.monotonic() + 20
        seen: list[Any] = []
        while len(seen) < 12_000 and time.monotonic() < deadline:
            seen = list(client.logs(job_id))
            time.sleep(0.2)
        assert [f"l{i}" for i in range(12_000)] == [x.line for x in seen]
    finally:
        shipper.stop()


def test_shipping_stops_once_another_attempt_holds_the_job(
    client: Client, container_group_id: str
) -> None:
    """A 409 (claimed again) ends the shipper; its lines are discarded, not retried."""
    job_id = _claimed(client, container_group_id)
    shipper = LogShipper(
        make_client=lambda: client.with_options(),
        job_id=job_id,
        machine_id="m-old",
        attempt=1,
        interval=0.05,
    )
    shipper.start()
    shipper.add("stdout", "late")
    deadline = time.monotonic() + 10
    while shipper.buffered and time.monotonic() < deadline:
        time.sleep(0.05)
    shipper.add("stdout", "later")
    assert (0, 0) == (shipper.buffered, shipper.shipped)
    shipper.stop()
    assert [] == list(client.logs(job_id))
