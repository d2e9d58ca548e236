"""
The light progress report and the holder's status long poll, which carry
progress and cancellation between heartbeats.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from .helpers import report, sync_job


def claimed_job(api: Any, group: str, machine: str = "m1", **extra: Any) -> str:
    job = api.post("/jobs", json=sync_job(group, **extra)).json()
    got = api.get(
        "/work", params={"machine_id": machine, "container_group_id": group}
    ).json()
    assert [job["id"]] == [j["id"] for j in got]
    return str(job["id"])


def status(api: Any, job_id: str, **params: Any) -> Any:
    return api.get(f"/jobs/{job_id}/status", params=params)


def test_progress_from_the_holder_is_stored_without_touching_the_lease(
    api: Any, container_group_id: str
) -> None:
    """A progress report updates progress only: no heartbeat counted, lease unchanged."""
    job_id = claimed_job(api, container_group_id)
    before = api.get(f"/jobs/{job_id}").json()
    progress = {"step": 2, "total": 4, "metrics": {"loss": 0.5}}
    r = api.post(
        f"/jobs/{job_id}/progress",
        json=report("m1", container_group_id, attempt=1, progress=progress),
    )
    assert (200, {"status": "running"}) == (r.status_code, r.json())
    after = api.get(f"/jobs/{job_id}").json()
    assert (progress, 0, before["lease_expires"]) == (
        after["progress"],
        after["num_heartbeats"],
        after["lease_expires"],
    )


def test_progress_from_anyone_else_is_refused_like_a_heartbeat(
    api: Any, container_group_id: str
) -> None:
    """A non-holder's progress is answered 'canceled' and not stored; unknown jobs are 404."""
    job_id = claimed_job(api, container_group_id)
    for body in (
        report("m2", container_group_id, progress={"step": 9}),
        report("m1", container_group_id, attempt=2, progress={"step": 9}),
    ):
        r = api.post(f"/jobs/{job_id}/progress", json=body)
        assert {"status": "canceled"} == r.json()
    assert None is api.get(f"/jobs/{job_id}").json().get("progress")
    api.delete(f"/jobs/{job_id}")
    r = api.post(
        f"/jobs/{job_id}/progress",
        json=report("m1", container_group_id, progress={"step": 1}),
    )
    assert {"status": "canceled"} == r.json()
    assert (
        404
        == api.post(
            "/jobs/nope/progress",
            json=report("m1", container_group_id, progress={"step": 1}),
        ).status_code
    )


def test_progress_report_needs_a_progress_record(
    api: Any, container_group_id: str
) -> None:
    """A progress report without a record is a 400 that says so."""
    job_id = claimed_job(api, container_group_id)
    r = api.post(f"/jobs/{job_id}/progress", json=report("m1", container_group_id))
    assert 400 == r.status_code
    assert "progress" in r.json()["message"]


def test_status_answers_the_holder_at_once_without_wait(
    api: Any, container_group_id: str
) -> None:
    """Without wait the status is answered at once: running for the holder, canceled for others."""
    job_id = claimed_job(api, container_group_id)
    assert {"status": "running"} == status(api, job_id, machine_id="m1").json()
    assert {"status": "running"} == status(
        api, job_id, machine_id="m1", attempt=1
    ).json()
    assert {"status": "canceled"} == status(
        api, job_id, machine_id="m1", attempt=2
    ).json()
    started = time.monotonic()
    assert {"status": "canceled"} == status(
        api, job_id, machine_id="m2", wait=20
    ).json()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/jobs/{id}/status", {}),
        ("/jobs/{id}/status", {"machine_id": ""}),
        ("/jobs/{id}/status", {"machine_id": "m1", "wait": "61"}),
        ("/jobs/{id}/status", {"machine_id": "m1", "wait": "-1"}),
        ("/jobs/{id}/status", {"machine_id": "m1", "attempt": "x"}),
    ],
    ids=str,
)
def test_status_parameters_are_validated(
    api: Any, container_group_id: str, path: str, params: dict[str, str]
) -> None:
    """A missing machine_id or a bad wait or attempt is a 400."""
    job_id = claimed_job(api, container_group_id)
    assert 400 == api.get(path.format(id=job_id), params=params).status_code


def test_status_of_unknown_job_is_404(api: Any) -> None:
    """An unknown job is a 404."""
    assert 404 == status(api, "nope", machine_id="m1").status_code


def _poll_in_background(api: Any, job_id: str, **params: Any) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        box["answer"] = status(api, job_id, **params).json()
        box["ended"] = time.monotonic()
        box["took"] = box["ended"] - started

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def test_status_long_poll_returns_at_once_on_cancel(
    api: Any, container_group_id: str
) -> None:
    """The holder's long poll answers 'canceled' as soon as the job is canceled."""
    job_id = claimed_job(api, container_group_id)
    box = _poll_in_background(api, job_id, machine_id="m1", attempt=1, wait=30)
    time.sleep(0.5)
    assert "answer" not in box
    canceled_at = time.monotonic()
    api.delete(f"/jobs/{job_id}")
    box["thread"].join(timeout=30)
    assert {"status": "canceled"} == box["answer"]
    assert box["ended"] - canceled_at < 2.0


def test_status_long_poll_returns_at_once_when_reclaimed(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """A holder whose lease was taken over by another machine learns it at once."""
    job_id = claimed_job(api, container_group_id, heartbeat_interval=5)
    box = _poll_in_background(api, job_id, machine_id="m1", attempt=1, wait=30)
    time.sleep(0.5)
    server_clock.advance(11)
    taken_at = time.monotonic()
    got = api.get(
        "/work", params={"machine_id": "m2", "container_group_id": container_group_id}
    ).json()
    assert [job_id] == [j["id"] for j in got]
    box["thread"].join(timeout=30)
    assert {"status": "canceled"} == box["answer"]
    assert box["ended"] - taken_at < 2.0


def test_status_long_poll_sees_the_holder_complete(
    api: Any, container_group_id: str
) -> None:
    """The long poll answers the final status when the job ends."""
    job_id = claimed_job(api, container_group_id)
    box = _poll_in_background(api, job_id, machine_id="m1", wait=30)
    time.sleep(0.5)
    api.post(f"/jobs/{job_id}/completed", json=report("m1", container_group_id))
    box["thread"].join(timeout=30)
    assert ({"status": "completed"}, True) == (box["answer"], box["took"] < 5)


def test_status_long_poll_times_out_running(api: Any, container_group_id: str) -> None:
    """With nothing happening the long poll answers 'running' after about wait seconds."""
    job_id = claimed_job(api, container_group_id)
    started = time.monotonic()
    assert {"status": "running"} == status(
        api, job_id, machine_id="m1", wait=1.5
    ).json()
    assert 1.4 <= time.monotonic() - started < 10
