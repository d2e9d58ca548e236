"""
`kelpie jobs events`, `--name`/`--tag`, and the client's events(), name and tags.
"""

from __future__ import annotations

from typing import Any

import pytest

from kelpie_sdk import Client
from kelpie_sdk.errors import NotFoundError
from kelpie_sdk.models import JobEvent, WorkerReport

from .test_cli import Run


@pytest.fixture
def kelpie(api_server: Any, user_key: str) -> Run:
    """`kelpie` as a fresh user."""
    return Run(api_server.url, user_key)


def _fail_once_then_complete(client: Client, group: str) -> str:
    job = client.submit_job(command="x", container_group_id=group, sync={})
    for machine, outcome in (("m1", "failed"), ("m2", "completed")):
        claimed = client.claim_work(machine_id=machine, container_group_id=group)
        assert claimed is not None
        report = WorkerReport(
            machine_id=machine,
            container_group_id=group,
            attempt=claimed.attempt,
            exit_code=None if outcome == "completed" else 7,
            error=None if outcome == "completed" else "out of memory",
        )
        if outcome == "failed":
            client.report_failed(job.id, report)
        else:
            client.report_completed(job.id, report)
    return job.id


def test_client_events_are_models(client: Client, container_group_id: str) -> None:
    """events() returns JobEvents in order, with a readable cause."""
    job_id = _fail_once_then_complete(client, container_group_id)
    events = client.events(job_id)
    assert all(isinstance(e, JobEvent) for e in events)
    assert [
        "submitted",
        "claimed",
        "failed",
        "banned",
        "requeued",
        "claimed",
        "completed",
    ] == [e.kind for e in events]
    assert "exit code 7; out of memory" == events[2].cause
    assert "2 failure(s) left" == events[4].cause
    assert JobEvent.from_json(events[2].to_json()) == events[2]
    with pytest.raises(NotFoundError):
        client.events("no-such-job")


def test_client_name_and_tags(client: Client, container_group_id: str) -> None:
    """submit_job takes a name and tags; list_jobs filters by them."""
    tagged = client.submit_job(
        command="x",
        container_group_id=container_group_id,
        sync={},
        name="nightly",
        tags=["gpu", "team=ml"],
    )
    client.submit_job(command="x", container_group_id=container_group_id, sync={})
    assert ("nightly", ("gpu", "team=ml")) == (tagged.name, tagged.tags)
    assert [tagged.id] == [
        j.id
        for j in client.list_jobs(container_group_id=container_group_id, name="nightly")
    ]
    assert [tagged.id] == [
        j.id
        for j in client.list_jobs(
            container_group_id=container_group_id, tags=["team=ml", "gpu"]
        )
    ]
    with pytest.raises(ValueError, match="is not valid"):
        client.submit_job(
            command="x", container_group_id=container_group_id, sync={}, tags=["a b"]
        )


def test_jobs_events_table(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """The table shows each event with its attempt, machine and cause, then totals."""
    job_id = _fail_once_then_complete(client, container_group_id)
    assert 0 == kelpie("jobs", "events", job_id[:12])
    out = kelpie.out
    for text in ("submitted", "claimed", "failed", "banned", "requeued", "completed"):
        assert text in out
    assert "exit code 7; out of memory" in out
    assert "m1" in out
    assert "m2" in out
    assert "over 2 attempt(s)" in out
    assert 0 == kelpie("jobs", "events", job_id, "--json")
    assert [e.to_json() for e in client.events(job_id)] == kelpie.json()
    assert 1 == kelpie("jobs", "events", "zzzz")


def test_submit_and_list_with_name_and_tags(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """submit --name/--tag stores them; jobs list --name/--tag filters; get shows them."""
    assert 0 == kelpie(
        "submit",
        "--container-group-id",
        container_group_id,
        "--name",
        "sweep-3",
        "--tag",
        "gpu",
        "--tag",
        "lr=0.1",
        "--json",
        "--",
        "python",
        "train.py",
    )
    job = kelpie.json()
    assert ("sweep-3", ["gpu", "lr=0.1"]) == (job["name"], job["tags"])
    other = client.submit_job(
        command="y", container_group_id=container_group_id, sync={}, tags=["gpu"]
    )
    client.submit_job(command="z", container_group_id=container_group_id, sync={})
    assert 0 == kelpie(
        "jobs",
        "list",
        "--container-group-id",
        container_group_id,
        "--tag",
        "gpu",
        "--json",
    )
    assert [other.id, job["id"]] == [j["id"] for j in kelpie.json()]
    assert 0 == kelpie(
        "jobs",
        "list",
        "--container-group-id",
        container_group_id,
        "--tag",
        "lr=0.1",
        "--json",
    )
    assert [job["id"]] == [j["id"] for j in kelpie.json()]
    assert 0 == kelpie(
        "jobs", "list", "--container-group-id", container_group_id, "--name", "x"
    )
    assert "No jobs." in kelpie.out
    assert 0 == kelpie("jobs", "get", job["id"])
    assert "sweep-3" in kelpie.out
    assert "gpu, lr=0.1" in kelpie.out
    assert 1 == kelpie(
        "submit", "--container-group-id", container_group_id, "--tag", "a b", "--", "x"
    )
