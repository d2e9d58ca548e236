"""
Scaling rules: stored and validated, one per tenant and container group.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Api


def rule(**extra: Any) -> dict[str, Any]:
    return {
        "container_group_id": str(uuid.uuid4()),
        "min_replicas": 0,
        "max_replicas": 10,
        "idle_threshold_seconds": 300,
        **extra,
    }


def test_rule_crud(api: Any) -> None:
    """Create, read, list, patch and delete a rule."""
    body = rule(container_group_name="trainers")
    r = api.post("/scaling-rules", json=body)
    assert 201 == r.status_code
    created = r.json()
    assert ("acme", "proj", "trainers", 10) == (
        created["org_name"],
        created["project_name"],
        created["container_group_name"],
        created["max_replicas"],
    )
    cg = body["container_group_id"]
    assert created == api.get(f"/scaling-rules/{cg}").json()
    assert {"_count": 1, "rules": [created]} == api.get("/scaling-rules").json()
    patched = api.patch(f"/scaling-rules/{cg}", json={"min_replicas": 2}).json()
    assert (2, 10) == (patched["min_replicas"], patched["max_replicas"])
    assert 204 == api.delete(f"/scaling-rules/{cg}").status_code
    missing = api.get(f"/scaling-rules/{cg}")
    assert (404, "Scaling Rule Not Found") == (
        missing.status_code,
        missing.json()["error"],
    )
    assert 204 == api.delete(f"/scaling-rules/{cg}").status_code


@pytest.mark.parametrize(
    "change",
    [
        {"container_group_id": "not-a-uuid"},
        {"min_replicas": -1},
        {"max_replicas": 501},
        {"idle_threshold_seconds": 3601},
        {"min_replicas": 5, "max_replicas": 4},
        {"max_replicas": "10"},
    ],
    ids=str,
)
def test_invalid_rules_are_400(api: Any, change: dict[str, Any]) -> None:
    """Out-of-range limits, min > max and non-UUID groups are rejected."""
    assert 400 == api.post("/scaling-rules", json=rule(**change)).status_code


def test_duplicate_rule_is_409(api: Any) -> None:
    """One rule per tenant and container group."""
    body = rule()
    api.post("/scaling-rules", json=body)
    assert 409 == api.post("/scaling-rules", json=body).status_code


def test_patch_validation(api: Any) -> None:
    """An empty patch, a patch making min > max, and an unknown rule are refused."""
    body = rule()
    cg = body["container_group_id"]
    api.post("/scaling-rules", json=body)
    assert 400 == api.patch(f"/scaling-rules/{cg}", json={}).status_code
    assert 400 == api.patch(f"/scaling-rules/{cg}", data="").status_code
    assert (
        400 == api.patch(f"/scaling-rules/{cg}", json={"min_replicas": 11}).status_code
    )
    assert (
        404
        == api.patch(
            f"/scaling-rules/{uuid.uuid4()}", json={"min_replicas": 1}
        ).status_code
    )


def test_admin_deletes_all_rules(api: Any, admin_api: Any) -> None:
    """DELETE /scaling-rules (admin) removes every rule."""
    api.post("/scaling-rules", json=rule())
    assert 204 == admin_api.delete("/scaling-rules").status_code
    assert 0 == api.get("/scaling-rules").json()["_count"]


@pytest.fixture
def other_api(api_server: Any, admin_api: Api) -> Api:
    """Raw HTTP as a second fresh user, in another organization."""
    user = admin_api.post("/users", json={"username": f"u-{uuid.uuid4().hex}"}).json()
    key = admin_api.post(
        f"/users/{user['id']}/token",
        json={"org_name": "globex", "project_name": "other"},
    ).json()["token"]
    return Api(api_server.url, key)


def test_two_tenants_each_have_their_own_rule_for_one_group(
    api: Api, other_api: Api
) -> None:
    """Both create a rule for the same group id; each sees and changes only its own."""
    body = rule(container_group_name="mine")
    cg = body["container_group_id"]
    mine = api.post("/scaling-rules", json=body)
    theirs = other_api.post(
        "/scaling-rules", json={**body, "max_replicas": 3, "container_group_name": "x"}
    )
    assert (201, 201) == (mine.status_code, theirs.status_code)
    assert ("acme", "globex") == (mine.json()["org_name"], theirs.json()["org_name"])
    assert mine.json() == api.get(f"/scaling-rules/{cg}").json()
    assert theirs.json() == other_api.get(f"/scaling-rules/{cg}").json()
    assert [mine.json()] == api.get("/scaling-rules").json()["rules"]
    assert [theirs.json()] == other_api.get("/scaling-rules").json()["rules"]
    patched = other_api.patch(f"/scaling-rules/{cg}", json={"min_replicas": 2})
    assert (2, 3) == (patched.json()["min_replicas"], patched.json()["max_replicas"])
    assert (0, 10) == (
        api.get(f"/scaling-rules/{cg}").json()["min_replicas"],
        api.get(f"/scaling-rules/{cg}").json()["max_replicas"],
    )
    assert 204 == other_api.delete(f"/scaling-rules/{cg}").status_code
    assert 404 == other_api.get(f"/scaling-rules/{cg}").status_code
    assert mine.json() == api.get(f"/scaling-rules/{cg}").json()


def test_a_tenant_cannot_reach_another_tenants_rule(api: Api, other_api: Api) -> None:
    """Another tenant's rule is 404 to read or patch, and survives its delete."""
    body = rule()
    cg = body["container_group_id"]
    created = api.post("/scaling-rules", json=body).json()
    user_id = created["user_id"]
    for query in ("", f"?user_id={user_id}"):
        assert 404 == other_api.get(f"/scaling-rules/{cg}{query}").status_code
        assert (
            404
            == other_api.patch(
                f"/scaling-rules/{cg}{query}", json={"min_replicas": 1}
            ).status_code
        )
        assert 204 == other_api.delete(f"/scaling-rules/{cg}{query}").status_code
    assert 0 == other_api.get("/scaling-rules").json()["_count"]
    assert created == api.get(f"/scaling-rules/{cg}").json()


def test_admin_names_the_tenant_when_several_have_a_rule(
    api: Api, other_api: Api, admin_api: Api
) -> None:
    """The admin gets the group's only rule, must name one of several, sees all."""
    body = rule()
    cg = body["container_group_id"]
    mine = api.post("/scaling-rules", json=body).json()
    assert mine == admin_api.get(f"/scaling-rules/{cg}").json()
    theirs = other_api.post("/scaling-rules", json=body).json()
    ambiguous = admin_api.get(f"/scaling-rules/{cg}")
    assert (409, "Conflict") == (ambiguous.status_code, ambiguous.json()["error"])
    assert 409 == admin_api.delete(f"/scaling-rules/{cg}").status_code
    assert (
        theirs
        == admin_api.get(f"/scaling-rules/{cg}?user_id={theirs['user_id']}").json()
    )
    listed = admin_api.get("/scaling-rules").json()["rules"]
    assert [mine, theirs] == [r for r in listed if r["container_group_id"] == cg]
    patched = admin_api.patch(
        f"/scaling-rules/{cg}?user_id={mine['user_id']}", json={"max_replicas": 4}
    ).json()
    assert (mine["user_id"], 4) == (patched["user_id"], patched["max_replicas"])
    assert 10 == other_api.get(f"/scaling-rules/{cg}").json()["max_replicas"]
    assert (
        204
        == admin_api.delete(
            f"/scaling-rules/{cg}?user_id={mine['user_id']}"
        ).status_code
    )
    assert 404 == api.get(f"/scaling-rules/{cg}").status_code
    assert theirs == other_api.get(f"/scaling-rules/{cg}").json()


def test_admins_own_rule_comes_first(api: Api, admin_api: Api) -> None:
    """With its own rule for the group, the admin addresses that one by default."""
    body = rule()
    cg = body["container_group_id"]
    theirs = api.post("/scaling-rules", json=body).json()
    own = admin_api.post("/scaling-rules", json={**body, "max_replicas": 7}).json()
    try:
        assert own == admin_api.get(f"/scaling-rules/{cg}").json()
        assert 204 == admin_api.delete(f"/scaling-rules/{cg}").status_code
        assert theirs == admin_api.get(f"/scaling-rules/{cg}").json()
    finally:
        admin_api.delete(f"/scaling-rules/{cg}?user_id={own['user_id']}")
