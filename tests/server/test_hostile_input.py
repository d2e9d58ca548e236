"""
Hostile requests: paths that could reach another route, numbers out of range,
deep JSON, NULs, huge bodies; safe 500s; request ids; poison rows.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import pathlib
import stat
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk.models import INTEGER_RANGES, MAX_KEY_LENGTH
from kelpie_sdk.server._app import MAX_BODY_BYTES
from kelpie_sdk.server._guard import MAX_JSON_DEPTH, json_has_nul, json_too_deep

from .helpers import report, sync_job


def _raw(
    api_server: Any, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """Send a path exactly as written (requests and urllib3 would tidy it)."""
    parts = urlsplit(api_server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("X-Kelpie-Key", api_server.admin_key)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


# -- routes that cannot be confused ----------------------------------------------

CONFUSING_PATHS = [
    ("DELETE", "/jobs/%2F"),
    ("DELETE", "/jobs/%2f"),
    ("DELETE", "/jobs/"),
    ("DELETE", "/jobs//"),
    ("GET", "/jobs/%2F"),
    ("GET", "/jobs/"),
    ("GET", "/jobs/%2E%2E"),
    ("GET", "/jobs/.."),
    ("DELETE", "/jobs/container-groups/%2F"),
    ("DELETE", "/jobs/container-groups/"),
    ("DELETE", "/scaling-rules/%2F"),
    ("DELETE", "/scaling-rules/"),
    ("GET", "/scaling-rules/%2F"),
    ("PATCH", "/scaling-rules/%2F"),
    ("POST", "/users/%2F/token"),
    ("POST", "/users//token"),
    ("GET", "/jobs/%2F/events"),
    ("POST", "/jobs/%2F/heartbeat"),
    ("POST", "/jobs/abc%2Fheartbeat"),
    ("POST", "/jobs/abc%5Cheartbeat"),
    ("GET", "/jobs/%2F/status?machine_id=m"),
    ("GET", "/jobs/%2F/logs"),
    ("GET", "/ui/jobs/%2F"),
    ("GET", "/jobs/a%00b"),
]


@pytest.mark.parametrize(("method", "path"), CONFUSING_PATHS)
def test_confusing_path_is_a_404_and_reaches_no_route(
    api_server: Any, admin_api: Any, method: str, path: str
) -> None:
    """An empty, slash-only or encoded-slash id is a 404; nothing is deleted."""
    group = str(uuid.uuid4())
    job = admin_api.post("/jobs", json=sync_job(group)).json()
    rule = {
        "container_group_id": group,
        "min_replicas": 0,
        "max_replicas": 1,
        "idle_threshold_seconds": 60,
    }
    assert 201 == admin_api.post("/scaling-rules", json=rule).status_code
    status, headers, body = _raw(api_server, method, path, b"{}")
    assert 404 == status, body
    assert "Route Not Found" == json.loads(body)["error"]
    assert "x-request-id" in headers
    assert 200 == admin_api.get(f"/jobs/{job['id']}").status_code
    assert 200 == admin_api.get(f"/scaling-rules/{group}").status_code


def test_plain_ids_still_reach_their_routes(api_server: Any, admin_api: Any) -> None:
    """The guard lets ordinary paths and query strings through."""
    job = admin_api.post("/jobs", json=sync_job(str(uuid.uuid4()))).json()
    status, _, body = _raw(api_server, "GET", f"/jobs/{job['id']}?x=a%2Fb")
    assert 200 == status, body
    assert job["id"] == json.loads(body)["id"]


# -- numbers in range ------------------------------------------------------------

HUGE = [2**63, 2**64, -(2**63) - 1, 10**30]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("field", ["max_failures", "heartbeat_interval"])
def test_out_of_range_submission_integer_is_a_400(
    api: Any, container_group_id: str, field: str, value: int
) -> None:
    """A job's integers past their range are 400s naming the range, not 500s."""
    low, high = INTEGER_RANGES[field]
    for path, body in (
        ("/jobs", sync_job(container_group_id, **{field: value})),
        ("/jobs/batch", [sync_job(container_group_id, **{field: value})]),
    ):
        r = api.post(path, json=body)
        assert 400 == r.status_code, r.text
        assert f"{field} must be between {low} and {high}" in r.json()["message"]


def test_heartbeat_interval_range_edges(api: Any, container_group_id: str) -> None:
    """heartbeat_interval 1 s and 1 day are accepted; a day and a second is not."""
    for ok in (1, 86_400):
        job = sync_job(container_group_id, heartbeat_interval=ok)
        assert 202 == api.post("/jobs", json=job).status_code
    job = sync_job(container_group_id, heartbeat_interval=86_401)
    assert 400 == api.post("/jobs", json=job).status_code


def test_poison_heartbeat_interval_is_refused_at_submit(
    api: Any, container_group_id: str
) -> None:
    """A heartbeat_interval of 2e11 s is a 400, and listing still works."""
    job = sync_job(container_group_id, heartbeat_interval=200_000_000_000)
    assert 400 == api.post("/jobs", json=job).status_code
    assert 200 == api.get("/jobs").status_code


@pytest.mark.parametrize("field", ["attempt", "exit_code"])
@pytest.mark.parametrize("value", HUGE)
def test_out_of_range_report_integer_is_a_400(
    api: Any, container_group_id: str, field: str, value: int
) -> None:
    """A worker report's attempt or exit_code past its range is a 400."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.get(
        "/work",
        params={"machine_id": "m", "container_group_id": job["container_group_id"]},
    )
    for verb in ("heartbeat", "progress", "completed", "failed", "release"):
        body = report("m", container_group_id, progress={"step": 1}, **{field: value})
        r = api.post(f"/jobs/{job['id']}/{verb}", json=body)
        assert 400 == r.status_code, (verb, r.text)
        assert field in r.json()["message"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/jobs", {"page": 2**63}),
        ("/jobs", {"page": 10**30}),
        ("/jobs", {"page_size": 2**64}),
        ("/jobs/{id}/status", {"machine_id": "m", "attempt": 2**63}),
        ("/jobs/{id}/logs", {"since": 2**63}),
        ("/jobs/{id}/logs", {"attempt": 2**64}),
        ("/jobs/{id}/logs", {"limit": 2**64}),
    ],
)
def test_out_of_range_query_integer_is_a_400(
    api: Any, container_group_id: str, path: str, params: dict[str, Any]
) -> None:
    """Query integers past their range are 400s with the usual error body."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    r = api.get(path.format(id=job["id"]), params=params)
    assert 400 == r.status_code, r.text
    assert {"error", "message"} <= set(r.json())
    assert next(iter(params.keys() - {"machine_id"})) in r.json()["message"]


def test_out_of_range_log_batch_integers_are_400s(
    api: Any, container_group_id: str
) -> None:
    """A log batch's attempt and offset past their ranges are 400s."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    for change in ({"attempt": 2**64}, {"offset": 2**53}, {"attempt": 0}):
        body = {"machine_id": "m", "attempt": 1, "offset": 0, "lines": [], **change}
        r = api.post(f"/jobs/{job['id']}/logs", json=body)
        assert 400 == r.status_code, r.text


# -- ids that are index keys -------------------------------------------------------


def _long_id() -> str:
    # Random, so that PostgreSQL cannot compress it under its index size limit.
    return uuid.uuid4().hex * 200


@pytest.mark.parametrize(
    "where",
    [
        "submit container_group_id",
        "work machine_id",
        "work container_group_id",
        "status machine_id",
        "heartbeat machine_id",
        "logs machine_id",
        "username",
    ],
)
def test_an_overlong_key_is_a_400(
    admin_api: Any, container_group_id: str, where: str
) -> None:
    """Ids stored as index keys longer than MAX_KEY_LENGTH are 400s, not 5xx."""
    job = admin_api.post("/jobs", json=sync_job(container_group_id)).json()
    long = _long_id()
    work = {"machine_id": "m", "container_group_id": container_group_id}
    calls = {
        "submit container_group_id": lambda: admin_api.post(
            "/jobs", json=sync_job(long)
        ),
        "work machine_id": lambda: admin_api.get(
            "/work", params={**work, "machine_id": long}
        ),
        "work container_group_id": lambda: admin_api.get(
            "/work", params={**work, "container_group_id": long}
        ),
        "status machine_id": lambda: admin_api.get(
            f"/jobs/{job['id']}/status", params={"machine_id": long}
        ),
        "heartbeat machine_id": lambda: admin_api.post(
            f"/jobs/{job['id']}/heartbeat", json=report(long, container_group_id)
        ),
        "logs machine_id": lambda: admin_api.post(
            f"/jobs/{job['id']}/logs",
            json={"machine_id": long, "attempt": 1, "offset": 0, "lines": []},
        ),
        "username": lambda: admin_api.post("/users", json={"username": long}),
    }
    r = calls[where]()
    assert 400 == r.status_code, r.text
    assert f"at most {MAX_KEY_LENGTH} characters" in r.json()["message"]
    assert 200 == admin_api.get("/jobs", params={"page_size": 1}).status_code


def test_a_value_too_large_for_an_index_is_not_an_outage() -> None:
    """PostgreSQL's program-limit errors are not taken for a lost database."""
    import psycopg

    from kelpie_sdk.server._pg import classify

    assert None is classify(psycopg.errors.ProgramLimitExceeded("index row too big"))
    assert "connection" == classify(psycopg.OperationalError("connection refused"))


# -- JSON depth, NULs, body size ------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/jobs"),
        ("POST", "/jobs/batch"),
        ("POST", "/jobs/{id}/heartbeat"),
        ("POST", "/jobs/{id}/logs"),
        ("POST", "/scaling-rules"),
        ("PATCH", "/scaling-rules/{group}"),
        ("POST", "/users"),
    ],
)
def test_json_nested_too_deep_is_a_400(
    admin_api: Any, container_group_id: str, method: str, path: str
) -> None:
    """JSON nested 1,000 deep is a 400 naming the limit, on every JSON route."""
    job = admin_api.post("/jobs", json=sync_job(container_group_id)).json()
    r = admin_api.request(
        method,
        path.format(id=job["id"], group=container_group_id),
        data=_nested(1000),
        headers={"content-type": "application/json"},
    )
    assert 400 == r.status_code, r.text
    assert f"more than {MAX_JSON_DEPTH} levels" in r.json()["message"]


def test_json_within_the_depth_limit_is_accepted(
    api: Any, container_group_id: str
) -> None:
    """A progress record nested near the limit is still fine."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    progress: Any = {"step": 1}
    for _ in range(MAX_JSON_DEPTH - 2):
        progress = {"deeper": progress}
    body = report("m", container_group_id, progress=progress)
    assert 200 == api.post(f"/jobs/{job['id']}/progress", json=body).status_code


def test_depth_scan_ignores_brackets_in_strings() -> None:
    """Brackets inside strings do not count, escaped quotes included."""
    inside = json.dumps({"a": "[" * 500 + '\\"{' * 100})
    assert not json_too_deep(inside.encode())
    # Without an escaped quote (the scan's faster path).
    assert not json_too_deep(json.dumps({"a": "[" * 500, "b": ["{" * 80]}).encode())
    assert json_too_deep(_nested(MAX_JSON_DEPTH + 1).encode())
    assert not json_too_deep(_nested(MAX_JSON_DEPTH).encode())


@given(
    kinds=st.lists(st.sampled_from(["list", "dict"]), max_size=MAX_JSON_DEPTH + 8),
    leaf=st.text(alphabet='[]{}"\\ab\x00', max_size=12),
)
def test_depth_scan_agrees_with_the_structure(kinds: list[str], leaf: str) -> None:
    """For any nesting of lists and objects around any string, the scan is exact."""
    value: Any = leaf
    for kind in reversed(kinds):
        value = [value, leaf] if kind == "list" else {leaf: value}
    body = json.dumps(value).encode()
    assert (len(kinds) > MAX_JSON_DEPTH) == json_too_deep(body)
    assert ("\x00" in leaf) == json_has_nul(body)


def test_nul_scan_tells_an_escaped_backslash_apart() -> None:
    """`\\u0000` is a NUL; `\\\\u0000` is a backslash and text."""
    assert json_has_nul(json.dumps({"a": "x\x00"}).encode())
    assert not json_has_nul(json.dumps({"a": "\\u0000"}).encode())
    assert json_has_nul(json.dumps({"a": "\\\x00"}).encode())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/jobs", {"command": "a\x00b"}),
        ("/jobs", {"environment": {"A": "\x00"}}),
        ("/users", {"username": "a\x00"}),
    ],
)
def test_nul_in_a_json_string_is_a_400(
    admin_api: Any, container_group_id: str, path: str, body: dict[str, Any]
) -> None:
    """PostgreSQL cannot store NUL: a string with one is a 400 on both databases."""
    if path == "/jobs":
        body = sync_job(container_group_id, **body)
    r = admin_api.post(path, json=body)
    assert 400 == r.status_code, r.text
    assert "NUL" in r.json()["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/jobs?container_group_id=%00",
        "/jobs?name=a%00",
        "/jobs?id_prefix=%00",
        "/work?machine_id=%00&container_group_id=g",
    ],
)
def test_nul_in_the_query_string_is_a_400(api: Any, path: str) -> None:
    """A NUL in a query parameter is a 400, not a database error."""
    r = api.get(path)
    assert 400 == r.status_code, r.text
    assert "NUL" in r.json()["message"]


def test_nul_in_a_log_line_is_stored_as_a_replacement_character(
    api: Any, container_group_id: str
) -> None:
    """A job that prints NUL keeps its log line, with U+FFFD in its place."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    claimed = api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    ).json()[0]
    line = {"stream": "stdout", "time": 1.0, "line": "a\x00b"}
    body = {
        "machine_id": "m",
        "attempt": claimed["attempt"],
        "offset": 0,
        "lines": [line],
    }
    assert 200 == api.post(f"/jobs/{job['id']}/logs", json=body).status_code
    lines = api.get(f"/jobs/{job['id']}/logs").json()["lines"]
    assert ["a\ufffdb"] == [x["line"] for x in lines]


def test_nul_in_a_failure_report_error_is_kept_as_a_replacement_character(
    api: Any, container_group_id: str
) -> None:
    """A failure whose output tail holds NUL is recorded, not refused."""
    job = api.post("/jobs", json=sync_job(container_group_id, max_failures=1)).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    body = report("m", container_group_id, attempt=1, error="boom\x00", reason="r\x00")
    r = api.post(f"/jobs/{job['id']}/failed", json=body)
    assert 202 == r.status_code, r.text
    got = api.get(f"/jobs/{job['id']}").json()
    assert "failed" == got["status"]
    assert "boom\ufffd" == got["last_error"]


def test_nul_in_a_report_machine_id_is_a_400(api: Any, container_group_id: str) -> None:
    """A machine id with NUL cannot name a machine: 400."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    r = api.post(
        f"/jobs/{job['id']}/heartbeat", json=report("m\x00", container_group_id)
    )
    assert 400 == r.status_code, r.text
    assert "NUL" in r.json()["message"]


def test_body_over_the_limit_is_a_413(api: Any) -> None:
    """A body past the documented limit is a 413 with the usual error body."""
    r = api.post(
        "/jobs",
        data=b" " * (MAX_BODY_BYTES + 1),
        headers={"content-type": "application/json"},
    )
    assert 413 == r.status_code
    assert {"error", "message"} <= set(r.json())


# -- request ids and safe 500s ------------------------------------------------------------


def test_every_response_carries_a_request_id(api: Any) -> None:
    """Successes, 4xx and unknown routes all answer X-Request-Id, each new."""
    ids = {
        api.get("/health").headers.get("x-request-id"),
        api.get("/jobs").headers.get("x-request-id"),
        api.get("/nowhere").headers.get("x-request-id"),
        api.post("/jobs", json={}).headers.get("x-request-id"),
    }
    assert None not in ids
    assert 4 == len(ids)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("tab\there", False),
    ],
)
def test_a_sane_client_request_id_is_kept(api: Any, sent: str, kept: bool) -> None:
    """A client's X-Request-Id of 1 to 128 printable characters is echoed."""
    got = api.get("/jobs", headers={"X-Request-Id": sent}).headers["x-request-id"]
    assert kept == (sent == got)
    assert 1 <= len(got) <= 128


def test_a_500_hides_the_exception_and_gives_the_request_id(
    api_server: Any,
    api: Any,
    container_group_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A crash answers a generic message and the id; the log has the details."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    engine = api_server.store.engine
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET status='bogus-status' WHERE id=:i"),
            {"i": job["id"]},
        )
    try:
        with caplog.at_level(logging.ERROR, logger="kelpie_sdk.server._app"):
            r = api.get(f"/jobs/{job['id']}", headers={"X-Request-Id": "probe-500"})
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM jobs WHERE id=:i"), {"i": job["id"]})
    assert 500 == r.status_code
    assert "probe-500" == r.headers["x-request-id"]
    body = r.json()
    assert "Internal server error" == body["error"]
    assert "probe-500" == body["request_id"]
    assert "probe-500" in body["message"]
    assert "bogus" not in r.text
    assert "ValueError" not in r.text
    logged = [rec for rec in caplog.records if "probe-500" in rec.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


# -- robust reads -----------------------------------------------------------------------


def test_a_row_with_an_impossible_time_does_not_break_reads(
    api_server: Any, api: Any, container_group_id: str
) -> None:
    """A lease in the year 14702 (an old poison row) reads as the year 9999."""
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    api.get(
        "/work", params={"machine_id": "m", "container_group_id": container_group_id}
    )
    far = 200_000_000_000 * 2000
    with api_server.store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET lease_expires=:t, heartbeat=:t WHERE id=:i"),
            {"t": far, "i": job["id"]},
        )
    listed = api.get("/jobs", params={"container_group_id": container_group_id})
    assert 200 == listed.status_code, listed.text
    one = api.get(f"/jobs/{job['id']}")
    assert 200 == one.status_code, one.text
    assert one.json()["heartbeat"].startswith("9999-12-31T23:59:59")


# -- the SQLite file's mode ------------------------------------------------------------


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_database_is_readable_by_its_owner_only(
    tmp_path: pathlib.Path,
) -> None:
    """The database, -wal and -shm are created 0600, whatever the umask."""
    from kelpie_sdk.server import open_store

    db = tmp_path / "new" / "kelpie.db"
    old = os.umask(0o022)
    try:
        store = open_store(f"sqlite:///{db}")
        try:
            store.ensure_admin("admin-key-for-the-mode-test-" + "m" * 8)
            modes = {
                p.name: _mode(p)
                for p in db.parent.iterdir()
                if p.name.startswith("kelpie.db")
            }
        finally:
            store.close()
    finally:
        os.umask(old)
    assert {"kelpie.db", "kelpie.db-wal", "kelpie.db-shm"} <= modes.keys()
    assert {0o600} == set(modes.values())


def test_a_loose_sqlite_database_is_tightened_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An existing database readable by others is made 0600, and the log says so."""
    from kelpie_sdk.server import open_store

    db = tmp_path / "kelpie.db"
    open_store(f"sqlite:///{db}").close()
    db.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="kelpie_sdk.server._db"):
        open_store(f"sqlite:///{db}").close()
    assert 0o600 == _mode(db)
    assert any("0644" in r.getMessage() for r in caplog.records)


def test_a_503_names_no_database_details() -> None:
    """With PostgreSQL unreachable, the 503 gives the request id, not the driver's text."""
    import psycopg
    import requests

    from kelpie_sdk.testing import run_server

    from ..pg import ADMIN_URL, fresh_database

    with fresh_database() as url, run_server(database_url=url) as handle:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s",
                (name,),
            )
        try:
            r = requests.get(
                handle.url + "/jobs",
                headers={"X-Kelpie-Key": handle.admin_key, "X-Request-Id": "probe-503"},
                timeout=30,
            )
        finally:
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    assert 503 == r.status_code, r.text
    assert "probe-503" == r.json()["request_id"]
    assert name not in r.text
    assert "Error" not in r.text
