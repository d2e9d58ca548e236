"""
Tests of every Client method against the real API server on loopback.

Fixtures from tests/conftest.py: `api_server` (session), `admin_client`,
`client` (a fresh user per test) and `container_group_id` (a fresh group).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kelpie_sdk import Client, JobStatus, SyncConfig, SyncSpec
from kelpie_sdk.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from kelpie_sdk.models import JobSubmission, WorkerReport


def sync_none() -> dict[str, Any]:
    """The idiom for "no managed storage"."""
    return {}


def test_submit_and_get(client: Client, container_group_id: str) -> None:
    """A submitted job is pending and reads back identically."""
    job = client.submit_job(
        command="python",
        arguments=["train.py", "--epochs", "3"],
        environment={"SEED": "1"},
        container_group_id=container_group_id,
        max_failures=5,
        heartbeat_interval=10,
        sync=sync_none(),
    )
    assert JobStatus.PENDING == job.status
    assert (("train.py", "--epochs", "3"), {"SEED": "1"}, 5, 10) == (
        job.arguments,
        job.environment,
        job.max_failures,
        job.heartbeat_interval,
    )
    assert job == client.get_job(job.id)


def test_submit_with_sync_spec(client: Client, container_group_id: str) -> None:
    """A SyncSpec round-trips, with the prefix normalised to end in a slash."""
    spec = SyncSpec(
        before=[
            SyncConfig(
                bucket="b", prefix="in", local_path="/data", direction="download"
            )
        ]
    )
    job = client.submit_job(
        command="x", container_group_id=container_group_id, sync=spec
    )
    assert job.sync is not None
    assert job.sync.before is not None
    assert "in/" == job.sync.before[0].prefix


def test_submit_with_legacy_fields(client: Client, container_group_id: str) -> None:
    """The six flat storage fields are accepted and normalised."""
    job = client.submit_job(
        command="x",
        container_group_id=container_group_id,
        input_bucket="b",
        input_prefix="in",
        checkpoint_bucket="b",
        checkpoint_prefix="ck",
        output_bucket="b",
        output_prefix="out",
    )
    assert ("in/", "ck/", "out/") == (
        job.input_prefix,
        job.checkpoint_prefix,
        job.output_prefix,
    )


def test_submit_invalid_is_bad_request(client: Client, container_group_id: str) -> None:
    """A job with neither sync nor storage fields is rejected with a message."""
    with pytest.raises(BadRequestError) as info:
        client.submit_job(command="x", container_group_id=container_group_id)
    assert 400 == info.value.status_code
    assert str(info.value).startswith("400 POST /jobs: ")


def test_get_unknown_job_is_not_found(client: Client) -> None:
    """An unknown id is a NotFoundError whose text names method and path."""
    job_id = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as info:
        client.get_job(job_id)
    assert str(info.value).startswith(f"404 GET /jobs/{job_id}: ")


def test_wrong_base_url_is_named(api_server: Any, user_key: str) -> None:
    """A base URL with an extra path gets a 404 that says to check the URL."""
    job_id = str(uuid.uuid4())
    with (
        Client(api_server.url + "/api", user_key) as wrong,
        pytest.raises(NotFoundError) as info,
    ):
        wrong.get_job(job_id)
    # The server's X-Request-Id follows, as in every status error's text.
    assert str(info.value).startswith(
        f"404 GET /jobs/{job_id}: {api_server.url}/api answered 404 for "
        f"/jobs/{job_id}: is KELPIE_API_URL the server's base URL?"
    )
    assert info.value.request_id


def test_jobs_are_scoped_to_their_owner(
    client: Client, admin_client: Client, container_group_id: str, api_server: Any
) -> None:
    """Another user cannot see a job; the admin can."""
    job = client.submit_job(command="x", container_group_id=container_group_id, sync={})
    other = admin_client.create_user(f"other-{uuid.uuid4().hex}")
    key = admin_client.create_token(other.id, org_name="o", project_name="p")
    with Client(api_server.url, key, environ={}) as stranger:
        with pytest.raises(NotFoundError):
            stranger.get_job(job.id)
        assert [] == list(stranger.list_jobs())
    assert job.id == admin_client.get_job(job.id).id


def test_submit_jobs_in_order(client: Client, container_group_id: str) -> None:
    """A batch comes back in request order; mappings and models may be mixed."""
    jobs: list[JobSubmission | dict[str, Any]] = [
        {"command": f"c{i}", "container_group_id": container_group_id, "sync": {}}
        for i in range(5)
    ]
    jobs.append(
        JobSubmission(
            command="c5", container_group_id=container_group_id, sync=SyncSpec()
        )
    )
    queued = client.submit_jobs(jobs)
    assert [f"c{i}" for i in range(6)] == [j.command for j in queued]


def test_submit_jobs_chunks_past_the_batch_limit(
    client: Client, container_group_id: str
) -> None:
    """1001 jobs go in two batches, all queued, in order."""
    jobs = [
        {"command": str(i), "container_group_id": container_group_id, "sync": {}}
        for i in range(1001)
    ]
    queued = client.submit_jobs(jobs)
    assert [str(i) for i in range(1001)] == [j.command for j in queued]
    listed = list(
        client.list_jobs(container_group_id=container_group_id, asc=True, page_size=500)
    )
    assert [j.id for j in queued] == [j.id for j in listed]


def test_submit_jobs_bad_element_rejects_the_batch(
    client: Client, container_group_id: str
) -> None:
    """One invalid job fails its whole batch: nothing is queued."""
    jobs = [
        {"command": "ok", "container_group_id": container_group_id, "sync": {}},
        {"command": "bad", "container_group_id": container_group_id},
    ]
    with pytest.raises(BadRequestError):
        client.submit_jobs(jobs)
    assert [] == list(client.list_jobs(container_group_id=container_group_id))


def test_list_jobs_filters_and_order(client: Client, container_group_id: str) -> None:
    """list_jobs filters by status and group, newest first unless asc."""
    queued = client.submit_jobs(
        [
            {"command": str(i), "container_group_id": container_group_id, "sync": {}}
            for i in range(3)
        ]
    )
    client.cancel(queued[1].id)
    ids = [j.id for j in queued]
    newest_first = [
        j.id for j in client.list_jobs(container_group_id=container_group_id)
    ]
    oldest_first = [
        j.id for j in client.list_jobs(container_group_id=container_group_id, asc=True)
    ]
    assert (ids[::-1], ids) == (newest_first, oldest_first)
    canceled = list(
        client.list_jobs(status="canceled", container_group_id=container_group_id)
    )
    assert [ids[1]] == [j.id for j in canceled]
    pending = list(client.list_jobs(status=JobStatus.PENDING))
    assert {ids[0], ids[2]} == {j.id for j in pending}


def test_list_jobs_by_id_prefix(client: Client, container_group_id: str) -> None:
    """id_prefix finds a job by the start of its id."""
    queued = client.submit_jobs(
        [{"command": "x", "container_group_id": container_group_id, "sync": {}}] * 3
    )
    for job in queued:
        found = [j.id for j in client.list_jobs(id_prefix=job.id[:12])]
        assert [job.id] == found


def test_list_jobs_rejects_unknown_status(client: Client) -> None:
    """An unknown status is refused before any request."""
    with pytest.raises(ValueError):
        client.list_jobs(status="sleeping")


def test_list_jobs_pages(client: Client, container_group_id: str) -> None:
    """pages() yields numbered full pages and a short last page."""
    client.submit_jobs(
        [{"command": "x", "container_group_id": container_group_id, "sync": {}}] * 5
    )
    pages = list(
        client.list_jobs(container_group_id=container_group_id, page_size=2).pages()
    )
    assert [(1, 2), (2, 2), (3, 1)] == [(p.number, len(p)) for p in pages]


@pytest.mark.slow
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(count=st.integers(min_value=0, max_value=25), page_size=st.integers(1, 12))
def test_pagination_property_against_server(
    client: Client, count: int, page_size: int
) -> None:
    """For any job count and page size, every job is listed once, in order."""
    group = str(uuid.uuid4())
    queued = client.submit_jobs(
        [
            {"command": str(i), "container_group_id": group, "sync": {}}
            for i in range(count)
        ]
    )
    listed = client.list_jobs(container_group_id=group, page_size=page_size, asc=True)
    assert [j.id for j in queued] == [j.id for j in listed]


def test_cancel(client: Client, container_group_id: str) -> None:
    """A canceled job reads back as canceled."""
    job = client.submit_job(command="x", container_group_id=container_group_id, sync={})
    client.cancel(job.id)
    assert JobStatus.CANCELED == client.get_job(job.id).status


def test_cancel_unknown_is_not_found(client: Client) -> None:
    """Canceling an unknown job is a NotFoundError (not retried, not silent)."""
    with pytest.raises(NotFoundError):
        client.cancel(str(uuid.uuid4()))


def worker_report(
    container_group_id: str, job_attempt: int | None = None
) -> WorkerReport:
    """A report from machine m1."""
    return WorkerReport(
        machine_id="m1", container_group_id=container_group_id, attempt=job_attempt
    )


def test_worker_cycle(client: Client, container_group_id: str) -> None:
    """claim -> heartbeat (with progress) -> completed, then cancel is a conflict."""
    job = client.submit_job(command="x", container_group_id=container_group_id, sync={})
    assert (
        client.claim_work(machine_id="m1", container_group_id=str(uuid.uuid4())) is None
    )
    claimed = client.claim_work(machine_id="m1", container_group_id=container_group_id)
    assert claimed is not None
    assert (job.id, JobStatus.RUNNING) == (claimed.id, claimed.status)
    report = WorkerReport(
        machine_id="m1",
        container_group_id=container_group_id,
        attempt=claimed.attempt,
        progress={"step": 5, "total": 10},
    )
    assert JobStatus.RUNNING == client.heartbeat(job.id, report)
    seen = client.get_job(job.id)
    assert (1, {"step": 5, "total": 10}) == (seen.num_heartbeats, seen.progress)
    client.report_completed(job.id, report)
    [done] = client.wait(job, timeout=5, poll_interval=0.05)
    assert JobStatus.COMPLETED == done.status
    with pytest.raises(ConflictError):
        client.cancel(job.id)
    with pytest.raises(ConflictError):
        client.report_failed(job.id, report)


def test_claim_work_long_poll_returns_when_empty(
    client: Client, container_group_id: str
) -> None:
    """claim_work with a short wait on an empty queue returns None."""
    assert (
        client.claim_work(
            machine_id="m1", container_group_id=container_group_id, wait=0.2
        )
        is None
    )


def test_heartbeat_of_canceled_job_says_canceled(
    client: Client, container_group_id: str
) -> None:
    """After a cancel, the holder's heartbeat is answered `canceled`."""
    client.submit_job(command="x", container_group_id=container_group_id, sync={})
    claimed = client.claim_work(machine_id="m1", container_group_id=container_group_id)
    assert claimed is not None
    client.cancel(claimed.id)
    report = worker_report(container_group_id, claimed.attempt)
    assert JobStatus.CANCELED == client.heartbeat(claimed.id, report)


def test_failure_below_threshold_requeues(
    client: Client, container_group_id: str
) -> None:
    """A failure below max_failures puts the job back in the queue."""
    job = client.submit_job(
        command="x", container_group_id=container_group_id, sync={}, max_failures=2
    )
    claimed = client.claim_work(machine_id="m1", container_group_id=container_group_id)
    assert claimed is not None
    client.report_failed(job.id, worker_report(container_group_id, claimed.attempt))
    again = client.get_job(job.id)
    assert (JobStatus.PENDING, 1) == (again.status, again.num_failures)
    # m1 is banned from the job now.
    assert (
        client.claim_work(machine_id="m1", container_group_id=container_group_id)
        is None
    )


def test_release_requeues_without_failure(
    client: Client, container_group_id: str
) -> None:
    """A released job is pending again, with no failure counted."""
    client.submit_job(command="x", container_group_id=container_group_id, sync={})
    claimed = client.claim_work(machine_id="m1", container_group_id=container_group_id)
    assert claimed is not None
    client.release(claimed.id, worker_report(container_group_id, claimed.attempt))
    again = client.get_job(claimed.id)
    assert (JobStatus.PENDING, 0) == (again.status, again.num_failures)


def test_purge_container_group(client: Client, container_group_id: str) -> None:
    """Purging deletes pending and cancels running jobs of the group."""
    client.submit_jobs(
        [{"command": "x", "container_group_id": container_group_id, "sync": {}}] * 3
    )
    claimed = client.claim_work(machine_id="m1", container_group_id=container_group_id)
    assert claimed is not None
    assert 3 == client.purge_container_group(container_group_id)
    remaining = list(client.list_jobs(container_group_id=container_group_id))
    assert [(claimed.id, JobStatus.CANCELED)] == [(j.id, j.status) for j in remaining]


def test_scaling_rule_crud(client: Client, container_group_id: str) -> None:
    """Scaling rules can be created, listed, read, updated and deleted."""
    rule = client.create_scaling_rule(
        container_group_id=container_group_id,
        min_replicas=0,
        max_replicas=3,
        idle_threshold_seconds=60,
    )
    assert (0, 3, 60) == (
        rule.min_replicas,
        rule.max_replicas,
        rule.idle_threshold_seconds,
    )
    assert [container_group_id] == [
        r.container_group_id for r in client.list_scaling_rules()
    ]
    assert rule == client.get_scaling_rule(container_group_id)
    with pytest.raises(ConflictError):
        client.create_scaling_rule(
            container_group_id=container_group_id,
            min_replicas=0,
            max_replicas=3,
            idle_threshold_seconds=60,
        )
    updated = client.update_scaling_rule(container_group_id, max_replicas=7)
    assert (7, 60) == (updated.max_replicas, updated.idle_threshold_seconds)
    client.delete_scaling_rule(container_group_id)
    with pytest.raises(NotFoundError):
        client.get_scaling_rule(container_group_id)


def test_scaling_rule_validated_locally(client: Client) -> None:
    """min above max is refused before any request."""
    with pytest.raises(ValueError, match="min_replicas"):
        client.create_scaling_rule(
            container_group_id=str(uuid.uuid4()),
            min_replicas=5,
            max_replicas=1,
            idle_threshold_seconds=0,
        )


def test_me_and_admin_only(client: Client, admin_client: Client) -> None:
    """me() names the user; admin endpoints refuse a normal user with 403."""
    assert client.me().username.startswith("u-")
    with pytest.raises(PermissionDeniedError):
        client.create_user("nope")
    with pytest.raises(PermissionDeniedError):
        client.delete_all_jobs()


def test_bad_key_is_permission_denied(api_server: Any) -> None:
    """An unknown key is answered 403."""
    with (
        Client(api_server.url, "not-a-key", environ={}) as stranger,
        pytest.raises(PermissionDeniedError),
    ):
        stranger.me()


def test_create_token_for_unknown_user(admin_client: Client) -> None:
    """A token for an unknown user is a NotFoundError."""
    with pytest.raises(NotFoundError):
        admin_client.create_token(str(uuid.uuid4()))


def test_duplicate_user(admin_client: Client) -> None:
    """Creating an existing user is a 4xx error."""
    name = f"dup-{uuid.uuid4().hex}"
    admin_client.create_user(name)
    with pytest.raises((BadRequestError, ConflictError)):
        admin_client.create_user(name)


def test_admin_bulk_deletes() -> None:
    """The admin's delete_all_* empty jobs, rules and users (on a private server)."""
    from kelpie_sdk.testing import run_server

    with (
        run_server() as server,
        Client(server.url, server.admin_key, environ={}) as admin,
    ):
        user = admin.create_user("victim")
        key = admin.create_token(user.id, org_name="o", project_name="p")
        with Client(server.url, key, environ={}) as victim:
            group = str(uuid.uuid4())
            victim.submit_job(command="x", container_group_id=group, sync={})
            victim.create_scaling_rule(
                container_group_id=group,
                min_replicas=0,
                max_replicas=1,
                idle_threshold_seconds=0,
            )
            admin.delete_all_jobs()
            admin.delete_all_scaling_rules()
            assert ([], []) == (list(victim.list_jobs()), victim.list_scaling_rules())
            admin.delete_all_users()
            with pytest.raises(PermissionDeniedError):
                victim.me()
        # The admin itself survives.
        assert admin.me().id
