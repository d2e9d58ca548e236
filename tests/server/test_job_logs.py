"""
Job logs on the server: shipped by the holder, read by the owner, bounded per
attempt, and deleted with the job.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kelpie_sdk.client import Client
from kelpie_sdk.errors import ConflictError, NotFoundError
from kelpie_sdk.models import WorkerReport
from kelpie_sdk.server._db import JOB_LOG_ATTEMPTS, JOB_LOGS
from kelpie_sdk.testing import run_server

from .helpers import report, sync_job


def claimed_job(api: Any, group: str, machine: str = "m1") -> str:
    job = api.post("/jobs", json=sync_job(group)).json()
    got = api.get(
        "/work", params={"machine_id": machine, "container_group_id": group}
    ).json()
    assert [job["id"]] == [j["id"] for j in got]
    return str(job["id"])


def batch(
    offset: int,
    *texts: str,
    machine: str = "m1",
    attempt: int = 1,
    stream: str = "stdout",
) -> dict[str, Any]:
    return {
        "machine_id": machine,
        "attempt": attempt,
        "offset": offset,
        "lines": [{"stream": stream, "time": time.time(), "line": t} for t in texts],
    }


def read(api: Any, job_id: str, **params: Any) -> Any:
    r = api.get(f"/jobs/{job_id}/logs", params=params)
    assert 200 == r.status_code, r.text
    return r.json()


def test_holder_ships_lines_and_owner_reads_them_in_order(
    api: Any, container_group_id: str
) -> None:
    """Lines come back in order with their attempt, stream and time; the cursor reads on."""
    job_id = claimed_job(api, container_group_id)
    r = api.post(f"/jobs/{job_id}/logs", json=batch(0, "one", "two"))
    assert (200, {"accepted": 2}) == (r.status_code, r.json())
    r = api.post(f"/jobs/{job_id}/logs", json=batch(2, "oops", stream="stderr"))
    assert 200 == r.status_code
    page = read(api, job_id)
    assert [(1, "stdout", "one"), (1, "stdout", "two"), (1, "stderr", "oops")] == [
        (x["attempt"], x["stream"], x["line"]) for x in page["lines"]
    ]
    assert all(x["time"].endswith("Z") for x in page["lines"])
    assert (False, False) == (page["more"], page["finished"])
    rest = read(api, job_id, since=page["lines"][0]["seq"])
    assert ["two", "oops"] == [x["line"] for x in rest["lines"]]
    assert page["next"] == rest["next"]


def test_a_batch_sent_twice_is_stored_once_and_a_gap_is_reported(
    api: Any, container_group_id: str
) -> None:
    """The same offset again adds nothing; a jump in offset becomes a 'kelpie' note."""
    job_id = claimed_job(api, container_group_id)
    for _ in range(2):
        api.post(f"/jobs/{job_id}/logs", json=batch(0, "a", "b"))
    api.post(f"/jobs/{job_id}/logs", json=batch(1, "b", "c"))  # overlaps by one
    api.post(f"/jobs/{job_id}/logs", json=batch(10, "k"))  # 7 lines dropped
    lines = [(x["stream"], x["line"]) for x in read(api, job_id)["lines"]]
    assert [
        ("stdout", "a"),
        ("stdout", "b"),
        ("stdout", "c"),
        (
            "kelpie",
            "[kelpie] 7 lines dropped on the worker "
            "(the server was slow or unreachable)",
        ),
        ("stdout", "k"),
    ] == lines


def test_only_the_attempts_machine_may_ship(api: Any, container_group_id: str) -> None:
    """Another machine or attempt gets 409; an unknown job 404; bad bodies 400."""
    job_id = claimed_job(api, container_group_id)
    assert (
        409
        == api.post(
            f"/jobs/{job_id}/logs", json=batch(0, "x", machine="m2")
        ).status_code
    )
    assert (
        409
        == api.post(f"/jobs/{job_id}/logs", json=batch(0, "x", attempt=2)).status_code
    )
    assert 404 == api.post(f"/jobs/{uuid.uuid4()}/logs", json=batch(0, "x")).status_code
    bad_stream = api.post(f"/jobs/{job_id}/logs", json=batch(0, "x", stream="tty"))
    assert 400 == bad_stream.status_code
    assert "stream must be 'stdout' or 'stderr'" in bad_stream.json()["message"]
    assert (
        400 == api.post(f"/jobs/{job_id}/logs", json={"machine_id": "m1"}).status_code
    )
    assert [] == read(api, job_id)["lines"]


def test_last_lines_are_accepted_after_the_final_report_but_not_after_a_cancel(
    api: Any, container_group_id: str
) -> None:
    """A completed attempt's late lines are kept; a canceled job refuses them."""
    job_id = claimed_job(api, container_group_id)
    api.post(
        f"/jobs/{job_id}/completed",
        json=report("m1", container_group_id, attempt=1),
    )
    assert 200 == api.post(f"/jobs/{job_id}/logs", json=batch(0, "late")).status_code
    page = read(api, job_id)
    assert (["late"], True) == ([x["line"] for x in page["lines"]], page["finished"])
    other = claimed_job(api, container_group_id)
    api.delete(f"/jobs/{other}")
    assert 409 == api.post(f"/jobs/{other}/logs", json=batch(0, "late")).status_code


def test_another_tenant_gets_not_found(
    api: Any, admin_api: Any, container_group_id: str, api_server: Any
) -> None:
    """Logs are the owner's (and the admin's): anyone else gets 404."""
    job_id = claimed_job(api, container_group_id)
    api.post(f"/jobs/{job_id}/logs", json=batch(0, "secret"))
    user = admin_api.post("/users", json={"username": f"o-{uuid.uuid4().hex}"}).json()
    key = admin_api.post(f"/users/{user['id']}/token", json={}).json()["token"]
    with Client(api_server.url, key) as other:
        with pytest.raises(NotFoundError):
            list(other.logs(job_id))
        with pytest.raises(NotFoundError):
            other.ship_logs(job_id, machine_id="m1", attempt=1, offset=1, lines=[])
    assert ["secret"] == [x["line"] for x in read(admin_api, job_id)["lines"]]


def test_query_parameters_are_checked(api: Any, container_group_id: str) -> None:
    """limit, since and wait out of range are 400s that say the range."""
    job_id = claimed_job(api, container_group_id)
    for params, words in (
        ({"limit": 0}, "limit must be between 1 and 10000"),
        ({"since": -1}, "since must be between 0 and"),
        ({"follow": "true", "wait": 61}, "wait must be between 0 and 60 seconds"),
    ):
        r = api.get(f"/jobs/{job_id}/logs", params=params)
        assert 400 == r.status_code
        assert r.json()["message"].startswith(words)


def test_pages_and_attempt_filter(api: Any, container_group_id: str) -> None:
    """'more' pages through many lines; attempt= keeps one attempt's lines."""
    job_id = claimed_job(api, container_group_id)
    api.post(f"/jobs/{job_id}/logs", json=batch(0, *[f"a{i}" for i in range(5)]))
    api.post(
        f"/jobs/{job_id}/release", json=report("m1", container_group_id, attempt=1)
    )
    api.get(
        "/work", params={"machine_id": "m1", "container_group_id": container_group_id}
    )
    api.post(f"/jobs/{job_id}/logs", json=batch(0, "b0", attempt=2))
    first = read(api, job_id, limit=4)
    assert (4, True) == (len(first["lines"]), first["more"])
    second = read(api, job_id, limit=4, since=first["next"])
    assert ["a4", "b0"] == [x["line"] for x in second["lines"]]
    assert ["b0"] == [x["line"] for x in read(api, job_id, attempt=2)["lines"]]


def test_follow_returns_as_soon_as_a_line_arrives(
    api: Any, container_group_id: str
) -> None:
    """A follow waiting on an idle job answers within a second of a shipped batch."""
    job_id = claimed_job(api, container_group_id)
    answer: dict[str, Any] = {}

    def follow() -> None:
        started = time.monotonic()
        answer["page"] = read(api, job_id, follow="true", wait=30)
        answer["took"] = time.monotonic() - started

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(1.0)
    api.post(f"/jobs/{job_id}/logs", json=batch(0, "hello"))
    t.join(timeout=30)
    assert ["hello"] == [x["line"] for x in answer["page"]["lines"]]
    # Held while nothing came (about 1 s), answered well before its 30 s.
    assert 0.9 < answer["took"] < 10


def test_follow_ends_when_the_job_is_final(api: Any, container_group_id: str) -> None:
    """Client.logs(follow=True) yields every line and returns once the job is done."""
    job_id = claimed_job(api, container_group_id)
    api.post(f"/jobs/{job_id}/logs", json=batch(0, "one"))

    def finish() -> None:
        time.sleep(1.0)
        api.post(f"/jobs/{job_id}/logs", json=batch(1, "two"))
        api.post(
            f"/jobs/{job_id}/completed",
            json=report("m1", container_group_id, attempt=1),
        )

    t = threading.Thread(target=finish)
    t.start()
    with Client(api.url, api.session.headers["X-Kelpie-Key"]) as client:
        started = time.monotonic()
        lines = list(client.logs(job_id, follow=True))
    t.join()
    assert ["one", "two"] == [x.line for x in lines]
    assert {1} == {x.attempt for x in lines}
    assert time.monotonic() - started < 15


def test_ship_logs_from_a_former_holder_is_a_conflict(
    api: Any, container_group_id: str
) -> None:
    """The SDK raises ConflictError when the attempt was claimed again."""
    job_id = claimed_job(api, container_group_id)
    api.post(
        f"/jobs/{job_id}/release", json=report("m1", container_group_id, attempt=1)
    )
    api.get(
        "/work", params={"machine_id": "m2", "container_group_id": container_group_id}
    )
    key = api.session.headers["X-Kelpie-Key"]
    with Client(api.url, key) as client, pytest.raises(ConflictError):
        client.ship_logs(
            job_id,
            machine_id="m1",
            attempt=1,
            offset=0,
            lines=[{"stream": "stdout", "time": time.time(), "line": "x"}],
        )


def _count(store: Any, table: sa.Table, job_id: str) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(table)
                .where(table.c.job_id == job_id)
            ).scalar_one()
        )


def test_the_bound_trims_the_oldest_lines_of_each_attempt() -> None:
    """With a 4 KiB limit an attempt keeps only its newest ~4 KiB of lines."""
    with (
        run_server(log_limit=4096) as server,
        Client(server.url, server.admin_key) as c,
    ):
        job = c.submit_job(command="x", container_group_id="g", sync={})
        c.claim_work(machine_id="m1", container_group_id="g")
        line = "x" * 99  # 100 bytes with its line break
        for start in range(0, 200, 50):
            c.ship_logs(
                job.id,
                machine_id="m1",
                attempt=1,
                offset=start,
                lines=[
                    {
                        "stream": "stdout",
                        "time": time.time(),
                        "line": f"{i:03d}{line[3:]}",
                    }
                    for i in range(start, start + 50)
                ],
            )
        kept = [x.line[:3] for x in c.logs(job.id)]
        assert [f"{i:03d}" for i in range(160, 200)] == kept
        with server.store.engine.connect() as conn:
            row = conn.execute(sa.select(JOB_LOG_ATTEMPTS)).mappings().one()
        assert (4000, 160, 200) == (row["bytes"], row["trimmed"], row["next_line"])


def test_logs_go_with_their_job() -> None:
    """Purging a group and deleting all jobs delete the jobs' lines and counters."""
    with run_server() as server, Client(server.url, server.admin_key) as c:
        jobs = [
            c.submit_job(command="x", container_group_id="g", sync={}) for _ in range(2)
        ]
        for _ in jobs:
            claimed = c.claim_work(machine_id="m1", container_group_id="g")
            assert claimed is not None
            c.ship_logs(
                claimed.id,
                machine_id="m1",
                attempt=1,
                offset=0,
                lines=[{"stream": "stdout", "time": time.time(), "line": "hi"}],
            )
        # The first goes back to pending, then the purge deletes it.
        c.release(
            jobs[0].id, WorkerReport(machine_id="m1", container_group_id="g", attempt=1)
        )
        assert 2 == c.purge_container_group("g")
        assert (0, 0) == (
            _count(server.store, JOB_LOGS, jobs[0].id),
            _count(server.store, JOB_LOG_ATTEMPTS, jobs[0].id),
        )
        assert 1 == _count(server.store, JOB_LOGS, jobs[1].id)  # canceled, kept
        c.delete_all_jobs()
        assert (0, 0) == (
            _count(server.store, JOB_LOGS, jobs[1].id),
            _count(server.store, JOB_LOG_ATTEMPTS, jobs[1].id),
        )


_odd_numbers = (
    st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([2**63, -(2**63) - 1, 1e308, -1e308])
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.just(0) | _odd_numbers,
    attempt=st.just(1) | _odd_numbers,
    lines=st.lists(
        st.fixed_dictionaries(
            {
                "stream": st.sampled_from(["stdout", "stderr", "kelpie", ""]),
                "time": _odd_numbers,
                "line": st.text(max_size=20),
            }
        ),
        max_size=3,
    ),
)
def test_odd_batches_for_a_real_job_are_never_5xx(
    api: Any, holder_job: str, offset: Any, attempt: Any, lines: Any
) -> None:
    """Huge, negative or fractional numbers in a batch are 4xx (or stored), never 5xx."""
    r = api.post(
        f"/jobs/{holder_job}/logs",
        json={"machine_id": "m1", "attempt": attempt, "offset": offset, "lines": lines},
    )
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 400, 409), r.text


@pytest.fixture
def holder_job(api: Any, container_group_id: str) -> str:
    """A job claimed by m1 (attempt 1)."""
    return claimed_job(api, container_group_id)
