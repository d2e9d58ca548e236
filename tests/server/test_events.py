"""
The event history (GET /jobs/{id}/events), goodput, and job names and tags.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from .helpers import report, sync_job


def claim(api: Any, group: str, machine: str = "m1") -> dict[str, Any] | None:
    r = api.get("/work", params={"machine_id": machine, "container_group_id": group})
    assert 200 == r.status_code, r.text
    jobs = r.json()
    return jobs[0] if jobs else None


def events(api: Any, job_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/jobs/{job_id}/events")
    assert 200 == r.status_code, r.text
    body = r.json()
    assert body["_count"] == len(body["events"])
    return list(body["events"])


def kinds(api: Any, job_id: str) -> list[tuple[str, int | None, str | None]]:
    return [(e["kind"], e["attempt"], e["machine_id"]) for e in events(api, job_id)]


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_submitted_then_claimed_then_completed(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """A job's history reads submitted, claimed, completed, with the attempt's compute."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert [("submitted", None, None)] == kinds(api, job["id"])
    claim(api, container_group_id, "m1")
    server_clock.advance(7)
    r = api.post(f"/jobs/{job['id']}/completed", json=report("m1", container_group_id))
    assert 200 == r.status_code, r.text
    got = events(api, job["id"])
    assert [
        ("submitted", None, None),
        ("claimed", 1, "m1"),
        ("completed", 1, "m1"),
    ] == [(e["kind"], e["attempt"], e["machine_id"]) for e in got]
    assert got[0]["seq"] < got[1]["seq"] < got[2]["seq"]
    assert 7 <= got[2]["details"]["compute_seconds"] < 9
    assert 0 == got[2]["details"]["lost_seconds"]
    assert 1.0 == api.get(f"/jobs/{job['id']}").json()["goodput"]


def test_batch_submission_records_each_job(api: Any, container_group_id: str) -> None:
    """Every job of a batch gets its own submitted event."""
    jobs = api.post("/jobs/batch", json=[sync_job(container_group_id)] * 3).json()
    for job in jobs:
        (only,) = events(api, job["id"])
        assert ("submitted", {"batch": 3}) == (only["kind"], only["details"])


def test_failure_records_failed_banned_requeued_then_final(
    api: Any, container_group_id: str
) -> None:
    """A failure below max_failures bans and requeues; the last one is final."""
    job = api.post("/jobs", json=sync_job(container_group_id, max_failures=2)).json()
    claim(api, container_group_id, "m1")
    api.post(
        f"/jobs/{job['id']}/failed",
        json=report("m1", container_group_id, exit_code=3, error="boom\nlast line"),
    )
    claim(api, container_group_id, "m2")
    api.post(f"/jobs/{job['id']}/failed", json=report("m2", container_group_id))
    got = events(api, job["id"])
    assert [
        ("submitted", None, None),
        ("claimed", 1, "m1"),
        ("failed", 1, "m1"),
        ("banned", 1, "m1"),
        ("requeued", 1, "m1"),
        ("claimed", 2, "m2"),
        ("failed", 2, "m2"),
        ("banned", 2, "m2"),
    ] == [(e["kind"], e["attempt"], e["machine_id"]) for e in got]
    first, second = got[2]["details"], got[6]["details"]
    assert (3, "boom\nlast line") == (first["exit_code"], first["error"])
    assert 1 == got[4]["details"]["remaining"]
    assert "final" not in first
    assert second["final"] is True
    assert "exited with code" not in (second["error"] or "")
    assert first["compute_seconds"] == first["lost_seconds"]  # no checkpoint


def test_release_records_reason_and_compute_lost_since_checkpoint(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """A release keeps the worker's reason; compute after the checkpoint is lost."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    server_clock.advance(10)
    progress = {"step": 5, "checkpoint_time": iso(server_clock())}
    api.post(
        f"/jobs/{job['id']}/heartbeat",
        json=report("m1", container_group_id, progress=progress),
    )
    server_clock.advance(4)
    r = api.post(
        f"/jobs/{job['id']}/release",
        json=report("m1", container_group_id, reason="exit code 85"),
    )
    assert 200 == r.status_code, r.text
    released = events(api, job["id"])[-1]
    assert ("released", 1, "m1") == (
        released["kind"],
        released["attempt"],
        released["machine_id"],
    )
    details = released["details"]
    assert "exit code 85" == details["reason"]
    assert 14 <= details["compute_seconds"] < 16
    assert 4 <= details["lost_seconds"] < 5
    goodput = api.get(f"/jobs/{job['id']}").json()["goodput"]
    assert 0.6 < goodput < 0.75


def test_lease_expiry_is_recorded_when_another_machine_takes_over(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """The takeover claim records the old attempt's expiry and its lost compute."""
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=5)
    ).json()
    claim(api, container_group_id, "m1")
    server_clock.advance(3)
    progress = {"step": 1, "checkpoint_time": iso(server_clock())}
    api.post(
        f"/jobs/{job['id']}/heartbeat",
        json=report("m1", container_group_id, progress=progress),
    )
    server_clock.advance(3)
    api.post(f"/jobs/{job['id']}/heartbeat", json=report("m1", container_group_id))
    server_clock.advance(11)
    taken = claim(api, container_group_id, "m2")
    assert taken is not None
    assert job["id"] == taken["id"]
    got = events(api, job["id"])
    assert [
        ("submitted", None, None),
        ("claimed", 1, "m1"),
        ("lease_expired", 1, "m1"),
        ("claimed", 2, "m2"),
    ] == [(e["kind"], e["attempt"], e["machine_id"]) for e in got]
    details = got[2]["details"]
    # The attempt ended at its last heartbeat, 3 s after its checkpoint.
    assert 6 <= details["compute_seconds"] < 7
    assert 3 <= details["lost_seconds"] < 4
    assert details["last_heartbeat"] is not None


def test_cancel_records_who(api: Any, admin_api: Any, container_group_id: str) -> None:
    """A cancel names the user (or the admin) and ends the running attempt."""
    mine = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    other = api.post("/jobs", json=sync_job(container_group_id)).json()
    user_id = api.get("/users/me").json()["id"]
    assert 202 == api.delete(f"/jobs/{mine['id']}").status_code
    assert 202 == admin_api.delete(f"/jobs/{other['id']}").status_code
    canceled = events(api, mine["id"])[-1]
    assert ("canceled", 1, "m1", user_id) == (
        canceled["kind"],
        canceled["attempt"],
        canceled["machine_id"],
        canceled["details"]["by"],
    )
    assert "compute_seconds" in canceled["details"]
    by_admin = events(api, other["id"])[-1]
    assert ("canceled", None, "admin") == (
        by_admin["kind"],
        by_admin["attempt"],
        by_admin["details"]["by"],
    )


def test_purge_deletes_pending_histories_and_records_canceled_ones(
    api: Any, container_group_id: str
) -> None:
    """Purged pending jobs are gone with their events; running ones are canceled."""
    running = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    pending = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.delete(f"/jobs/container-groups/{container_group_id}")
    assert 404 == api.get(f"/jobs/{pending['id']}/events").status_code
    last = events(api, running["id"])[-1]
    assert ("canceled", "purge") == (last["kind"], last["details"]["via"])


def test_events_are_tenant_isolated(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """Another user gets a 404; the admin may read any job's history."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    user = admin_api.post("/users", json={"username": f"u-{job['id']}"}).json()
    key = admin_api.post(f"/users/{user['id']}/token", json={}).json()["token"]
    stranger = type(api)(api.url, key)
    assert 404 == stranger.get(f"/jobs/{job['id']}/events").status_code
    assert 404 == api.get("/jobs/no-such-job/events").status_code
    assert 1 == admin_api.get(f"/jobs/{job['id']}/events").json()["_count"]


def test_stale_reports_record_nothing(api: Any, container_group_id: str) -> None:
    """A report from a machine that does not hold the job adds no event."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claim(api, container_group_id, "m1")
    for path in ("failed", "release", "completed"):
        # (A stale failure report is answered as a success, as by the original.)
        api.post(f"/jobs/{job['id']}/{path}", json=report("m9", container_group_id))
    assert ["submitted", "claimed"] == [e["kind"] for e in events(api, job["id"])]


# -- names and tags ---------------------------------------------------------------


def test_name_and_tags_are_stored_and_filtered(
    api: Any, container_group_id: str
) -> None:
    """Jobs carry a name and tags; list filters by exact name and by every tag."""
    body = sync_job(container_group_id)
    a = api.post("/jobs", json={**body, "name": "train", "tags": ["gpu", "v=2"]}).json()
    b = api.post("/jobs", json={**body, "name": "train", "tags": ["gpu"]}).json()
    c = api.post("/jobs", json={**body, "name": "eval", "tags": ["GPU"]}).json()
    plain = api.post("/jobs", json=body).json()
    assert ("train", ["gpu", "v=2"]) == (a["name"], a["tags"])
    assert [] == plain["tags"]
    assert "name" not in plain

    def ids(**params: Any) -> list[str]:
        r = api.get(
            "/jobs", params={"container_group_id": container_group_id, **params}
        )
        assert 200 == r.status_code, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert [b["id"], a["id"]] == ids(name="train")
    assert [b["id"], a["id"]] == ids(tag="gpu")
    assert [c["id"]] == ids(tag="GPU")
    assert [a["id"]] == ids(tag=["gpu", "v=2"])
    assert [a["id"]] == ids(name="train", tag="v=2")
    assert [] == ids(name="Train")
    assert [] == ids(tag="v")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"name": ""}, "name must be"),
        ({"name": "x" * 201}, "name must be"),
        ({"name": "a\nb"}, "control characters"),
        ({"tags": ["has space"]}, "is not valid"),
        ({"tags": ['qu"ote']}, "is not valid"),
        ({"tags": ["t"] * 21}, "at most 20 tags"),
        ({"tags": "gpu"}, "Expected `array`"),
    ],
    ids=str,
)
def test_invalid_names_and_tags_are_400s(
    api: Any, container_group_id: str, extra: dict[str, Any], message: str
) -> None:
    """Names and tags are bounded and validated, with a message that says how."""
    r = api.post("/jobs", json={**sync_job(container_group_id), **extra})
    assert 400 == r.status_code, r.text
    assert message in r.text


def test_invalid_tag_filter_is_a_400(api: Any) -> None:
    """A tag filter that no tag could match is refused, not answered empty."""
    r = api.get("/jobs", params={"tag": "has space"})
    assert 400 == r.status_code
    assert "is not valid" in r.text
