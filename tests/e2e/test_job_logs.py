"""
Job logs end to end: a real worker subprocess ships a job's output, and the
SDK reads it back while the job runs and after its worker is gone.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus, LogLine

from .conftest import GROUP, StartWorker, wait_for
from .test_resilience import _Server

pytestmark = pytest.mark.slow

PY = sys.executable

#: Prints "tick <n> <time.time()>" every 0.25 s, then exits 0.
TICKER = """
import sys, time
for n in range(16):
    print(f"tick {n} {time.time():.3f}", flush=True)
    if n % 4 == 0:
        print(f"warn {n}", file=sys.stderr, flush=True)
    time.sleep(0.25)
"""


def test_printed_lines_appear_through_follow_within_two_seconds(
    client: Client, start_worker: StartWorker
) -> None:
    """Client.logs(follow=True) yields each printed line within 2 s, then ends with the job."""
    start_worker()
    job = client.submit_job(
        command=PY,
        arguments=["-c", TICKER],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=2,
    )
    arrivals: list[tuple[float, LogLine]] = []
    for line in client.logs(job.id, follow=True):
        arrivals.append((time.time(), line))
    ticks = [(at, x) for at, x in arrivals if x.stream == "stdout"]
    assert [f"tick {n}" for n in range(16)] == [
        x.line.rsplit(" ", 1)[0] for _, x in ticks
    ]
    delays = [at - float(x.line.rsplit(" ", 1)[1]) for at, x in ticks]
    assert max(delays) < 2.0, delays
    assert [f"warn {n}" for n in (0, 4, 8, 12)] == [
        x.line for _, x in arrivals if x.stream == "stderr"
    ]
    assert {1} == {x.attempt for _, x in arrivals}
    # follow returned because the job finished.
    assert JobStatus.COMPLETED == client.get_job(job.id).status


def test_logs_of_a_sigkilled_attempt_are_kept_and_labelled(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-job: its attempt's lines stay, labelled attempt 1."""
    marker = tmp_path / "ran-once"
    script = f"""
import os, time
marker = {str(marker)!r}
if os.path.exists(marker):
    print("second run", flush=True)
else:
    open(marker, "w").close()
    for n in range(3):
        print(f"first run {{n}}", flush=True)
    time.sleep(120)
"""
    first = start_worker("a")
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    wait_for(lambda: len(list(client.logs(job.id, attempt=1))) >= 3)
    first.kill()
    start_worker("b")
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert (JobStatus.COMPLETED, 2) == (done.status, done.attempt)
    lines = [(x.attempt, x.stream, x.line) for x in client.logs(job.id)]
    assert [
        (1, "stdout", "first run 0"),
        (1, "stdout", "first run 1"),
        (1, "stdout", "first run 2"),
        (2, "stdout", "second run"),
    ] == lines


def test_a_worker_with_shipping_off_sends_nothing(
    client: Client, start_worker: StartWorker
) -> None:
    """KELPIE_SHIP_LOGS=false: the job runs as before and the server has no lines."""
    worker = start_worker(KELPIE_SHIP_LOGS="false")
    job = client.submit_job(
        command=PY,
        arguments=["-c", "print('only in the worker log')"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    wait_for(lambda: client.get_job(job.id).status.finished)
    assert [] == list(client.logs(job.id))
    wait_for(lambda: "only in the worker log" in worker.log())


def test_follow_from_another_thread_sees_the_worker_log_too(
    client: Client, start_worker: StartWorker
) -> None:
    """The worker still prints '[<id>] line' into its own log while it ships."""
    worker = start_worker()
    job = client.submit_job(
        command=PY,
        arguments=["-c", "print('both places')"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    got: list[str] = []
    t = threading.Thread(
        target=lambda: got.extend(x.line for x in client.logs(job.id, follow=True))
    )
    t.start()
    t.join(timeout=60)
    assert ["both places"] == got
    wait_for(lambda: f"[{job.id}] both places" in worker.log())


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[_Server]:
    """A server subprocess that the test can kill and start again."""
    server = _Server(tmp_path)
    server.start()
    yield server
    server.stop()
    server.log.close()


def test_an_api_outage_never_blocks_the_job_and_its_lines_arrive_later(
    restartable: _Server, start_worker: StartWorker, tmp_path: Path
) -> None:
    """The server is down for 4 s while the job prints: it prints on, nothing is lost."""
    gaps = tmp_path / "max-gap"
    script = f"""
import time
last = time.monotonic()
worst = 0.0
for n in range(200):
    print(f"line {{n}}", flush=True)
    now = time.monotonic()
    worst, last = max(worst, now - last), now
    time.sleep(0.05)
open({str(gaps)!r}, "w").write(str(worst))
"""
    start_worker(KELPIE_API_URL=restartable.url, KELPIE_API_KEY=restartable.key)
    with Client(restartable.url, restartable.key) as client:
        job = client.submit_job(
            command=PY,
            arguments=["-c", script],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=8,
        )
        wait_for(lambda: list(client.logs(job.id)))
        restartable.stop()
        time.sleep(4)
        restartable.start()
        done = wait_for(
            lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
        )
        lines = [x.line for x in client.logs(job.id)]
    assert JobStatus.COMPLETED == done.status
    assert [f"line {n}" for n in range(200)] == lines
    # The job's own loop never waited on the server (it sleeps 0.05 s a line).
    assert float(gaps.read_text()) < 1.0
