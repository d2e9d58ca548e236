"""
Concurrent claims over HTTP: every job is handed out exactly once.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest

from ..conftest import Api
from .helpers import report, sync_job

JOBS = 2000
THREADS = 16


@pytest.mark.slow
def test_sixteen_threads_never_double_claim_or_lose_a_job(
    api: Any, api_server: Any, user_key: str, container_group_id: str
) -> None:
    """16 threads claim and complete 2,000 jobs: no double claims, none lost."""
    submitted = []
    for _ in range(0, JOBS, 1000):
        batch = api.post("/jobs/batch", json=[sync_job(container_group_id)] * 1000)
        assert 202 == batch.status_code
        submitted += [j["id"] for j in batch.json()]
    claims: list[tuple[str, str]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        me = Api(api_server.url, user_key)
        machine = f"machine-{n}"
        params = {"machine_id": machine, "container_group_id": container_group_id}
        while True:
            got = me.get("/work", params=params).json()
            if not got:
                return
            job_id = got[0]["id"]
            with lock:
                claims.append((job_id, machine))
            done = me.post(
                f"/jobs/{job_id}/completed", json=report(machine, container_group_id)
            )
            if done.status_code != 200:
                with lock:
                    errors.append(f"{job_id}: {done.status_code} {done.text}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    counts = collections.Counter(job_id for job_id, _ in claims)
    assert [] == errors
    assert [] == [j for j, c in counts.items() if c > 1]
    assert set(submitted) == set(counts)
    assert JOBS == len(claims)
    assert len({m for _, m in claims}) > 1
    completed = api.get(
        "/jobs",
        params={
            "container_group_id": container_group_id,
            "status": "completed",
            "page_size": 1000,
        },
    ).json()["_count"]
    assert 1000 == completed
