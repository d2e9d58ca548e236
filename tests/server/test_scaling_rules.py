"""
Scaling rules: stored and validated (the autoscaler comes later).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest


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
    """One rule per container group."""
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
