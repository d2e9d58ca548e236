"""
Arbitrary input never makes the server answer 5xx or a non-JSON body.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
job_keys = st.sampled_from(
    [
        "command",
        "container_group_id",
        "arguments",
        "environment",
        "sync",
        "max_failures",
        "heartbeat_interval",
        "webhook",
        "compression",
        "input_bucket",
        "input_prefix",
    ]
)
job_like = st.dictionaries(job_keys, json_values, max_size=8)
paths = st.sampled_from(
    [
        "/jobs",
        "/jobs/batch",
        "/jobs/x/heartbeat",
        "/jobs/x/completed",
        "/jobs/x/failed",
        "/jobs/x/release",
        "/jobs/x/logs",
        "/scaling-rules",
        "/users",
    ]
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, body=job_like | json_values)
def test_any_json_body_gets_a_json_4xx_or_success(
    api: Any, path: str, body: Any
) -> None:
    """No JSON body, however odd, produces a 5xx."""
    r = api.post(
        path, data=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, r.text
    assert isinstance(r.json(), (dict, list))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_any_bytes_get_a_json_answer(api: Any, raw: bytes) -> None:
    """Raw bytes as a body are a 4xx with a JSON body, never a 5xx."""
    r = api.post("/jobs", data=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert "message" in r.json()
