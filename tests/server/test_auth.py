"""
Authentication, users, keys and admin-only endpoints.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..conftest import Api


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "API Key or Bearer Token Required"),
        ({"X-Kelpie-Key": "wrong"}, 403, "Invalid API Key"),
        (
            {"Salad-Api-Key": "k"},
            400,
            "Salad API Key requires Salad-Organization and Salad-Project headers",
        ),
        (
            {"Authorization": "Bearer x"},
            400,
            "Bearer Token requires Salad-Project header",
        ),
        (
            {"Salad-Api-Key": "k", "Salad-Organization": "o", "Salad-Project": "p"},
            403,
            "use X-Kelpie-Key",
        ),
    ],
    ids=["none", "bad-key", "salad-no-org", "bearer-no-project", "salad-unsupported"],
)
def test_auth_header_rules(
    api_server: Any, headers: dict[str, str], status: int, message: str
) -> None:
    """Missing or unusable credentials get the protocol's status and a clear message."""
    r = Api(api_server.url, None).get("/jobs", headers=headers)
    assert status == r.status_code
    assert message in r.json()["message"]


def test_me_returns_the_caller(api: Any) -> None:
    """GET /users/me names the key's user."""
    me = api.get("/users/me").json()
    assert me["username"].startswith("u-")
    assert {"id", "username", "created"} == set(me)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/users", {"username": "x"}),
        ("POST", "/users/u/token", {}),
        ("DELETE", "/users", None),
        ("DELETE", "/jobs", None),
        ("DELETE", "/scaling-rules", None),
    ],
)
def test_admin_only_endpoints(api: Any, method: str, path: str, body: Any) -> None:
    """Admin endpoints answer 403 'Admin Only' to ordinary users."""
    r = api.request(method, path, json=body)
    assert (403, "Admin Only") == (r.status_code, r.json()["message"])


def test_users_and_tokens(admin_api: Any, api_server: Any) -> None:
    """The admin creates users and keys; duplicate names and unknown users are refused."""
    user = admin_api.post("/users", json={"username": "carol"}).json()
    assert 400 == admin_api.post("/users", json={"username": "carol"}).status_code
    assert 400 == admin_api.post("/users", json={"username": " "}).status_code
    token = admin_api.post(
        f"/users/{user['id']}/token", json={"org_name": "o", "project_name": "p"}
    )
    assert 201 == token.status_code
    assert (
        "carol"
        == Api(api_server.url, token.json()["token"])
        .get("/users/me")
        .json()["username"]
    )
    assert 404 == admin_api.post("/users/nobody/token", json={}).status_code


def test_delete_users_revokes_their_keys(admin_api: Any, api: Any) -> None:
    """After DELETE /users, ordinary keys stop working at once; the admin's does not."""
    assert 200 == api.get("/users/me").status_code
    assert 204 == admin_api.delete("/users").status_code
    assert 403 == api.get("/users/me").status_code
    assert "admin" == admin_api.get("/users/me").json()["username"]


def test_public_endpoints_need_no_key(api_server: Any) -> None:
    """Health, the OpenAPI document and the docs UI are public."""
    anon = Api(api_server.url, None)
    assert {"status": "ok"} == anon.get("/health").json()
    assert 200 == anon.get("/docs").status_code
    spec = anon.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    for name in ("Job", "JobSubmission", "WorkerReport", "ScalingRule", "SyncConfig"):
        assert name in schemas
    assert "/work" in spec["paths"]


def test_unknown_route_is_json_404(api: Any) -> None:
    """An unknown path is a JSON 404."""
    r = api.get("/nowhere")
    assert (404, "Route Not Found") == (r.status_code, r.json()["error"])


def test_wrong_method_is_json_405(api: Any) -> None:
    """A known path with the wrong method is a JSON 405."""
    r = api.request("PUT", "/jobs")
    assert 405 == r.status_code
    assert r.json()["error"]
