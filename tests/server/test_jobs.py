"""
Job submission, reading, listing, cancelling and purging, over HTTP.
"""

from __future__ import annotations

from typing import Any

import pytest

from kelpie_sdk.models import Job

from .helpers import legacy_job, report, sync_job


def test_submit_legacy_job_applies_defaults_and_normalises(
    api: Any, container_group_id: str
) -> None:
    """A flat-fields job is pending, has the defaults, and its prefixes end in '/'."""
    r = api.post("/jobs", json=legacy_job(container_group_id))
    assert 202 == r.status_code
    body = r.json()
    assert "pending" == body["status"]
    assert 3 == body["max_failures"]
    assert 30 == body["heartbeat_interval"]
    assert False is body["compression"]
    assert None is body["sync"]
    assert "data/" == body["input_prefix"]
    assert "run-1/" == body["checkpoint_prefix"]
    assert "run-1/" == body["output_prefix"]
    assert None is body["machine_id"]
    assert None is body["webhook"]
    for unset in ("started", "completed", "canceled", "failed", "heartbeat"):
        assert unset not in body
    assert body == Job.from_json(body).to_json()


def test_submit_sync_job_hides_flat_fields(api: Any, container_group_id: str) -> None:
    """A sync job echoes its sync block (normalised) and has no flat fields."""
    sync = {
        "before": [
            {
                "bucket": "b",
                "prefix": "in",
                "local_path": "/in",
                "direction": "download",
            }
        ],
        "after": [
            {
                "bucket": "b",
                "prefix": "out/",
                "local_path": "/out",
                "direction": "upload",
                "pattern": r"\.mp4$",
            }
        ],
    }
    body = api.post("/jobs", json=sync_job(container_group_id, sync=sync)).json()
    assert "in/" == body["sync"]["before"][0]["prefix"]
    assert "out/" == body["sync"]["after"][0]["prefix"]
    assert r"\.mp4$" == body["sync"]["after"][0]["pattern"]
    assert "input_bucket" not in body


def test_empty_sync_means_no_managed_storage(api: Any, container_group_id: str) -> None:
    """`"sync": {}` is accepted and echoed."""
    assert {} == api.post("/jobs", json=sync_job(container_group_id)).json()["sync"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sync": {}, "input_bucket": "x"}, "Cannot use both sync and bucket/prefix"),
        ({"sync": None, "input_bucket": ""}, "Must use either sync or bucket/prefix"),
        (
            {
                "sync": {
                    "before": [
                        {
                            "bucket": "b",
                            "prefix": "p",
                            "local_path": "/x",
                            "direction": "upload",
                        }
                    ]
                }
            },
            'sync.before.direction must be "download"',
        ),
        (
            {
                "sync": {
                    "during": [
                        {
                            "bucket": "b",
                            "prefix": "p",
                            "local_path": "/x",
                            "direction": "download",
                        }
                    ]
                }
            },
            'sync.during.direction must be "upload"',
        ),
        (
            {
                "sync": {
                    "after": [
                        {
                            "bucket": "b",
                            "prefix": "p",
                            "local_path": "/x",
                            "direction": "upload",
                            "pattern": "(",
                        }
                    ]
                }
            },
            "not a valid regular expression",
        ),
        ({"sync": {}, "command": " "}, "command must not be empty"),
        ({"sync": {}, "webhook": "ftp://x"}, "webhook must be an http"),
        ({"sync": {}, "max_failures": 0}, "max_failures must be between 1 and"),
        (
            {"sync": {}, "heartbeat_interval": 0},
            "heartbeat_interval must be between 1 and",
        ),
        ({"sync": {}, "max_failures": "3"}, "max_failures"),
        ({"sync": {}, "compression": "yes"}, "compression"),
        ({"sync": {}, "environment": {"A": 1}}, "environment"),
        ({"sync": {}, "arguments": "a b"}, "arguments"),
        ({"sync": {"before": [{"bucket": "b"}]}}, "prefix"),
        ({"sync": {}, "container_group_id": None}, "container_group_id"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_invalid_submissions_are_400_naming_the_problem(
    api: Any, container_group_id: str, change: dict[str, Any], message: str
) -> None:
    """Each validation rule answers 400 with a JSON body that names it."""
    body = {**legacy_job(container_group_id), **change}
    body = {k: v for k, v in body.items() if not (k == "sync" and v is None)}
    if "sync" in change and change["sync"] is not None and "input_bucket" not in change:
        for key in (
            "input_bucket",
            "input_prefix",
            "checkpoint_bucket",
            "checkpoint_prefix",
            "output_bucket",
            "output_prefix",
        ):
            body.pop(key)
    r = api.post("/jobs", json=body)
    assert 400 == r.status_code
    assert "application/json" in r.headers["content-type"]
    assert message in r.json()["message"]


@pytest.mark.parametrize(
    "raw", ["not json", "", "[]", "null", '{"command": "x"'], ids=repr
)
def test_malformed_bodies_are_400_json(api: Any, raw: str) -> None:
    """Malformed JSON is a 400 with a JSON body, never a 500 or an empty object."""
    r = api.post("/jobs", data=raw, headers={"content-type": "application/json"})
    assert 400 == r.status_code
    assert r.json()["message"]


def test_unknown_body_keys_are_ignored(api: Any, container_group_id: str) -> None:
    """Extra keys that are not misspellings are dropped, as the original's schema did."""
    r = api.post("/jobs", json=sync_job(container_group_id, colour="blue"))
    assert 202 == r.status_code
    assert "colour" not in r.json()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"comand": "x", "sync": {}},
            "unknown field 'comand' (did you mean 'command'?)",
        ),
        (
            {"command": "x", "sync": {}, "max_failure": 5},
            "unknown field 'max_failure' (did you mean 'max_failures'?)",
        ),
        (
            {"command": "x", "sync": {}, "enviroment": {"A": "1"}},
            "unknown field 'enviroment' (did you mean 'environment'?)",
        ),
        ({"cmd_line": "x", "sync": {}}, "'cmd_line'"),
        (
            {
                "command": "x",
                "sync": {
                    "before": [
                        {
                            "bucket": "b",
                            "prefix": "p",
                            "local_pth": "/in",
                            "direction": "download",
                        }
                    ]
                },
            },
            "unknown field 'sync.before[0].local_pth' (did you mean 'local_path'?)",
        ),
        (
            {"command": "x", "sync": {"afer": []}},
            "unknown field 'sync.afer' (did you mean 'after'?)",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_misspelt_fields_are_named(
    api: Any, container_group_id: str, body: dict[str, Any], named: str
) -> None:
    """A misspelt field, or an unknown one where a required field is missing, is a 400 that names it."""
    r = api.post("/jobs", json={"container_group_id": container_group_id, **body})
    assert 400 == r.status_code
    assert named in r.json()["message"]
    batch = api.post(
        "/jobs/batch",
        json=[
            sync_job(container_group_id),
            {"container_group_id": container_group_id, **body},
        ],
    )
    assert (400, 1) == (batch.status_code, batch.json()["index"])
    assert named in batch.json()["message"]


def test_a_job_read_back_can_be_resubmitted(api: Any, container_group_id: str) -> None:
    """The fields of a job as the API returns it are ignored in a submission, as before."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    again = api.post("/jobs", json=api.get(f"/jobs/{job['id']}").json())
    assert 202 == again.status_code
    assert (job["command"], "pending") == (
        again.json()["command"],
        again.json()["status"],
    )
    assert job["id"] != again.json()["id"]


def test_batch_keeps_request_order(api: Any, container_group_id: str) -> None:
    """A batch is inserted in one go and answered in request order."""
    bodies = [sync_job(container_group_id, arguments=[str(i)]) for i in range(50)]
    r = api.post("/jobs/batch", json=bodies)
    assert 202 == r.status_code
    assert [[str(i)] for i in range(50)] == [j["arguments"] for j in r.json()]


def test_batch_is_all_or_nothing_and_names_the_index(
    api: Any, container_group_id: str
) -> None:
    """One bad element rejects the batch with its index, and nothing is inserted."""
    bodies = [sync_job(container_group_id) for _ in range(5)]
    bodies[3] = {**bodies[3], "max_failures": "x"}
    r = api.post("/jobs/batch", json=bodies)
    assert 400 == r.status_code
    assert 3 == r.json()["index"]
    assert (
        0
        == api.get("/jobs", params={"container_group_id": container_group_id}).json()[
            "_count"
        ]
    )


@pytest.mark.parametrize(("size", "status"), [(0, 400), (1000, 202), (1001, 400)])
def test_batch_size_limits(
    api: Any, container_group_id: str, size: int, status: int
) -> None:
    """Batches hold 1 to 1000 jobs."""
    r = api.post("/jobs/batch", json=[sync_job(container_group_id)] * size)
    assert status == r.status_code
    if status == 202:
        assert size == len(r.json())


def test_batch_must_be_an_array(api: Any, container_group_id: str) -> None:
    """An object where an array belongs is a 400."""
    assert 400 == api.post("/jobs/batch", json=sync_job(container_group_id)).status_code


def test_get_job_and_404(api: Any, container_group_id: str) -> None:
    """A job reads back; an unknown id is a 404 with a JSON body."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert job == api.get(f"/jobs/{job['id']}").json()
    r = api.get("/jobs/no-such-job")
    assert 404 == r.status_code
    assert {"error": "Not Found", "message": "Job not found"} == r.json()


def test_jobs_are_scoped_to_their_owner(
    api: Any, admin_api: Any, api_server: Any, container_group_id: str
) -> None:
    """Another user cannot see, list or cancel a job; the admin can read it."""
    from ..conftest import Api

    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    other_user = admin_api.post(
        "/users", json={"username": "other-" + job["id"]}
    ).json()
    key = admin_api.post(f"/users/{other_user['id']}/token", json={}).json()["token"]
    other = Api(api_server.url, key)
    assert 404 == other.get(f"/jobs/{job['id']}").status_code
    assert 404 == other.delete(f"/jobs/{job['id']}").status_code
    assert 0 == other.get("/jobs").json()["_count"]
    assert job["id"] == admin_api.get(f"/jobs/{job['id']}").json()["id"]


def test_list_filters_orders_and_pages(api: Any, container_group_id: str) -> None:
    """Listing filters by status and group, pages, and orders newest first by default."""
    ids = [
        j["id"]
        for j in api.post("/jobs/batch", json=[sync_job(container_group_id)] * 5).json()
    ]
    api.post("/jobs", json=sync_job("elsewhere"))
    api.delete(f"/jobs/{ids[0]}")
    page = api.get(
        "/jobs", params={"container_group_id": container_group_id, "page_size": 2}
    ).json()
    assert 2 == page["_count"]
    assert [ids[4], ids[3]] == [j["id"] for j in page["jobs"]]
    page3 = api.get(
        "/jobs",
        params={"container_group_id": container_group_id, "page_size": 2, "page": 3},
    ).json()
    assert [ids[0]] == [j["id"] for j in page3["jobs"]]
    asc = api.get(
        "/jobs", params={"container_group_id": container_group_id, "asc": "true"}
    ).json()
    assert ids == [j["id"] for j in asc["jobs"]]
    canceled = api.get("/jobs", params={"status": "canceled"}).json()
    assert [ids[0]] == [j["id"] for j in canceled["jobs"]]
    assert 6 == api.get("/jobs").json()["_count"]


def test_list_by_id_prefix(api: Any, container_group_id: str) -> None:
    """id_prefix keeps the caller's jobs whose id starts with it, and no others."""
    ids = [
        j["id"]
        for j in api.post("/jobs/batch", json=[sync_job(container_group_id)] * 3).json()
    ]
    for job_id in ids:
        for length in (1, 8, 36):
            page = api.get("/jobs", params={"id_prefix": job_id[:length]}).json()
            found = [j["id"] for j in page["jobs"]]
            assert job_id in found
            assert all(f.startswith(job_id[:length]) for f in found)
    assert [ids[1]] == [
        j["id"] for j in api.get("/jobs", params={"id_prefix": ids[1]}).json()["jobs"]
    ]
    assert 0 == api.get("/jobs", params={"id_prefix": "zz"}).json()["_count"]
    # LIKE wildcards are plain characters here.
    assert 0 == api.get("/jobs", params={"id_prefix": "%"}).json()["_count"]
    assert 0 == api.get("/jobs", params={"id_prefix": "_"}).json()["_count"]


def test_list_by_id_prefix_is_scoped_to_the_user(
    api: Any, admin_api: Any, api_server: Any, container_group_id: str
) -> None:
    """Another user's job is not found by its prefix."""
    from ..conftest import Api

    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    other_user = admin_api.post("/users", json={"username": "p-" + job["id"]}).json()
    key = admin_api.post(f"/users/{other_user['id']}/token", json={}).json()["token"]
    other = Api(api_server.url, key)
    assert 0 == other.get("/jobs", params={"id_prefix": job["id"]}).json()["_count"]


@pytest.mark.parametrize(
    "params",
    [
        {"status": "exploded"},
        {"page": 0},
        {"page_size": 0},
        {"page_size": 1001},
        {"page": "x"},
        {"id_prefix": "x" * 37},
    ],
    ids=str,
)
def test_list_rejects_bad_parameters(api: Any, params: dict[str, Any]) -> None:
    """Unknown statuses and out-of-range pages are 400s."""
    r = api.get("/jobs", params=params)
    assert 400 == r.status_code
    assert r.json()["message"]


def test_cancel_pending_and_running(api: Any, container_group_id: str) -> None:
    """Pending and running jobs cancel; cancelling again is fine; the worker hears 'canceled'."""
    pending = api.post("/jobs", json=sync_job(container_group_id)).json()
    r = api.delete(f"/jobs/{pending['id']}")
    assert (202, {"message": "Job canceled"}) == (r.status_code, r.json())
    assert 202 == api.delete(f"/jobs/{pending['id']}").status_code
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    api.delete(f"/jobs/{job['id']}")
    hb = api.post(f"/jobs/{job['id']}/heartbeat", json=report("m", container_group_id))
    assert {"status": "canceled"} == hb.json()
    assert "canceled" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_cancel_finished_job_is_409_and_keeps_status(
    api: Any, container_group_id: str
) -> None:
    """A completed job stays completed: cancel answers 409."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    api.post(f"/jobs/{job['id']}/completed", json=report("m", container_group_id))
    r = api.delete(f"/jobs/{job['id']}")
    assert 409 == r.status_code
    assert "completed" == api.get(f"/jobs/{job['id']}").json()["status"]


def test_cancel_unknown_job_is_404(api: Any) -> None:
    """Cancelling a job that does not exist is a 404."""
    assert 404 == api.delete("/jobs/nope").status_code


def test_purge_deletes_pending_and_cancels_running(
    api: Any, container_group_id: str
) -> None:
    """Purge deletes pending jobs, cancels running ones and leaves finished ones."""
    jobs = api.post("/jobs/batch", json=[sync_job(container_group_id)] * 4).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    api.post(f"/jobs/{jobs[1]['id']}/completed", json=report("m", container_group_id))
    r = api.delete(f"/jobs/container-groups/{container_group_id}")
    assert (200, {"count": 3}) == (r.status_code, r.json())
    assert "canceled" == api.get(f"/jobs/{jobs[0]['id']}").json()["status"]
    assert "completed" == api.get(f"/jobs/{jobs[1]['id']}").json()["status"]
    assert 404 == api.get(f"/jobs/{jobs[2]['id']}").status_code


def test_admin_delete_all_jobs(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """DELETE /jobs is admin-only and removes every job."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert 403 == api.delete("/jobs").status_code
    assert 204 == admin_api.delete("/jobs").status_code
    assert 404 == api.get(f"/jobs/{job['id']}").status_code
