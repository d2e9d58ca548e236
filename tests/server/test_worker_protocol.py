"""
The worker protocol: atomic claims, leases, fencing, failures, bans, releases.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from .helpers import report, sync_job


def claim(
    api: Any, group: str, machine: str = "m1", **params: Any
) -> dict[str, Any] | None:
    r = api.get(
        "/work", params={"machine_id": machine, "container_group_id": group, **params}
    )
    assert 200 == r.status_code, r.text
    jobs = r.json()
    assert len(jobs) <= 1
    return jobs[0] if jobs else None


def test_claim_hands_out_running_job_with_attempt_and_lease(
    api: Any, container_group_id: str
) -> None:
    """A claim returns one running job, attempt 1, with a lease of 2x the interval."""
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=10)
    ).json()
    got = claim(api, container_group_id)
    assert got is not None
    assert (job["id"], "running", "m1", 1, 0) == (
        got["id"],
        got["status"],
        got["machine_id"],
        got["attempt"],
        got["num_interruptions"],
    )
    assert "started" in got
    assert "heartbeat" in got
    assert None is claim(api, container_group_id)


def test_claim_is_fifo(api: Any, container_group_id: str) -> None:
    """Jobs are handed out in submission order, batches included."""
    ids = [
        j["id"]
        for j in api.post("/jobs/batch", json=[sync_job(container_group_id)] * 5).json()
    ]
    assert ids == [claim(api, container_group_id)["id"] for _ in ids]  # type: ignore[index]


def test_claim_is_per_queue_and_per_user(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """A claim only sees the caller's jobs in the named group."""
    api.post("/jobs", json=sync_job(container_group_id))
    assert None is claim(api, "another-group")
    assert None is claim(admin_api, container_group_id)
    assert claim(api, container_group_id) is not None


@pytest.mark.parametrize(
    "params",
    [
        {"container_group_id": "g"},
        {"machine_id": "m"},
        {"machine_id": "", "container_group_id": "g"},
        {"machine_id": "m", "container_group_id": "g", "wait": 61},
        {"machine_id": "m", "container_group_id": "g", "wait": "soon"},
    ],
    ids=str,
)
def test_claim_parameters_are_validated(api: Any, params: dict[str, Any]) -> None:
    """Missing ids and out-of-range waits are 400s."""
    assert 400 == api.get("/work", params=params).status_code


def test_heartbeat_from_holder_and_others(api: Any, container_group_id: str) -> None:
    """The holder's heartbeat counts; anyone else is told 'canceled'."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claimed = claim(api, container_group_id)
    url = f"/jobs/{job['id']}/heartbeat"
    assert {"status": "running"} == api.post(
        url, json=report("m1", container_group_id)
    ).json()
    assert {"status": "running"} == api.post(
        url, json=report("m1", container_group_id, attempt=1)
    ).json()
    assert {"status": "canceled"} == api.post(
        url, json=report("m2", container_group_id)
    ).json()
    assert {"status": "canceled"} == api.post(
        url, json=report("m1", container_group_id, attempt=7)
    ).json()
    after = api.get(f"/jobs/{job['id']}").json()
    assert 2 == after["num_heartbeats"]
    assert after["lease_expires"] >= claimed["lease_expires"]  # type: ignore[index]
    assert (
        404
        == api.post(
            "/jobs/nope/heartbeat", json=report("m1", container_group_id)
        ).status_code
    )


def test_heartbeat_stores_progress(api: Any, container_group_id: str) -> None:
    """A progress record sent with a heartbeat is returned on the job."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id)
    progress = {"step": 5, "total": 10, "fraction": 0.5, "metrics": {"loss": 0.25}}
    api.post(
        f"/jobs/{job['id']}/heartbeat",
        json=report("m1", container_group_id, progress=progress),
    )
    assert progress == api.get(f"/jobs/{job['id']}").json()["progress"]


def test_heartbeat_error_is_the_running_jobs_last_error(
    api: Any, container_group_id: str
) -> None:
    """A warning sent with a heartbeat shows as last_error; later ones keep it."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id)
    url = f"/jobs/{job['id']}/heartbeat"
    note = "checkpoints will not survive the node"
    api.post(url, json=report("m1", container_group_id, error=note))
    api.post(url, json=report("m1", container_group_id))
    after = api.get(f"/jobs/{job['id']}").json()
    assert ("running", note) == (after["status"], after["last_error"])
    other = api.post(url, json=report("m2", container_group_id, error="not mine"))
    assert "canceled" == other.json()["status"]
    assert note == api.get(f"/jobs/{job['id']}").json()["last_error"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"machine_id": 1, "container_group_id": "g"},
        {"machine_id": "", "container_group_id": "g"},
        {"machine_id": "m", "container_group_id": "g", "attempt": "1"},
    ],
    ids=str,
)
def test_reports_are_validated(
    api: Any, container_group_id: str, body: dict[str, Any]
) -> None:
    """Worker reports with missing or mistyped fields are 400s."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert 400 == api.post(f"/jobs/{job['id']}/heartbeat", json=body).status_code


def test_only_the_holder_completes(api: Any, container_group_id: str) -> None:
    """Completion from another machine is 409; the holder's is accepted, and repeatable."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id)
    url = f"/jobs/{job['id']}/completed"
    assert (
        409
        == api.post(url, json=report("m2", container_group_id, attempt=1)).status_code
    )
    assert "running" == api.get(f"/jobs/{job['id']}").json()["status"]
    r = api.post(url, json=report("m1", container_group_id))
    assert (200, {"message": "Completed reported"}) == (r.status_code, r.json())
    assert 200 == api.post(url, json=report("m1", container_group_id)).status_code
    done = api.get(f"/jobs/{job['id']}").json()
    assert ("completed", "completed" in done) == (done["status"], True)
    assert {"status": "completed"} == api.post(
        f"/jobs/{job['id']}/heartbeat", json=report("m1", container_group_id)
    ).json()


def test_pending_job_cannot_be_completed(api: Any, container_group_id: str) -> None:
    """Completion of a job nobody claimed is a 409, not a silent state change."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/completed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )
    assert (
        404
        == api.post(
            "/jobs/nope/completed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )


def test_canceled_job_stays_canceled(api: Any, container_group_id: str) -> None:
    """A canceled job cannot be completed or failed by its former holder."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id)
    api.delete(f"/jobs/{job['id']}")
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/completed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/failed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )
    assert "canceled" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_failure_below_threshold_requeues_and_bans(
    api: Any, container_group_id: str
) -> None:
    """A failure requeues the job at once for other machines, never for the failed one."""
    job = api.post("/jobs", json=sync_job(container_group_id, max_failures=3)).json()
    claim(api, container_group_id, "m1")
    r = api.post(
        f"/jobs/{job['id']}/failed",
        json=report("m1", container_group_id, exit_code=2, error="Traceback: boom"),
    )
    assert (202, {"message": "Failure reported"}) == (r.status_code, r.json())
    after = api.get(f"/jobs/{job['id']}").json()
    assert ("pending", 1, "Traceback: boom") == (
        after["status"],
        after["num_failures"],
        after["last_error"],
    )
    assert None is claim(api, container_group_id, "m1")
    again = claim(api, container_group_id, "m2")
    assert (job["id"], 2) == (again["id"], again["attempt"])  # type: ignore[index]


def test_failure_at_threshold_fails_the_job(api: Any, container_group_id: str) -> None:
    """The max_failures-th failure is final."""
    job = api.post("/jobs", json=sync_job(container_group_id, max_failures=2)).json()
    for machine in ("m1", "m2"):
        claim(api, container_group_id, machine)
        api.post(
            f"/jobs/{job['id']}/failed",
            json=report(machine, container_group_id, exit_code=1),
        )
    done = api.get(f"/jobs/{job['id']}").json()
    assert ("failed", 2, "exited with code 1") == (
        done["status"],
        done["num_failures"],
        done["last_error"],
    )
    assert "failed" in done
    assert None is claim(api, container_group_id, "m3")


def test_banned_jobs_do_not_hide_claimable_ones(
    api: Any, container_group_id: str
) -> None:
    """A machine banned from the oldest jobs still gets the next one (the original's W-6)."""
    # A record of successes elsewhere keeps its failure rate below quarantine.
    other = f"{container_group_id}-ok"
    for job in api.post("/jobs/batch", json=[sync_job(other)] * 7).json():
        assert job["id"] == claim(api, other, "m1")["id"]  # type: ignore[index]
        api.post(f"/jobs/{job['id']}/completed", json=report("m1", other))
    jobs = api.post("/jobs/batch", json=[sync_job(container_group_id)] * 7).json()
    for _ in range(6):
        got = claim(api, container_group_id, "m1")
        api.post(f"/jobs/{got['id']}/failed", json=report("m1", container_group_id))  # type: ignore[index]
    assert jobs[6]["id"] == claim(api, container_group_id, "m1")["id"]  # type: ignore[index]


def test_expired_lease_is_an_interruption_not_a_failure(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """After 2x the interval another machine takes the job; the old holder is fenced off."""
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=5, max_failures=1)
    ).json()
    claim(api, container_group_id, "m1")
    server_clock.advance(9)
    assert None is claim(api, container_group_id, "m2")
    server_clock.advance(2)
    taken = claim(api, container_group_id, "m2")
    assert (job["id"], 2, 1, 0) == (
        taken["id"],
        taken["attempt"],
        taken["num_interruptions"],
        taken["num_failures"],  # type: ignore[index]
    )
    hb = api.post(f"/jobs/{job['id']}/heartbeat", json=report("m1", container_group_id))
    assert {"status": "canceled"} == hb.json()
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/completed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/failed",
            json=report("m1", container_group_id, attempt=1),
        ).status_code
    )
    assert (
        200
        == api.post(
            f"/jobs/{job['id']}/completed", json=report("m2", container_group_id)
        ).status_code
    )


def test_interruptions_never_count_toward_max_failures(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """A job interrupted many times is still claimable with max_failures=1."""
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=1, max_failures=1)
    ).json()
    for n in range(1, 6):
        got = claim(api, container_group_id, f"m{n}")
        assert (job["id"], n) == (got["id"], got["attempt"])  # type: ignore[index]
        server_clock.advance(3)
    final = api.get(f"/jobs/{job['id']}").json()
    assert (4, 0, "running") == (
        final["num_interruptions"],
        final["num_failures"],
        final["status"],
    )


def test_stale_jobs_come_before_pending_ones(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """An interrupted job resumes before newer pending jobs start."""
    first = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=1)
    ).json()
    claim(api, container_group_id, "m1")
    api.post("/jobs", json=sync_job(container_group_id))
    server_clock.advance(3)
    assert first["id"] == claim(api, container_group_id, "m2")["id"]  # type: ignore[index]


def test_release_requeues_at_once_as_an_interruption(
    api: Any, container_group_id: str
) -> None:
    """A released job is pending again at once, counted as an interruption."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    assert (
        409
        == api.post(
            f"/jobs/{job['id']}/release",
            json=report("m2", container_group_id, attempt=1),
        ).status_code
    )
    r = api.post(
        f"/jobs/{job['id']}/release", json=report("m1", container_group_id, attempt=1)
    )
    assert (200, {"message": "Job released"}) == (r.status_code, r.json())
    after = api.get(f"/jobs/{job['id']}").json()
    assert ("pending", 1, 0) == (
        after["status"],
        after["num_interruptions"],
        after["num_failures"],
    )
    assert (job["id"], 2) == (lambda j: (j["id"], j["attempt"]))(
        claim(api, container_group_id, "m1")
    )
    assert (
        404
        == api.post(
            "/jobs/nope/release", json=report("m1", container_group_id)
        ).status_code
    )


def test_long_poll_returns_as_soon_as_a_job_arrives(
    api: Any, container_group_id: str
) -> None:
    """An idle claim with wait= returns the job submitted while it waits."""
    result: list[Any] = []
    poll = threading.Thread(
        target=lambda: result.append(claim(api, container_group_id, wait=10))
    )
    start = time.monotonic()
    poll.start()
    time.sleep(0.3)
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    poll.join(timeout=10)
    assert job["id"] == result[0]["id"]
    assert time.monotonic() - start < 3


def test_long_poll_times_out_empty(api: Any, container_group_id: str) -> None:
    """With nothing to do, a long poll answers [] after about `wait` seconds."""
    start = time.monotonic()
    assert None is claim(api, container_group_id, wait=0.5)
    assert 0.45 <= time.monotonic() - start < 3


def test_abandoned_long_poll_claims_nothing(
    api: Any, api_server: Any, user_key: str, container_group_id: str
) -> None:
    """A long poll whose client went away does not claim the next job."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(api_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=0.3)
    conn.request(
        "GET",
        f"/work?machine_id=gone&container_group_id={container_group_id}&wait=10",
        headers={"X-Kelpie-Key": user_key},
    )
    with pytest.raises(socket.timeout):
        conn.getresponse()
    conn.close()
    time.sleep(0.3)
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    time.sleep(1.5)
    after = api.get(f"/jobs/{job['id']}").json()
    assert ("pending", None) == (after["status"], after["machine_id"])


def test_release_wakes_a_long_poll_of_the_jobs_own_queue(
    api: Any, container_group_id: str
) -> None:
    """A release wakes the job's queue at once, whatever group the report names."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    result: list[Any] = []
    poll = threading.Thread(
        target=lambda: result.append(claim(api, container_group_id, "m2", wait=10))
    )
    poll.start()
    time.sleep(0.3)
    start = time.monotonic()
    api.post(f"/jobs/{job['id']}/release", json=report("m1", "some-other-group"))
    poll.join(timeout=10)
    assert job["id"] == result[0]["id"]
    assert time.monotonic() - start < 0.6


def test_store_changes_from_another_thread_wake_long_polls(
    api: Any, api_server: Any, container_group_id: str
) -> None:
    """Jobs inserted through the store from another thread wake a waiting claim."""
    from kelpie_sdk.models import JobSubmission, SyncSpec

    user_id = api.get("/users/me").json()["id"]
    result: list[Any] = []
    poll = threading.Thread(
        target=lambda: result.append(claim(api, container_group_id, wait=10))
    )
    poll.start()
    time.sleep(0.3)
    start = time.monotonic()
    (job,) = api_server.store.insert_jobs(
        user_id,
        [
            JobSubmission(
                command="x", container_group_id=container_group_id, sync=SyncSpec()
            )
        ],
    )
    poll.join(timeout=10)
    assert job.id == result[0]["id"]
    assert time.monotonic() - start < 0.6
