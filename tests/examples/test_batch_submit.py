"""
examples/batch_submit.py: a sweep submitted in batches and waited for, against a
real server and real workers.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kelpie_sdk import Client, JobStatus
from kelpie_sdk.testing import run_server
from tests.examples.helpers import EXAMPLES, clean_env, start_worker, stop_workers

SCRIPT = EXAMPLES / "batch_submit.py"
#: Jobs in the sweep. On 2 busy cores two workers finish 30 to 40 trivial jobs a
#: second; KELPIE_TEST_SWEEP_JOBS=1000 runs the example's full size (about 35 s).
JOBS = int(os.environ.get("KELPIE_TEST_SWEEP_JOBS", "200"))


@pytest.mark.slow
def test_sweep(tmp_path: Path) -> None:
    """Every job of the sweep is queued with its parameters and runs to completion."""
    store = tmp_path / "store"
    (store / "sweeps").mkdir(parents=True)
    with run_server() as server:
        start = functools.partial(
            start_worker,
            api_url=server.url,
            api_key=server.admin_key,
            group="sweep-group",
            storage_url=f"file://{store}",
            slots=8,
        )
        workers = [start(tmp_path / "w1"), start(tmp_path / "w2")]
        try:
            result = subprocess.run(
                [sys.executable, str(SCRIPT)],
                env=clean_env(
                    KELPIE_API_URL=server.url,
                    KELPIE_API_KEY=server.admin_key,
                    SWEEP_JOBS=str(JOBS),
                    SWEEP_CONTAINER_GROUP="sweep-group",
                    SWEEP_BUCKET="sweeps",
                    SWEEP_NAME="test-sweep",
                    # Each job's parameters go to `true`, which ignores them.
                    SWEEP_COMMAND="true",
                    SWEEP_BATCH_SIZE="64",
                    SWEEP_TIMEOUT="120",
                ),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
        finally:
            stop_workers(workers)
        assert 0 == result.returncode, result.stdout + result.stderr
        assert f"{JOBS} jobs finished" in result.stdout
        assert f"{JOBS} completed" in result.stdout
        with Client(server.url, server.admin_key) as client:
            jobs = list(client.list_jobs(container_group_id="sweep-group", asc=True))
    assert JOBS == len(jobs)
    assert {JobStatus.COMPLETED} == {job.status for job in jobs}
    strikes_and_seeds = {(job.arguments[0], job.arguments[1]) for job in jobs}
    assert JOBS == len(strikes_and_seeds), "each job has its own grid point"
    first = jobs[0]
    assert "true" == first.command
    assert ("--strike=80", "--seed=0") == first.arguments[:2]
    assert first.sync is not None
    assert "test-sweep/0000/ckpt/" == first.sync.during[0].prefix
