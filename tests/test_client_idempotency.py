"""
The client's Idempotency-Key: one per submission, the same on each retry.
"""

from __future__ import annotations

import uuid

import pytest

from kelpie_sdk import Client
from kelpie_sdk.errors import APIStatusError
from tests.fault_server import (  # noqa: F401 (fixtures)
    FaultServer,
    Reply,
    fault_server_fixture,
)
from tests.test_client import CG, Sleeps, job_json, make


def _keys(server: FaultServer) -> list[str]:
    return [r.headers.get("idempotency-key", "") for r in server.requests]


def test_submit_job_reuses_one_uuid4_key_across_retries(
    fault_server: FaultServer,
) -> None:
    """A 503 and a lost answer are retried, each attempt with the same UUID4 key."""
    fault_server.play(
        Reply(status=503), Reply(drop=True), Reply(status=202, body=job_json())
    )
    job = make(fault_server).submit_job(command="c", container_group_id=CG, sync={})
    assert "j1" == job.id
    keys = _keys(fault_server)
    assert 3 == len(keys)
    assert 1 == len(set(keys))
    assert 4 == uuid.UUID(keys[0]).version


def test_each_submission_gets_a_new_key(fault_server: FaultServer) -> None:
    """Two calls are two submissions: two keys."""
    fault_server.play(
        Reply(status=202, body=job_json()), Reply(status=202, body=job_json())
    )
    client = make(fault_server)
    for _ in range(2):
        client.submit_job(command="c", container_group_id=CG, sync={})
    assert 2 == len(set(_keys(fault_server)))


def test_the_callers_key_is_sent(fault_server: FaultServer) -> None:
    """idempotency_key= is sent as is."""
    fault_server.play(Reply(status=202, body=job_json()))
    make(fault_server).submit_job(
        command="c", container_group_id=CG, sync={}, idempotency_key="order-42"
    )
    assert ["order-42"] == _keys(fault_server)


def test_submit_jobs_keys_each_batch(fault_server: FaultServer) -> None:
    """Batch n after the first gets "<key>.<n>"; its retry repeats its key."""
    fault_server.play(
        Reply(status=202, body=[job_json(f"a{i}") for i in range(1000)]),
        Reply(status=502),
        Reply(status=202, body=[job_json("b0")]),
    )
    jobs = make(fault_server).submit_jobs(
        [{"command": "c", "container_group_id": CG, "sync": {}}] * 1001,
        idempotency_key="run-7",
    )
    assert 1001 == len(jobs)
    assert ["run-7", "run-7.1", "run-7.1"] == _keys(fault_server)


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "caf\xe9"])
def test_a_bad_key_is_refused_before_sending(
    fault_server: FaultServer, key: str
) -> None:
    """A key the server would refuse is a ValueError, and nothing is sent."""
    with pytest.raises(ValueError, match="1 to 255 printable ASCII"):
        make(fault_server).submit_job(
            command="c", container_group_id=CG, sync={}, idempotency_key=key
        )
    assert [] == fault_server.requests


def test_a_suffixed_batch_key_must_fit(fault_server: FaultServer) -> None:
    """A 255-character key cannot name a second batch."""
    with pytest.raises(ValueError, match="1 to 255"):
        make(fault_server).submit_jobs(
            [{"command": "c", "container_group_id": CG, "sync": {}}] * 1001,
            idempotency_key="k" * 255,
        )
    assert [] == fault_server.requests


def test_with_salad_credentials_a_submission_is_not_repeated(
    fault_server: FaultServer,
) -> None:
    """The hosted API ignores the key, so a 503 after sending is not retried."""
    fault_server.play(Reply(status=503), Reply(status=202, body=job_json()))
    client = Client(
        fault_server.url,
        salad_api_key="s",
        salad_organization="o",
        salad_project="p",
        environ={},
        sleep=Sleeps(),
    )
    with pytest.raises(APIStatusError):
        client.submit_job(command="c", container_group_id=CG, sync={})
    assert 1 == len(_keys(fault_server))
    assert _keys(fault_server)[0]
