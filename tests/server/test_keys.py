"""
Roles and API keys: which role may call which route, making, listing and
revoking keys, expiry, last use, the admin key, and the rate limits.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server import create_app
from kelpie_sdk.server._ratelimit import FailureLimiter, KeyRateLimiter
from kelpie_sdk.server._store import Store
from kelpie_sdk.testing import ServerHandle, run_server

from ..conftest import Api, FakeClock
from .helpers import report, sync_job

#: A key's format, as secret scanners may match it.
KEY_FORMAT = re.compile(r"^kelpie_[auw]_[A-Za-z0-9_-]{43}$")

ADMIN, USERS, ANY, PUBLIC = (
    ("admin",),
    ("admin", "user"),
    ("admin", "user", "worker"),
    "public",
)

#: Every route of the application and who may call it. A route missing here
#: (or here but gone) fails ``test_every_route_has_its_decision``.
EXPECTED: dict[tuple[str, str], Any] = {
    ("POST", "/jobs"): USERS,
    ("GET", "/jobs"): USERS,
    ("DELETE", "/jobs"): ADMIN,
    ("POST", "/jobs/batch"): USERS,
    ("GET", "/jobs/{job_id:str}"): USERS,
    ("DELETE", "/jobs/{job_id:str}"): USERS,
    ("GET", "/jobs/{job_id:str}/events"): USERS,
    ("DELETE", "/jobs/container-groups/{group:str}"): USERS,
    ("GET", "/machines"): USERS,
    ("GET", "/work"): ANY,
    ("POST", "/jobs/{job_id:str}/heartbeat"): ANY,
    ("POST", "/jobs/{job_id:str}/completed"): ANY,
    ("POST", "/jobs/{job_id:str}/failed"): ANY,
    ("POST", "/jobs/{job_id:str}/release"): ANY,
    ("POST", "/jobs/{job_id:str}/progress"): ANY,
    ("GET", "/jobs/{job_id:str}/status"): ANY,
    ("POST", "/jobs/{job_id:str}/logs"): ANY,
    ("GET", "/jobs/{job_id:str}/logs"): USERS,
    ("POST", "/scaling-rules"): USERS,
    ("GET", "/scaling-rules"): USERS,
    ("DELETE", "/scaling-rules"): ADMIN,
    ("GET", "/scaling-rules/{group:str}"): USERS,
    ("PATCH", "/scaling-rules/{group:str}"): USERS,
    ("DELETE", "/scaling-rules/{group:str}"): USERS,
    ("GET", "/users/me"): ANY,
    ("POST", "/users"): ADMIN,
    ("DELETE", "/users"): ADMIN,
    ("POST", "/users/{user_id:str}/token"): ADMIN,
    ("POST", "/keys"): USERS,
    ("GET", "/keys"): USERS,
    ("DELETE", "/keys/{key_id:str}"): USERS,
    ("GET", "/users/me/webhook-secret"): USERS,
    ("POST", "/users/me/webhook-secret"): USERS,
    ("GET", "/health"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): ADMIN,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/{path:str}"): PUBLIC,
    ("GET", "/docs/openapi.json"): PUBLIC,
    ("GET", "/docs/oauth2-redirect.html"): PUBLIC,
    ("GET", "/docs/assets/{file_path:path}"): PUBLIC,
    ("HEAD", "/docs/assets/{file_path:path}"): PUBLIC,
    ("GET", "/ui"): PUBLIC,
    ("GET", "/ui/groups"): PUBLIC,
    ("GET", "/ui/jobs/{job_id:str}"): PUBLIC,
    ("GET", "/ui/login"): PUBLIC,
    ("POST", "/ui/login"): PUBLIC,
    ("POST", "/ui/logout"): PUBLIC,
    ("GET", "/ui/session"): PUBLIC,
    ("GET", "/ui/api/groups"): USERS,
    ("GET", "/ui/static/{name:str}"): PUBLIC,
}

#: What each path parameter is replaced with in a request.
PARAMS = {
    "job_id": str(uuid.uuid4()),
    "group": str(uuid.uuid4()),
    "user_id": "nobody",
    "key_id": "0000000000000000",
    "path": "nothing",
    "file_path": "swagger-ui.css",
    "name": "app.js",
}


def _routes(store: Store) -> dict[tuple[str, str], Any]:
    app = create_app(store)
    found: dict[tuple[str, str], Any] = {}
    for route in app.routes:
        for handler in route.route_handlers:  # type: ignore[union-attr]
            for method in handler.http_methods:
                if method != "OPTIONS":
                    found[(method, route.path)] = handler.opt.get("access")
    return found


def _denied_by_role(answer: Any) -> bool:
    if answer.status_code != 403:
        return False
    message = answer.json().get("message", "")
    return message == "Admin Only" or "key may not call" in message


@pytest.fixture(scope="module")
def own_server() -> Iterator[ServerHandle]:
    """A server of this module's own: the walk calls every admin route."""
    with run_server() as handle:
        yield handle


def _role_keys(server: ServerHandle) -> dict[str, str]:
    admin = Api(server.url, server.admin_key)
    user = admin.post("/users", json={"username": f"u-{uuid.uuid4().hex}"}).json()
    keys = {"admin": server.admin_key}
    for role in ("user", "worker"):
        made = admin.post("/keys", json={"role": role, "user_id": user["id"]})
        assert 201 == made.status_code, made.text
        keys[role] = made.json()["key"]
    return keys


def test_every_route_has_its_decision(own_server: ServerHandle) -> None:
    """Every route's access decision is the one in the table, and none is missing."""
    assert EXPECTED == _routes(own_server.store)


@pytest.mark.parametrize("role", ["worker", "user", "admin"])
def test_every_route_admits_exactly_its_roles(
    own_server: ServerHandle, role: str
) -> None:
    """Each role's key is refused exactly by the routes not open to it."""
    keys = _role_keys(own_server)
    api = Api(own_server.url, keys[role])
    anonymous = Api(own_server.url, None)
    wrong: list[str] = []
    # The admin's destructive calls last, so that the other calls still find
    # the user and its keys.
    order = sorted(EXPECTED, key=lambda r: (r[0] == "DELETE", r))
    for method, path in order:
        access = EXPECTED[(method, path)]
        url = re.sub(
            r"\{(\w+)(:\w+)?\}", lambda m: PARAMS[m.group(1)], path.split("?")[0]
        )
        query = {"machine_id": "m", "container_group_id": PARAMS["group"]}
        body = {} if method in ("POST", "PATCH") else None
        if access == PUBLIC:
            answer = anonymous.request(method, url, params=query, json=body)
            if answer.status_code == 403 or "Key or Bearer" in answer.text:
                wrong.append(f"{method} {path}: {answer.status_code} without a key")
            continue
        answer = api.request(method, url, params=query, json=body)
        if _denied_by_role(answer) == (role in access):
            wrong.append(f"{method} {path}: {answer.status_code} {answer.text[:80]}")
    assert [] == wrong


def test_a_route_without_a_decision_is_refused_at_start(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_app refuses a route whose handler has no access decision."""
    from litestar import get

    from kelpie_sdk.server import _app

    @get("/undecided", sync_to_thread=False)
    def undecided() -> str:
        return "?"

    handlers = _app.ui_handlers
    monkeypatch.setattr(_app, "ui_handlers", lambda: [*handlers(), undecided])
    with pytest.raises(RuntimeError, match=r"/undecided.*no access decision"):
        create_app(store)


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    """A fresh SQLite store."""
    from kelpie_sdk.server import open_store

    store = open_store(f"sqlite:///{tmp_path}/k.db")
    yield store
    store.close()


# -- making, listing, revoking ---------------------------------------------------


def test_keys_carry_a_prefix_and_are_shown_once(api: Api, admin_api: Api) -> None:
    """A new key has the documented format; listings never show a secret."""
    made = api.post("/keys", json={"role": "worker"})
    assert 201 == made.status_code
    key = made.json()
    assert KEY_FORMAT.match(key["key"])
    assert key["key"].startswith("kelpie_w_")
    assert ("worker", None, None) == (
        key["role"],
        key["container_groups"],
        key["expires"],
    )
    listed = api.get("/keys").json()["keys"]
    assert key["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    everyone = admin_api.get("/keys", params={"all_users": "true"}).json()["keys"]
    assert all("key" not in k for k in everyone)
    assert key["id"] in [k["id"] for k in everyone]


def test_the_token_endpoint_makes_user_keys(admin_api: Api) -> None:
    """POST /users/{id}/token still works and makes a ``user`` key."""
    user = admin_api.post("/users", json={"username": f"t-{uuid.uuid4().hex}"})
    token = admin_api.post(f"/users/{user.json()['id']}/token", json={}).json()
    assert token["token"].startswith("kelpie_u_")
    keys = admin_api.get("/keys", params={"all_users": "true"}).json()["keys"]
    mine = [k for k in keys if k["user_id"] == user.json()["id"]]
    assert ["user"] == [k["role"] for k in mine]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"role": "admin"}, 403),
        ({"role": "user", "user_id": "00000000-0000-0000-0000-000000000000"}, 403),
        ({"role": "root"}, 400),
        ({"role": "user", "container_groups": ["g"]}, 400),
        ({"role": "worker", "container_groups": []}, 400),
        ({"role": "worker", "expires_in": 0}, 400),
        ({"role": "worker", "expires_in": "soon"}, 400),
    ],
    ids=[
        "admin-key",
        "other-user",
        "unknown-role",
        "groups-on-user-key",
        "no-groups",
        "zero-expiry",
        "string-expiry",
    ],
)
def test_users_cannot_make_keys_beyond_their_reach(
    api: Api, body: dict[str, Any], status: int
) -> None:
    """A user key makes user and worker keys of its own user only."""
    assert status == api.post("/keys", json=body).status_code


def test_only_the_admin_lists_every_users_keys(api: Api) -> None:
    """all_users=true is admin only."""
    assert 403 == api.get("/keys", params={"all_users": "true"}).status_code


def test_a_revoked_key_stops_at_once(api_server: Any, api: Api) -> None:
    """DELETE /keys/{id} makes the key fail on the very next request."""
    made = api.post("/keys", json={"role": "user"}).json()
    other = Api(api_server.url, made["key"])
    assert 200 == other.get("/jobs").status_code  # cached now
    assert 204 == api.delete(f"/keys/{made['id']}").status_code
    assert 403 == other.get("/jobs").status_code
    assert made["id"] not in [k["id"] for k in api.get("/keys").json()["keys"]]
    assert 404 == api.delete(f"/keys/{made['id']}").status_code


def test_users_revoke_only_their_own_non_admin_keys(
    api: Api, admin_api: Api, api_server: Any
) -> None:
    """Another user's key and admin keys are not found for a user key."""
    admin_key = admin_api.post("/keys", json={"role": "admin"}).json()
    assert admin_key["key"].startswith("kelpie_a_")
    assert 404 == api.delete(f"/keys/{admin_key['id']}").status_code
    stranger = admin_api.post("/users", json={"username": f"s-{uuid.uuid4().hex}"})
    theirs = admin_api.post(
        "/keys", json={"role": "user", "user_id": stranger.json()["id"]}
    ).json()
    assert 404 == api.delete(f"/keys/{theirs['id']}").status_code
    assert 200 == Api(api_server.url, theirs["key"]).get("/jobs").status_code
    assert 204 == admin_api.delete(f"/keys/{admin_key['id']}").status_code


def test_revocation_reaches_other_replicas_within_the_cache_bound(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that cached a key drops it once its cache entry ages out."""
    import time

    from kelpie_sdk.server import _app

    url = f"sqlite:///{tmp_path}/shared.db"
    key = "r" * 40
    with run_server(database_url=url, admin_key=key) as a:
        monkeypatch.setattr(_app, "KEY_CACHE_SECONDS", 0.05)
        with run_server(database_url=url, admin_key=key) as b:
            made = Api(a.url, key).post("/keys", json={"role": "user"}).json()
            on_b = Api(b.url, made["key"])
            assert 200 == on_b.get("/jobs").status_code
            assert 204 == Api(a.url, key).delete(f"/keys/{made['id']}").status_code
            time.sleep(0.06)
            assert 403 == on_b.get("/jobs").status_code


def test_expired_keys_stop_working(
    api_server: Any,
    api: Api,
    server_clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key made with expires_in fails once that time has passed."""
    from kelpie_sdk.server import _app

    monkeypatch.setattr(_app, "KEY_CACHE_SECONDS", 0.0)
    made = api.post("/keys", json={"role": "user", "expires_in": 60}).json()
    assert made["expires"] is not None
    short = Api(api_server.url, made["key"])
    assert 200 == short.get("/jobs").status_code
    server_clock.advance(61)
    assert 403 == short.get("/jobs").status_code
    assert made["id"] not in [k["id"] for k in api.get("/keys").json()["keys"]]


def test_last_use_is_written_at_most_once_a_minute(
    api_server: Any,
    api: Api,
    server_clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """last_used follows use, but is rewritten only after a minute."""
    from kelpie_sdk.server import _app

    monkeypatch.setattr(_app, "KEY_CACHE_SECONDS", 0.0)
    made = api.post("/keys", json={"role": "user"}).json()
    other = Api(api_server.url, made["key"])

    def last_used() -> str | None:
        keys = api.get("/keys").json()["keys"]
        return next(k["last_used"] for k in keys if k["id"] == made["id"])

    assert last_used() is None
    other.get("/jobs")
    first = last_used()
    assert first is not None
    server_clock.advance(30)
    other.get("/jobs")
    assert first == last_used()
    server_clock.advance(31)
    other.get("/jobs")
    assert first < (last_used() or "")


# -- worker keys -------------------------------------------------------------------


def test_a_worker_key_runs_a_job_and_nothing_else(
    api_server: Any, api: Api, container_group_id: str
) -> None:
    """Claim, heartbeat, logs and completion work; listing, reading, cancel don't."""
    worker = Api(
        api_server.url, api.post("/keys", json={"role": "worker"}).json()["key"]
    )
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    other = api.post("/jobs", json=sync_job(container_group_id)).json()
    claimed = worker.get(
        "/work", params={"machine_id": "m1", "container_group_id": container_group_id}
    ).json()
    assert [job["id"]] == [j["id"] for j in claimed]
    attempt = claimed[0]["attempt"]
    beat = worker.post(
        f"/jobs/{job['id']}/heartbeat",
        json=report("m1", container_group_id, attempt=attempt),
    )
    assert {"status": "running"} == beat.json()
    logs = worker.post(
        f"/jobs/{job['id']}/logs",
        json={
            "machine_id": "m1",
            "attempt": attempt,
            "offset": 0,
            "lines": [{"stream": "stdout", "time": 1.0, "line": "hi"}],
        },
    )
    assert 200 == logs.status_code
    status = worker.get(f"/jobs/{job['id']}/status", params={"machine_id": "m1"})
    assert {"status": "running"} == status.json()
    for method, path in [
        ("GET", "/jobs"),
        ("GET", f"/jobs/{other['id']}"),
        ("GET", f"/jobs/{job['id']}/logs"),
        ("DELETE", f"/jobs/{other['id']}"),
        ("GET", "/machines"),
        ("GET", "/keys"),
    ]:
        assert 403 == worker.request(method, path).status_code, path
    done = worker.post(
        f"/jobs/{job['id']}/completed",
        json=report("m1", container_group_id, attempt=attempt),
    )
    assert 200 == done.status_code
    assert "completed" == api.get(f"/jobs/{job['id']}").json()["status"]
    assert "pending" == api.get(f"/jobs/{other['id']}").json()["status"]


def test_a_worker_key_works_the_original_protocol(
    api_server: Any, api: Api, container_group_id: str
) -> None:
    """Reports without ``attempt`` (the original worker) take effect too."""
    worker = Api(
        api_server.url, api.post("/keys", json={"role": "worker"}).json()["key"]
    )
    job = api.post("/jobs", json=sync_job(container_group_id)).json()
    worker.get(
        "/work", params={"machine_id": "m2", "container_group_id": container_group_id}
    )
    failed = worker.post(
        f"/jobs/{job['id']}/failed", json=report("m2", container_group_id)
    )
    assert 202 == failed.status_code
    assert 1 == api.get(f"/jobs/{job['id']}").json()["num_failures"]


def test_a_worker_key_keeps_to_its_container_groups(
    api_server: Any, api: Api, container_group_id: str
) -> None:
    """A worker key limited to groups claims and reports only there."""
    elsewhere = str(uuid.uuid4())
    limited = api.post(
        "/keys", json={"role": "worker", "container_groups": [container_group_id]}
    ).json()
    assert [container_group_id] == limited["container_groups"]
    worker = Api(api_server.url, limited["key"])
    anywhere = Api(
        api_server.url, api.post("/keys", json={"role": "worker"}).json()["key"]
    )
    job = api.post("/jobs", json=sync_job(elsewhere)).json()
    claim = {"machine_id": "m3", "container_group_id": elsewhere}
    assert 403 == worker.get("/work", params=claim).status_code
    assert [job["id"]] == [j["id"] for j in anywhere.get("/work", params=claim).json()]
    beat = worker.post(f"/jobs/{job['id']}/heartbeat", json=report("m3", elsewhere))
    assert 403 == beat.status_code
    mine = {"machine_id": "m3", "container_group_id": container_group_id}
    assert 200 == worker.get("/work", params=mine).status_code


# -- the admin key -----------------------------------------------------------------


def test_short_admin_keys_are_refused(store: Store) -> None:
    """An admin key under 32 characters is a configuration error."""
    with pytest.raises(ConfigError, match="at least 32"):
        store.ensure_admin("a")


def test_a_new_admin_key_replaces_the_previous_one(store: Store) -> None:
    """The environment's key replaces the earlier one; made admin keys stay."""
    first, second = "1" * 32, "2" * 32
    store.ensure_admin(first)
    made = store.create_api_key("00000000-0000-0000-0000-000000000000", role="admin")
    assert made is not None
    assert made.key is not None
    store.ensure_admin(second)
    assert store.principal_for_key(first) is None
    assert store.principal_for_key(second) is not None
    assert store.principal_for_key(made.key) is not None
    assert None is store.ensure_admin(None)  # keeps the seeded key
    assert store.principal_for_key(second) is not None


def test_a_generated_admin_key_has_the_admin_prefix(store: Store) -> None:
    """The key made at first start is an admin key in the documented format."""
    generated = store.ensure_admin(None)
    assert generated is not None
    assert KEY_FORMAT.match(generated)
    assert generated.startswith("kelpie_a_")


def test_the_server_refuses_to_start_with_a_short_admin_key(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kelpie server` with KELPIE_ADMIN_KEY=a exits 1 and says why."""
    import io

    from rich.console import Console

    from kelpie_sdk.cli import main

    monkeypatch.setenv("KELPIE_ADMIN_KEY", "a")
    out = io.StringIO()
    code = main(
        ["server", "--port", "0", "--database", f"sqlite:///{tmp_path}/s.db"],
        console=Console(file=out, width=200, color_system=None),
    )
    assert 1 == code
    assert "KELPIE_ADMIN_KEY" in capsys.readouterr().err
    # No "Kelpie API on ..." banner first, as if the server had started.
    assert "Kelpie API on" not in out.getvalue()


# -- rate limits -------------------------------------------------------------------


def test_repeated_failed_authentication_is_answered_429() -> None:
    """After the limit of wrong keys an address gets 429 with Retry-After."""
    with run_server(auth_failure_limit=3) as server:
        wrong = Api(server.url, "kelpie_u_" + "x" * 43)
        assert [403, 403, 403] == [wrong.get("/jobs").status_code for _ in range(3)]
        refused = wrong.get("/jobs")
        assert 429 == refused.status_code
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Even the right key, from that address, until the window passes.
        assert 429 == Api(server.url, server.admin_key).get("/jobs").status_code


def test_failure_limiter_forgets_after_its_window() -> None:
    """Failures older than the window no longer count."""
    now = [0.0]
    limiter = FailureLimiter(limit=2, window=60.0, clock=lambda: now[0])
    limiter.failed("1.2.3.4")
    now[0] = 10.0
    limiter.failed("1.2.3.4")
    assert 50 == limiter.retry_after("1.2.3.4")
    assert limiter.retry_after("5.6.7.8") is None
    now[0] = 61.0
    assert limiter.retry_after("1.2.3.4") is None


def test_the_key_rate_limit_answers_429() -> None:
    """With --key-rate-limit, a key over its rate gets 429 with Retry-After."""
    with run_server(key_rate_limit=2) as server:
        api = Api(server.url, server.admin_key)
        assert [200, 200] == [api.get("/jobs").status_code for _ in range(2)]
        refused = api.get("/jobs")
        assert 429 == refused.status_code
        assert 30 == int(refused.headers["Retry-After"])


def test_key_rate_limiter_refills() -> None:
    """Tokens come back at the configured rate."""
    now = [0.0]
    limiter = KeyRateLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("k") is None for _ in range(60))
    assert 1 == limiter.take("k")
    now[0] = 1.0
    assert limiter.take("k") is None
    assert limiter.take("other") is None


# -- the dashboard -----------------------------------------------------------------


def _sign_in(url: str, key: str) -> Any:
    import requests

    session = requests.Session()
    answer = session.post(f"{url}/ui/login", data={"key": key}, allow_redirects=False)
    return session, answer


def test_revoking_a_key_signs_its_dashboard_sessions_out(
    api_server: Any, api: Api
) -> None:
    """A session signed in with a key ends when the key is revoked."""
    made = api.post("/keys", json={"role": "user"}).json()
    session, answer = _sign_in(api_server.url, made["key"])
    assert (303, "/ui") == (answer.status_code, answer.headers["location"])
    assert 200 == session.get(f"{api_server.url}/jobs", timeout=30).status_code
    assert 204 == api.delete(f"/keys/{made['id']}").status_code
    assert 401 == session.get(f"{api_server.url}/ui/session", timeout=30).status_code
    assert 403 == session.get(f"{api_server.url}/jobs", timeout=30).status_code
    page = session.get(f"{api_server.url}/ui", allow_redirects=False, timeout=30)
    assert (303, "/ui/login") == (page.status_code, page.headers["location"])


def test_worker_keys_cannot_sign_in_to_the_dashboard(api_server: Any, api: Api) -> None:
    """The dashboard lists jobs, which a worker key may not."""
    worker = api.post("/keys", json={"role": "worker"}).json()["key"]
    _, answer = _sign_in(api_server.url, worker)
    assert (303, "/ui/login?failed=1") == (
        answer.status_code,
        answer.headers["location"],
    )


def test_failed_dashboard_sign_ins_count_towards_the_limit() -> None:
    """Wrong keys at /ui/login are failed authentications too."""
    with run_server(auth_failure_limit=2) as server:
        for _ in range(2):
            _, answer = _sign_in(server.url, "wrong")
            assert 303 == answer.status_code
        _, answer = _sign_in(server.url, server.admin_key)
        assert 429 == answer.status_code
        assert "Retry-After" in answer.headers


# -- the migration -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_keys_made_before_roles_keep_working(tmp_path: Any, backend: str) -> None:
    """Migration 0006 turns the admin's old keys into seeded admin keys, others into user keys."""
    import contextlib

    import sqlalchemy as sa

    from kelpie_sdk.server import open_store
    from kelpie_sdk.server._db import ADMIN_ID, make_engine, upgrade
    from kelpie_sdk.server._store import hash_key, key_id_of

    from ..pg import fresh_database

    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(fresh_database())
            if backend == "postgresql"
            else f"sqlite:///{tmp_path}/old.db"
        )
        engine = make_engine(url)
        upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO users (id, username, created) VALUES "
                    "(:a, 'admin', 0), ('u1', 'alice', 0)"
                ),
                {"a": ADMIN_ID},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (key_hash, user_id, created) VALUES "
                    "(:admin, :a, 0), (:alice, 'u1', 0)"
                ),
                {
                    "admin": hash_key("old-admin"),
                    "a": ADMIN_ID,
                    "alice": hash_key("k1"),
                },
            )
        engine.dispose()
        store = open_store(url)
        stack.callback(store.close)
        admin = store.principal_for_key("old-admin")
        alice = store.principal_for_key("k1")
        assert admin is not None
        assert alice is not None
        assert ("admin", key_id_of(hash_key("old-admin"))) == (admin.role, admin.key_id)
        assert ("user", key_id_of(hash_key("k1"))) == (alice.role, alice.key_id)
        # The old admin key was seeded from the environment: the next one replaces it.
        store.ensure_admin("n" * 32)
        assert store.principal_for_key("old-admin") is None
        assert store.principal_for_key("k1") is not None
