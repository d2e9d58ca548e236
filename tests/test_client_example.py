"""
Runs examples/submit_and_wait.py against the real server, with a worker thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kelpie_sdk import Client
from kelpie_sdk.models import WorkerReport

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "submit_and_wait.py"


def complete_one(client: Client, group: str, stop: threading.Event) -> None:
    """Claim the next job of `group` and report it completed."""
    while not stop.is_set():
        job = client.claim_work(machine_id="m-example", container_group_id=group)
        if job is not None:
            report = WorkerReport(
                machine_id="m-example", container_group_id=group, attempt=job.attempt
            )
            client.report_completed(job.id, report)
            return
        time.sleep(0.05)


def run_example(
    api_server: Any, key: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run the example with KELPIE_API_URL/KELPIE_API_KEY set."""
    env = {**os.environ, "KELPIE_API_URL": api_server.url, "KELPIE_API_KEY": key}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_example_completes(
    api_server: Any, user_key: str, client: Client, container_group_id: str
) -> None:
    """The example submits a job, waits, and exits 0 once a worker completes it."""
    stop = threading.Event()
    worker = threading.Thread(
        target=complete_one, args=(client, container_group_id, stop), daemon=True
    )
    worker.start()
    try:
        result = run_example(
            api_server,
            user_key,
            "--container-group-id",
            container_group_id,
            "--poll-interval",
            "0.1",
            "--timeout",
            "30",
            "--",
            "python",
            "train.py",
            "--epochs",
            "3",
        )
    finally:
        stop.set()
        worker.join(5)
    assert 0 == result.returncode, result.stderr
    assert "completed after 0 failure(s)" in result.stdout
    [job] = client.list_jobs(container_group_id=container_group_id)
    assert ("python", ("train.py", "--epochs", "3")) == (job.command, job.arguments)


def test_example_times_out_and_cancels(
    api_server: Any, user_key: str, client: Client, container_group_id: str
) -> None:
    """Without a worker the example gives up at its timeout and cancels the job."""
    result = run_example(
        api_server,
        user_key,
        "--container-group-id",
        container_group_id,
        "--timeout",
        "0",
        "--",
        "true",
    )
    assert 1 == result.returncode
    assert "still unfinished; canceling it" in result.stdout
    [job] = client.list_jobs(container_group_id=container_group_id)
    assert "canceled" == job.status.value
