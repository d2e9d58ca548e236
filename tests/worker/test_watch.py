"""
JobWatch: progress and cancellation between heartbeats.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import WorkerReport
from kelpie_sdk.worker._watch import JobWatch
from tests.fault_server import (  # noqa: F401 (fixtures)
    FaultServer,
    Recorded,
    Reply,
    fault_server_fixture,
)


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class _Lost:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def _watch(url: str, key: str, job_id: str, progress: Path, lost: _Lost) -> JobWatch:
    return JobWatch(
        make_client=lambda: Client(url, key, max_retries=0),
        job_id=job_id,
        machine_id="m1",
        attempt=1,
        progress_file=progress,
        make_report=lambda record: WorkerReport(
            machine_id="m1", container_group_id="g", attempt=1, progress=record
        ),
        on_lost=lost,
    )


@pytest.fixture
def watching(
    fault_server: FaultServer, tmp_path: Path
) -> Iterator[tuple[FaultServer, Path, _Lost, JobWatch]]:
    lost = _Lost()
    progress = tmp_path / "progress.json"
    watch = _watch(fault_server.url, "k", "j1", progress, lost)
    yield fault_server, progress, lost, watch
    watch.stop()


def _by_path(server: FaultServer, replies: dict[str, Reply]) -> None:
    def next_reply(recorded: Recorded) -> Reply:
        with server.lock:
            server.requests.append(recorded)
        return replies[recorded.path.rsplit("/", 1)[-1]]

    server.next_reply = next_reply  # type: ignore[method-assign]


def _sent(server: FaultServer, endpoint: str) -> list[Recorded]:
    with server.lock:
        return [r for r in server.requests if r.path.endswith("/" + endpoint)]


def test_a_server_without_the_endpoints_turns_the_watch_off(
    watching: tuple[FaultServer, Path, _Lost, JobWatch],
) -> None:
    """404 from a server that lacks the endpoints: each thread asks once, then stops quietly."""
    server, progress, lost, watch = watching
    gone = Reply(status=404, body={"error": "Route Not Found"})
    _by_path(server, {"status": gone, "progress": gone})
    watch.start()
    _write(progress, {"step": 1})
    _wait(lambda: _sent(server, "progress") and _sent(server, "status"))
    _write(progress, {"step": 2})
    time.sleep(2.0)
    assert (1, 1, []) == (
        len(_sent(server, "progress")),
        len(_sent(server, "status")),
        lost.reasons,
    )


def test_progress_reports_are_spaced_and_carry_the_latest_record(
    watching: tuple[FaultServer, Path, _Lost, JobWatch],
) -> None:
    """A file rewritten 10 times a second is sent about once a second, ending with its last record."""
    server, progress, lost, watch = watching
    _by_path(
        server,
        {
            "status": Reply(status=404, body={"error": "Route Not Found"}),
            "progress": Reply(body={"status": "running"}),
        },
    )
    watch.start()
    started = time.monotonic()
    for step in range(30):
        _write(progress, {"step": step})
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    _wait(lambda: _sent(server, "progress")[-1].json()["progress"] == {"step": 29})
    sent = _sent(server, "progress")
    assert 2 <= len(sent) <= elapsed / 1.0 + 2
    assert all(1 == r.json()["attempt"] for r in sent)
    assert [] == lost.reasons


def test_a_canceled_answer_to_progress_reports_the_loss(
    watching: tuple[FaultServer, Path, _Lost, JobWatch],
) -> None:
    """A progress report answered 'canceled' tells the agent once."""
    server, progress, lost, watch = watching
    _by_path(
        server,
        {
            "status": Reply(status=404, body={"error": "Route Not Found"}),
            "progress": Reply(body={"status": "canceled"}),
        },
    )
    watch.start()
    _write(progress, {"step": 1})
    assert lost.event.wait(10)
    assert ["the server answered the progress report with 'canceled'"] == lost.reasons


def test_the_status_poll_learns_of_a_cancel_at_once(
    api_server: Any, user_key: str, client: Client, tmp_path: Path
) -> None:
    """Against the real server, a cancel reaches on_lost within about a second."""
    job = client.submit_job(command="x", container_group_id="g", sync={})
    client.claim_work(machine_id="m1", container_group_id="g")
    lost = _Lost()
    watch = _watch(api_server.url, user_key, job.id, tmp_path / "p.json", lost)
    watch.start()
    try:
        time.sleep(0.5)
        assert [] == lost.reasons
        canceled_at = time.monotonic()
        client.cancel(job.id)
        assert lost.event.wait(10)
        assert time.monotonic() - canceled_at < 2 + 3.0
        assert ["the server answered the status poll with 'canceled'"] == lost.reasons
    finally:
        watch.stop()
