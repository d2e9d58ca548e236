"""
GET /metrics: the Prometheus text format, its counters, histogram and access.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import report, sync_job


def scrape(admin_api: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed: ``(name, sorted labels) -> value``."""
    r = admin_api.get("/metrics")
    assert 200 == r.status_code, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def claim(api: Any, group: str, machine: str = "m1") -> dict[str, Any] | None:
    r = api.get("/work", params={"machine_id": machine, "container_group_id": group})
    assert 200 == r.status_code, r.text
    jobs = r.json()
    return jobs[0] if jobs else None


def test_metrics_parse_and_count_jobs_by_group_and_status(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """Jobs by user, group and status come from the database, zeros included."""
    api.post("/jobs/batch", json=[sync_job(container_group_id)] * 3)
    assert claim(api, container_group_id) is not None
    username = api.get("/users/me").json()["username"]
    samples = scrape(admin_api)
    labels = {"user": username, "container_group_id": container_group_id}
    assert 2 == value(samples, "kelpie_jobs", status="pending", **labels)
    assert 1 == value(samples, "kelpie_jobs", status="running", **labels)
    assert ("kelpie_jobs", tuple(sorted({**labels, "status": "failed"}.items()))) in (
        samples
    )


def test_counters_move_after_claim_completion_failure_release_and_cancel(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """Each outcome the store reports moves its own counter by one."""
    before = scrape(admin_api)
    ids = [
        j["id"]
        for j in api.post(
            "/jobs/batch", json=[sync_job(container_group_id, max_failures=1)] * 4
        ).json()
    ]
    done, failing, released, canceled = ids
    body = report("m1", container_group_id, attempt=1)
    assert done == claim(api, container_group_id)["id"]  # type: ignore[index]
    assert 200 == api.post(f"/jobs/{done}/completed", json=body).status_code
    assert failing == claim(api, container_group_id)["id"]  # type: ignore[index]
    assert 202 == api.post(f"/jobs/{failing}/failed", json=body).status_code
    assert released == claim(api, container_group_id)["id"]  # type: ignore[index]
    assert 200 == api.post(f"/jobs/{released}/release", json=body).status_code
    assert 202 == api.delete(f"/jobs/{canceled}").status_code
    # A refused report (not the holder) counts nothing.
    assert (
        409
        == api.post(
            f"/jobs/{done}/completed", json=report("m2", container_group_id, attempt=1)
        ).status_code
    )
    after = scrape(admin_api)

    def moved(name: str) -> float:
        return value(after, name) - value(before, name)

    assert 3 <= moved("kelpie_job_claims_total")
    assert 1 <= moved("kelpie_job_completions_total")
    assert 1 <= moved("kelpie_job_failures_total")
    assert 1 <= moved("kelpie_job_releases_total")
    assert 1 <= moved("kelpie_job_cancels_total")


def test_expired_lease_counts_once_when_taken_over(
    api: Any, admin_api: Any, container_group_id: str, server_clock: Any
) -> None:
    """A claim that takes over a lapsed lease moves the lease-expiry counter."""
    job = api.post(
        "/jobs", json=sync_job(container_group_id, heartbeat_interval=1)
    ).json()
    assert job["id"] == claim(api, container_group_id)["id"]  # type: ignore[index]
    before = scrape(admin_api)
    # Pending jobs of a fresh queue, then an expired lease: only the takeover counts.
    server_clock.advance(3)
    again = claim(api, container_group_id, machine="m2")
    assert again is not None
    assert (job["id"], 2, 1) == (
        again["id"],
        again["attempt"],
        again["num_interruptions"],
    )
    assert claim(api, container_group_id, machine="m3") is None
    after = scrape(admin_api)
    assert 1 == value(after, "kelpie_job_lease_expiries_total") - value(
        before, "kelpie_job_lease_expiries_total"
    )


def test_no_lease_expiry_counted_for_a_released_job(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """A job handed back and claimed again is a release, not a lapsed lease."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    assert claim(api, container_group_id) is not None
    body = report("m1", container_group_id, attempt=1)
    assert 200 == api.post(f"/jobs/{job['id']}/release", json=body).status_code
    before = scrape(admin_api)
    again = claim(api, container_group_id, machine="m2")
    assert again is not None
    assert 2 == again["attempt"]
    after = scrape(admin_api)
    assert value(after, "kelpie_job_lease_expiries_total") == value(
        before, "kelpie_job_lease_expiries_total"
    )


def test_request_histogram_labels_route_template_method_and_status_class(
    api: Any, admin_api: Any
) -> None:
    """Requests are timed by route template (never the job id), method and class."""
    missing = "00000000-0000-0000-0000-000000000000"
    before = scrape(admin_api)
    assert 404 == api.get(f"/jobs/{missing}").status_code
    assert 404 == api.get("/no/such/route").status_code
    after = scrape(admin_api)
    count = "kelpie_http_request_duration_seconds_count"
    route = {"route": "/jobs/{job_id}", "method": "GET", "status": "4xx"}
    assert 1 <= value(after, count, **route) - value(before, count, **route)
    unmatched = {"route": "unmatched", "method": "GET", "status": "4xx"}
    assert 1 <= value(after, count, **unmatched) - value(before, count, **unmatched)
    assert not any(missing in str(key) for key in after)
    inf = {**route, "le": "+Inf"}
    assert value(after, "kelpie_http_request_duration_seconds_bucket", **inf) == value(
        after, count, **route
    )


def test_long_polls_in_flight_gauge(
    api: Any, admin_api: Any, container_group_id: str
) -> None:
    """A waiting GET /work shows in the in-flight gauge, and leaves it."""
    import threading
    import time

    def poll() -> None:
        api.get(
            "/work",
            params={
                "machine_id": "m1",
                "container_group_id": container_group_id,
                "wait": 3,
            },
        )

    waiting = threading.Thread(target=poll)
    waiting.start()
    try:
        deadline = time.monotonic() + 10
        while (
            value(scrape(admin_api), "kelpie_long_polls_in_flight", endpoint="work") < 1
        ):
            assert time.monotonic() < deadline, "the long poll never showed"
            time.sleep(0.05)
    finally:
        waiting.join(timeout=30)
    assert 0 == value(scrape(admin_api), "kelpie_long_polls_in_flight", endpoint="work")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-Kelpie-Key": "nope"}, 403),
        ({"Authorization": "Bearer nope"}, 403),
    ],
)
def test_metrics_need_a_key(
    api_server: Any, headers: dict[str, str], status: int
) -> None:
    """Without the admin's key, /metrics is refused with a message saying why."""
    import requests

    r = requests.get(api_server.url + "/metrics", headers=headers, timeout=30)
    assert status == r.status_code
    assert r.json()["message"]


def test_metrics_refuse_a_user_key(api: Any) -> None:
    """A user's key would see other tenants' group names: admin only."""
    r = api.get("/metrics")
    assert (403, "Admin Only") == (r.status_code, r.json()["message"])


def test_metrics_take_the_admin_key_as_a_bearer_token(api_server: Any) -> None:
    """Prometheus's ``authorization`` setting sends ``Authorization: Bearer``."""
    import requests

    r = requests.get(
        api_server.url + "/metrics",
        headers={"Authorization": f"Bearer {api_server.admin_key}"},
        timeout=30,
    )
    assert 200 == r.status_code
    assert "kelpie_job_claims_total" in r.text


def test_public_metrics_need_no_key() -> None:
    """``metrics_public`` serves /metrics to anyone."""
    import requests

    from kelpie_sdk.testing import run_server

    with run_server(metrics_public=True) as server:
        r = requests.get(server.url + "/metrics", timeout=30)
        assert 200 == r.status_code, r.text
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"kelpie_jobs", "kelpie_job_claims"} <= names
