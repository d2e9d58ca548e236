"""
A job's event history end to end: a real worker is SIGKILLed, the next attempt
fails, the last one completes; the history reads in order with its causes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus

from .conftest import GROUP, StartWorker, wait_for

pytestmark = pytest.mark.slow

#: Attempt 1 commits a checkpoint and then works on until its worker dies;
#: attempt 2 fails with exit code 3; attempt 3 completes.
SCRIPT = """
import os, sys, time
from kelpie_sdk.checkpoint import Checkpointer
attempt = os.environ["KELPIE_ATTEMPT"]
if attempt == "1":
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save({"step": 1}, step=1, blocking=True)
    time.sleep(120)
elif attempt == "2":
    print("step 2 diverged: loss is nan", file=sys.stderr)
    sys.exit(3)
"""


def test_interrupted_failed_completed_history(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Events read in order with causes, compute per attempt and lost compute."""
    first = start_worker("a")
    job = client.submit_job(
        command=sys.executable,
        arguments=["-c", SCRIPT, f"file://{tmp_path / 'ckpt'}"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
        max_failures=3,
        name="diverging",
        tags=["e2e"],
    )

    def checkpointed() -> bool:
        progress = client.get_job(job.id).progress or {}
        return "checkpoint_time" in progress

    wait_for(checkpointed, timeout=60)
    # Compute after the checkpoint, lost when the node vanishes: counted up to
    # the last heartbeat (every second), so at least about 2 s of it.
    time.sleep(3)
    first.kill()
    start_worker("b")
    wait_for(lambda: client.get_job(job.id).num_failures == 1, timeout=60)
    start_worker("c")
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert JobStatus.COMPLETED == done.status

    events = client.events(job.id)
    assert [
        ("submitted", None, None),
        ("claimed", 1, "machine-a"),
        ("lease_expired", 1, "machine-a"),
        ("claimed", 2, "machine-b"),
        ("failed", 2, "machine-b"),
        ("banned", 2, "machine-b"),
        ("requeued", 2, "machine-b"),
        ("claimed", 3, "machine-c"),
        ("completed", 3, "machine-c"),
    ] == [(e.kind, e.attempt, e.machine_id) for e in events]
    times = [e.time for e in events]
    assert times == sorted(times)

    expired, failed, completed = events[2], events[4], events[8]
    assert expired.details["lost_seconds"] >= 1.0
    assert expired.details["compute_seconds"] > expired.details["lost_seconds"]
    assert 3 == failed.details["exit_code"]
    assert "loss is nan" in failed.details["error"]
    assert "exit code 3" in failed.cause
    assert failed.details["compute_seconds"] == failed.details["lost_seconds"]
    assert 0 == completed.details["lost_seconds"]
    assert done.goodput is not None
    assert 0 < done.goodput < 1
    assert ("diverging", ("e2e",)) == (done.name, done.tags)


def test_releases_say_why(client: Client, start_worker: StartWorker) -> None:
    """Exit 85 and a worker's SIGTERM are released with their reason."""
    worker = start_worker("a")
    started = Path(worker.home) / "started"
    script = (
        "import os, sys, time\n"
        "if os.environ['KELPIE_ATTEMPT'] == '1':\n"
        "    sys.exit(85)\n"
        f"open({str(started)!r}, 'w').write('x')\n"
        "time.sleep(120)\n"
    )
    job = client.submit_job(
        command=sys.executable,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=30,
    )
    wait_for(started.exists, timeout=60)
    worker.terminate()
    assert 0 == worker.wait(timeout=30)
    released = [e for e in client.events(job.id) if e.kind == "released"]
    assert [1, 2] == [e.attempt for e in released]
    assert "exited with 85" in released[0].details["reason"]
    assert "shutting down (received SIGTERM)" in released[1].details["reason"]
    assert released[1].cause == released[1].details["reason"]
