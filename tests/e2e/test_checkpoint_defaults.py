"""
The checkpoint recipe with its defaults, under a real worker: SIGTERM saves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kelpie_sdk.checkpoint import Checkpointer
from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus

from .conftest import GROUP, StartWorker, StorageSetup, wait_for

pytestmark = pytest.mark.slow

# The recipe with the default policy (every 300 s): only SIGTERM makes it save
# before the end. It records where each attempt started.
JOB = """
import json, os, sys, time
from pathlib import Path
from kelpie_sdk import checkpoint

total = 400
ckpt = checkpoint.Checkpointer()
start = ckpt.latest_step()
state = ckpt.load() if start is not None else {"done": 0, "starts": []}
state["starts"].append(start or 0)
Path(sys.argv[1], "running").write_text(os.environ["KELPIE_ATTEMPT"])
for step in range(start or 0, total):
    time.sleep(0.01)
    state["done"] = step + 1
    if ckpt.should_save(step + 1):
        ckpt.save(state, step=step + 1)
ckpt.finish(state, step=total)
Path(sys.argv[1], "result.json").write_text(json.dumps(state))
"""


def test_sigterm_to_the_worker_saves_and_the_next_attempt_resumes(
    client: Client,
    start_worker: StartWorker,
    file_storage: StorageSetup,
    tmp_path: Path,
) -> None:
    """Stopping the worker saves the job's step; another worker resumes from it."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    marks = tmp_path / "marks"
    marks.mkdir()
    job = client.submit_job(
        command=sys.executable,
        arguments=[str(script), str(marks)],
        container_group_id=GROUP,
        sync={
            "during": [
                {
                    "bucket": file_storage.bucket,
                    "prefix": "ckpt/",
                    "local_path": str(tmp_path / "unused"),
                    "direction": "upload",
                }
            ]
        },
        heartbeat_interval=30,
    )
    first = start_worker("w1", storage_url=file_storage.url)
    wait_for(lambda: (marks / "running").exists())
    first.terminate()
    assert 0 == first.wait(timeout=30), first.log()
    released = client.get_job(job.id)
    assert (JobStatus.PENDING, 0) == (released.status, released.num_failures)
    url = file_storage.storage.url(file_storage.bucket, "ckpt/")
    saved = Checkpointer(url).latest_step()
    assert saved is not None, first.log()
    assert 0 < saved < 400

    start_worker("w2", storage_url=file_storage.url)
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert JobStatus.COMPLETED == done.status
    result = json.loads((marks / "result.json").read_text())
    assert {"done": 400, "starts": [0, saved]} == result
