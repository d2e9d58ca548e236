"""
The original worker (0.7.1) against this server, reproduced with raw requests.

The original worker never sends ``attempt``, retries any non-2xx answer three
times, then throws and exits. A report for a job it no longer holds must
therefore be answered as the original API answers it.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from .helpers import report, sync_job


class OriginalWorkerCrashed(Exception):
    """The original worker's "Failed to fetch data" error, which ends its process."""


class OriginalWorker:
    """
    The original worker's report calls: no ``attempt``, 3 tries, then raise.
    """

    def __init__(self, api: Any, machine: str, group: str) -> None:
        self.api = api
        self.body = report(machine, group)
        self.sleeps: list[float] = []

    def _post(self, path: str) -> requests.Response:
        for attempt in range(1, 4):
            r: requests.Response = self.api.post(path, json=self.body)
            if r.ok:
                return r
            self.sleeps.append(attempt * 1.0)  # the original sleeps 1, 2, 3 s
        raise OriginalWorkerCrashed(f"Failed to fetch data: {path}")

    def claim(self) -> dict[str, Any] | None:
        r = self.api.get(
            "/work",
            params={
                "machine_id": self.body["machine_id"],
                "container_group_id": self.body["container_group_id"],
            },
        )
        jobs: list[dict[str, Any]] = r.json()
        return jobs[0] if jobs else None

    def heartbeat(self, job_id: str) -> str:
        return str(self._post(f"/jobs/{job_id}/heartbeat").json()["status"])

    def completed(self, job_id: str) -> requests.Response:
        return self._post(f"/jobs/{job_id}/completed")

    def failed(self, job_id: str) -> requests.Response:
        return self._post(f"/jobs/{job_id}/failed")


def test_cancel_then_complete(api: Any, container_group_id: str) -> None:
    """A job canceled while its command still exits 0: the report is answered as the original does, and the job stays canceled."""
    worker = OriginalWorker(api, "m1", container_group_id)
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert job["id"] == worker.claim()["id"]  # type: ignore[index]
    api.delete(f"/jobs/{job['id']}")

    r = worker.completed(job["id"])

    assert (200, {"message": "Completed reported"}, []) == (
        r.status_code,
        r.json(),
        worker.sleeps,
    )
    assert "canceled" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_cancel_then_fail(api: Any, container_group_id: str) -> None:
    """A job canceled while its command exits non-zero: 202 as the original, no failure counted, no ban."""
    worker = OriginalWorker(api, "m1", container_group_id)
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    worker.claim()
    api.delete(f"/jobs/{job['id']}")

    r = worker.failed(job["id"])

    assert (202, {"message": "Failure reported"}, []) == (
        r.status_code,
        r.json(),
        worker.sleeps,
    )
    after = api.get(f"/jobs/{job['id']}").json()
    assert ("canceled", 0, None) == (
        after["status"],
        after["num_failures"],
        after.get("last_error"),
    )


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_reclaimed_by_another_machine(
    api: Any, container_group_id: str, server_clock: Any, outcome: str
) -> None:
    """A partitioned worker that comes back after its lease was taken over: its report changes nothing and does not crash it."""
    stale = OriginalWorker(api, "m1", container_group_id)
    fresh = OriginalWorker(api, "m2", container_group_id)
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=5)
    ).json()
    stale.claim()
    server_clock.advance(11)
    assert job["id"] == fresh.claim()["id"]  # type: ignore[index]
    assert "canceled" == stale.heartbeat(job["id"])

    getattr(stale, outcome)(job["id"])

    after = api.get(f"/jobs/{job['id']}").json()
    assert ("running", "m2", 2, 0) == (
        after["status"],
        after["machine_id"],
        after["attempt"],
        after["num_failures"],
    )
    assert [] == stale.sleeps
    assert "running" == fresh.heartbeat(job["id"])
    fresh.completed(job["id"])
    assert "completed" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_stale_report_is_logged(
    api: Any, container_group_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ignored report leaves a warning in the server's log naming the job and machine."""
    worker = OriginalWorker(api, "m1", container_group_id)
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    worker.claim()
    api.delete(f"/jobs/{job['id']}")

    with caplog.at_level("WARNING", logger="kelpie_sdk.server"):
        worker.completed(job["id"])

    assert any(
        job["id"] in rec.getMessage() and "m1" in rec.getMessage()
        for rec in caplog.records
    ), caplog.text


@pytest.mark.parametrize("verb", ["completed", "failed", "release"])
def test_report_with_attempt_keeps_the_409(
    api: Any, container_group_id: str, verb: str
) -> None:
    """A worker that sends its attempt is told plainly that it lost the job."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    OriginalWorker(api, "m1", container_group_id).claim()
    api.delete(f"/jobs/{job['id']}")

    r = api.post(
        f"/jobs/{job['id']}/{verb}", json=report("m1", container_group_id, attempt=1)
    )

    assert 409 == r.status_code
    assert "canceled" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_completed_for_a_deleted_job(container_group_id: str) -> None:
    """The admin deletes every job while the original worker runs one: its /completed gets the original's 200, /failed its 404 (as the original), and with ``attempt`` /completed is a 404."""
    from kelpie_sdk.testing import run_server

    from ..conftest import Api

    with run_server() as server:
        admin = Api(server.url, server.admin_key)
        worker = OriginalWorker(admin, "m1", container_group_id)
        job = admin.post("/jobs", json=sync_job(container_group_id)).json()
        assert job["id"] == worker.claim()["id"]  # type: ignore[index]
        assert admin.delete("/jobs").ok

        r = worker.completed(job["id"])

        assert (200, {"message": "Completed reported"}, []) == (
            r.status_code,
            r.json(),
            worker.sleeps,
        )
        assert 404 == admin.get(f"/jobs/{job['id']}").status_code
        assert (
            404 == admin.post(f"/jobs/{job['id']}/failed", json=worker.body).status_code
        )
        with_attempt = report("m1", container_group_id, attempt=1)
        assert (
            404
            == admin.post(f"/jobs/{job['id']}/completed", json=with_attempt).status_code
        )
