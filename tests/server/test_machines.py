"""
Machine reputation: the per-machine record kept with each job transition,
quarantine, GET /machines (and its scoping), unserved groups, and placement.

Every test runs on SQLite and on PostgreSQL (the ``api`` fixture), each with a
fresh user, so that its machines start with an empty record.
"""

from __future__ import annotations

from typing import Any

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.errors import ConfigError, MachineQuarantined
from kelpie_sdk.models import QUARANTINE_HEADER, MachineTable
from kelpie_sdk.server import ReputationPolicy

from .helpers import report, sync_job

#: The session server's policy (the defaults).
POLICY = ReputationPolicy()


def _claim(api: Any, group: str, machine: str) -> dict[str, Any] | None:
    r = api.get("/work", params={"machine_id": machine, "container_group_id": group})
    assert 200 == r.status_code, r.text
    jobs = r.json()
    return jobs[0] if jobs else None


def _machines(api: Any) -> dict[str, dict[str, Any]]:
    r = api.get("/machines")
    assert 200 == r.status_code, r.text
    return {m["machine_id"]: m for m in r.json()["machines"]}


def _counts(record: dict[str, Any]) -> tuple[int, ...]:
    return tuple(
        record[k]
        for k in ("claims", "completions", "failures", "failed_jobs", "interruptions")
    )


def _fail(api: Any, group: str, machine: str) -> str:
    job = _claim(api, group, machine)
    assert job is not None
    r = api.post(f"/jobs/{job['id']}/failed", json=report(machine, group))
    assert 202 == r.status_code, r.text
    return str(job["id"])


# -- the record ---------------------------------------------------------------------


def test_each_transition_updates_the_machine_record(
    api: Any, container_group_id: str
) -> None:
    """Claim, completion, failure and release each count, with the job it runs."""
    g = container_group_id
    assert {} == _machines(api)
    api.post("/jobs/batch", json=[sync_job(g, max_failures=5)] * 3)

    first = _claim(api, g, "m1")
    assert first is not None
    record = _machines(api)["m1"]
    assert (1, 0, 0, 0, 0) == _counts(record)
    assert (g, first["id"], True) == (
        record["container_group_id"],
        record["job_id"],
        record["live"],
    )
    api.post(f"/jobs/{first['id']}/completed", json=report("m1", g))
    record = _machines(api)["m1"]
    assert (1, 1, 0, 0, 0) == _counts(record)
    assert record["job_id"] is None

    _fail(api, g, "m1")
    assert (2, 1, 1, 1, 0) == _counts(_machines(api)["m1"])

    third = _claim(api, g, "m1")
    assert third is not None
    api.post(f"/jobs/{third['id']}/release", json=report("m1", g))
    record = _machines(api)["m1"]
    assert (3, 1, 1, 1, 1) == _counts(record)
    # A release ends the machine's run: its observed uptime starts again.
    assert 0.0 == record["uptime_seconds"]
    assert record["quarantined_until"] is None


def test_a_lease_takeover_counts_against_the_holder(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """The machine whose lease expired is interrupted; the claimer has a claim."""
    g = container_group_id
    api.post("/jobs", json=sync_job(g, heartbeat_interval=5))
    assert _claim(api, g, "gone") is not None
    server_clock.advance(11)
    assert _claim(api, g, "next") is not None
    machines = _machines(api)
    assert (1, 0, 0, 0, 1) == _counts(machines["gone"])
    assert 0.0 == machines["gone"]["uptime_seconds"]
    assert (1, 0, 0, 0, 0) == _counts(machines["next"])
    assert machines["gone"]["job_id"] is None


def test_observed_uptime_runs_from_the_first_contact_of_the_run(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """Uptime is the time from the run's first contact to its latest one."""
    g = container_group_id
    api.post("/jobs/batch", json=[sync_job(g, heartbeat_interval=600)] * 2)
    job = _claim(api, g, "m1")
    assert job is not None
    server_clock.advance(100)
    api.post(f"/jobs/{job['id']}/completed", json=report("m1", g))
    assert 99 <= _machines(api)["m1"]["uptime_seconds"] <= 110


# -- quarantine ---------------------------------------------------------------------


def test_failures_on_different_jobs_quarantine_the_machine(
    api: Any, container_group_id: str
) -> None:
    """At the threshold the claim answers [] with the quarantine header, and
    the job stays in the queue for the other machines."""
    g = container_group_id
    api.post("/jobs/batch", json=[sync_job(g)] * (POLICY.quarantine_failures + 1))
    for _ in range(POLICY.quarantine_failures - 1):
        _fail(api, g, "bad")
    r = api.get("/work", params={"machine_id": "bad", "container_group_id": g})
    assert QUARANTINE_HEADER not in r.headers
    held = r.json()[0]
    api.post(f"/jobs/{held['id']}/failed", json=report("bad", g))

    r = api.get("/work", params={"machine_id": "bad", "container_group_id": g})
    # What the original worker reads: 200 and an empty list, i.e. no work.
    assert (200, []) == (r.status_code, r.json())
    assert r.headers[QUARANTINE_HEADER]
    record = _machines(api)["bad"]
    assert record["quarantined_until"] == r.headers[QUARANTINE_HEADER]
    assert record["live"] is False
    assert (
        POLICY.quarantine_failures,
        POLICY.quarantine_failures,
    ) == (record["failures"], record["failed_jobs"])
    # A long poll is not held either.
    r = api.get(
        "/work", params={"machine_id": "bad", "container_group_id": g, "wait": 30}
    )
    assert [] == r.json()
    assert QUARANTINE_HEADER in r.headers
    # Another machine still gets the jobs.
    assert _claim(api, g, "good") is not None


def test_a_low_failure_rate_is_not_quarantined(
    api: Any, container_group_id: str
) -> None:
    """A machine that completes most of its jobs keeps working after failures."""
    g = container_group_id
    n = POLICY.quarantine_failures
    api.post("/jobs/batch", json=[sync_job(g)] * (3 * n))
    for _ in range(2 * n):
        job = _claim(api, g, "m")
        assert job is not None
        api.post(f"/jobs/{job['id']}/completed", json=report("m", g))
    for _ in range(n):
        _fail(api, g, "m")
    assert _machines(api)["m"]["quarantined_until"] is None
    api.post("/jobs", json=sync_job(g))
    assert _claim(api, g, "m") is not None


def test_quarantine_expires(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """After the quarantine's duration the machine gets work again."""
    g = container_group_id
    api.post("/jobs/batch", json=[sync_job(g)] * (POLICY.quarantine_failures + 1))
    for _ in range(POLICY.quarantine_failures):
        _fail(api, g, "bad")
    assert _claim(api, g, "bad") is None
    server_clock.advance(POLICY.quarantine_seconds + 1)
    r = api.get("/work", params={"machine_id": "bad", "container_group_id": g})
    assert QUARANTINE_HEADER not in r.headers
    assert 1 == len(r.json())
    assert _machines(api)["bad"]["quarantined_until"] is None


def test_the_client_raises_machine_quarantined(
    api_server: Any, api: Any, user_key: str, container_group_id: str
) -> None:
    """Client.claim_work turns the header into MachineQuarantined."""
    g = container_group_id
    api.post("/jobs/batch", json=[sync_job(g)] * (POLICY.quarantine_failures + 1))
    for _ in range(POLICY.quarantine_failures):
        _fail(api, g, "bad")
    with Client(api_server.url, user_key) as client:
        with pytest.raises(MachineQuarantined, match="quarantined machine 'bad'"):
            client.claim_work(machine_id="bad", container_group_id=g)
        assert client.claim_work(machine_id="good", container_group_id=g) is not None


# -- GET /machines --------------------------------------------------------------------


def test_machines_are_scoped_to_the_user(
    api: Any, admin_api: Any, user_key: str, api_server: Any, container_group_id: str
) -> None:
    """Another user sees none of this user's machines; the admin sees them."""
    g = container_group_id
    api.post("/jobs", json=sync_job(g))
    assert _claim(api, g, "mine") is not None
    other = admin_api.post("/users", json={"username": f"other-{g}"}).json()
    other_key = admin_api.post(
        f"/users/{other['id']}/token", json={"org_name": "o", "project_name": "p"}
    ).json()["token"]
    with Client(api_server.url, other_key) as client:
        table = client.machines()
    assert () == table.machines
    assert {} == table.unserved
    admin = {
        (m["user_id"], m["machine_id"])
        for m in admin_api.get("/machines").json()["machines"]
    }
    with Client(api_server.url, user_key) as client:
        mine = client.machines()
    assert ["mine"] == [m.machine_id for m in mine.machines]
    assert (mine.machines[0].user_id, "mine") in admin


def test_groups_with_pending_jobs_and_no_live_machine_are_flagged(
    api: Any, container_group_id: str, server_clock: Any
) -> None:
    """Pending jobs and no live machine: the group is unserved until one claims."""
    g = container_group_id
    api.post("/jobs/batch", json=[sync_job(g, heartbeat_interval=5)] * 3)
    assert [{"container_group_id": g, "pending": 3}] == api.get("/machines").json()[
        "unserved_groups"
    ]
    assert _claim(api, g, "m1") is not None
    assert [] == api.get("/machines").json()["unserved_groups"]
    # The machine goes silent: its lease expires and it is not seen again.
    server_clock.advance(POLICY.live_seconds + 11)
    body = api.get("/machines").json()
    assert [{"container_group_id": g, "pending": 2}] == body["unserved_groups"]
    assert [False] == [m["live"] for m in body["machines"]]


def test_machine_table_round_trips() -> None:
    """The wire form parses back to the same table."""
    data = {
        "machines": [
            {
                "machine_id": "m",
                "user_id": "u",
                "container_group_id": "g",
                "first_seen": "2026-01-01T00:00:00.000Z",
                "last_seen": "2026-01-01T00:01:00.000Z",
                "job_id": None,
                "claims": 2,
                "completions": 1,
                "failures": 1,
                "failed_jobs": 1,
                "interruptions": 0,
                "uptime_seconds": 60.0,
                "quarantined_until": None,
                "live": True,
            }
        ],
        "unserved_groups": [{"container_group_id": "g2", "pending": 4}],
    }
    table = MachineTable.from_json(data)
    assert {"g2": 4} == table.unserved
    assert MachineTable.from_json(table.to_json()) == table


# -- placement ------------------------------------------------------------------------


def test_a_flaky_machine_takes_the_least_run_job_near_the_head(
    api: Any, container_group_id: str
) -> None:
    """A machine with many interruptions skips the resumed job at the head;
    a machine with a clean record takes the head (FIFO)."""
    g = container_group_id
    resumed = api.post("/jobs", json=sync_job(g, max_failures=9)).json()
    for _ in range(POLICY.flaky_interruptions):
        job = _claim(api, g, "flaky")
        assert job is not None
        assert resumed["id"] == job["id"]
        api.post(f"/jobs/{job['id']}/release", json=report("flaky", g))
    fresh = api.post("/jobs/batch", json=[sync_job(g)] * 2).json()
    # The queue: the resumed job (3 attempts) first, then two new ones.
    assert fresh[0]["id"] == _claim(api, g, "flaky")["id"]  # type: ignore[index]
    assert resumed["id"] == _claim(api, g, "steady")["id"]  # type: ignore[index]


def test_placement_looks_no_further_than_its_window(
    api: Any, container_group_id: str
) -> None:
    """A fresh job beyond the window stays there: the flaky machine takes the
    least-run job within the window, the head on a tie."""
    g = container_group_id
    elsewhere = f"{g}-elsewhere"
    api.post("/jobs", json=sync_job(elsewhere, max_failures=9))
    for _ in range(POLICY.flaky_interruptions):
        job = _claim(api, elsewhere, "flaky")
        assert job is not None
        api.post(f"/jobs/{job['id']}/release", json=report("flaky", elsewhere))
    window = api.post(
        "/jobs/batch", json=[sync_job(g)] * POLICY.placement_window
    ).json()
    # Each job of the window runs once (on its own machine) and comes back.
    for i, job in enumerate(window):
        assert job["id"] == _claim(api, g, f"h{i}")["id"]  # type: ignore[index]
    for i, job in enumerate(window):
        api.post(f"/jobs/{job['id']}/release", json=report(f"h{i}", g))
    beyond = api.post("/jobs", json=sync_job(g)).json()
    assert window[0]["id"] == _claim(api, g, "flaky")["id"]  # type: ignore[index]
    assert beyond["id"] != window[0]["id"]


# -- the policy's settings ------------------------------------------------------------


def test_policy_reads_the_environment() -> None:
    """Each setting has its variable; bad values are one-line ConfigErrors."""
    policy = ReputationPolicy.from_env(
        {"KELPIE_QUARANTINE_FAILURES": "5", "KELPIE_QUARANTINE_RATE": "0.8"}
    )
    assert (5, 0.8, 3) == (
        policy.quarantine_failures,
        policy.quarantine_rate,
        policy.quarantine_jobs,
    )
    with pytest.raises(ConfigError, match="KELPIE_PLACEMENT_WINDOW='x' is not an"):
        ReputationPolicy.from_env({"KELPIE_PLACEMENT_WINDOW": "x"})
    with pytest.raises(ConfigError, match="quarantine_rate"):
        ReputationPolicy.from_env({"KELPIE_QUARANTINE_RATE": "2"})
