"""
A node with two slots gets back a job that one of its slots still runs (the
lease lapsed, say through an outage): the old attempt ends before the new starts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus
from kelpie_sdk.testing import ServerHandle, run_server

from ..conftest import FakeClock
from .conftest import GROUP, StartWorker, wait_for

PY = sys.executable

# Each attempt notes its start; attempt 1 then runs until stopped, and on
# SIGTERM takes 1.5 s (a last checkpoint, say) before it notes its stop; a
# later attempt finishes at once.
SCRIPT = """
import os, signal, sys, time
trace, attempt = sys.argv[1], os.environ["KELPIE_ATTEMPT"]
def note(text):
    with open(trace, "a") as handle:
        handle.write(text + "\\n")
def stop(signum, frame):
    time.sleep(1.5)
    note("stop " + attempt)
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
note("start " + attempt)
if attempt == "1":
    time.sleep(120)
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[ServerHandle]:
    """This module's server runs on a clock the test can move on."""
    with run_server(clock=clock) as handle:
        yield handle


def test_a_slot_that_gets_back_its_nodes_job_stops_the_older_attempt_first(
    client: Client, start_worker: StartWorker, clock: FakeClock, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    worker = start_worker(KELPIE_SLOTS="2", KELPIE_LONG_POLL_S="1")
    job = client.submit_job(
        command=PY,
        arguments=["-c", SCRIPT, str(trace)],
        container_group_id=GROUP,
        sync={},
        # The holder's next heartbeat is 60 s away: the other slot claims first.
        heartbeat_interval=60,
    )
    wait_for(lambda: trace.exists() and "start 1" in trace.read_text())
    clock.advance(600)  # the lease lapses, as if the node had been cut off
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert JobStatus.COMPLETED == done.status
    assert 2 == done.attempt
    # Attempt 1 ended before attempt 2 began (they would share its directories).
    assert ["start 1", "stop 1", "start 2"] == trace.read_text().split("\n")[:-1]
    assert worker.alive()
