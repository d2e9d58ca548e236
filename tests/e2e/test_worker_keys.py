"""
``kelpie worker`` with a worker key: it runs jobs, and the key does nothing else.
"""

from __future__ import annotations

import sys

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.errors import PermissionDeniedError
from kelpie_sdk.models import JobStatus
from kelpie_sdk.testing import ServerHandle

from .conftest import GROUP, StartWorker, wait_for


def test_a_worker_key_runs_jobs_with_our_worker(
    server: ServerHandle, client: Client, start_worker: StartWorker
) -> None:
    """A worker started with a worker key limited to its group completes a job."""
    made = client.create_key("worker", container_groups=[GROUP])
    assert made.key is not None
    start_worker(KELPIE_API_KEY=made.key)
    job = client.submit_job(
        command=sys.executable,
        arguments=["-c", "print('run by a worker key')"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert JobStatus.COMPLETED == done.status
    with Client(server.url, made.key) as worker:
        with pytest.raises(PermissionDeniedError):
            list(worker.list_jobs())
        with pytest.raises(PermissionDeniedError):
            worker.get_job(job.id)
        with pytest.raises(PermissionDeniedError):
            worker.cancel(job.id)
    assert made.id in [k.id for k in client.list_keys()]
    client.revoke_key(made.id)
    assert made.id not in [k.id for k in client.list_keys()]
