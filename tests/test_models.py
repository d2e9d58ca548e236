"""
The wire models: exact JSON round-trips and tolerant, strict parsing.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given

from kelpie_sdk.errors import ResponseValidationError
from kelpie_sdk.models import (
    Job,
    JobStatus,
    JobSubmission,
    SyncSpec,
    User,
    WorkerReport,
    format_timestamp,
    parse_timestamp,
)

from . import strategies

# A job as the original API returns it, shortened ids.
ORIGINAL_JOB = {
    "id": "1a5fac9a",
    "user_id": "5b0f6331",
    "status": "completed",
    "created": "2025-08-11T21:49:44.000Z",
    "started": "2025-08-11T21:49:54.000Z",
    "completed": "2025-08-11T21:50:57.000Z",
    "heartbeat": "2025-08-11T21:50:57.000Z",
    "num_failures": 0,
    "machine_id": "74c5f980",
    "command": "python",
    "arguments": ["/app/main.py"],
    "environment": {"BUCKET": "transcripts"},
    "max_failures": 3,
    "heartbeat_interval": 30,
    "container_group_id": "ca437282",
    "webhook": None,
    "compression": False,
    "num_heartbeats": 2,
    "sync": {},
}


@given(strategies.jobs())
def test_job_round_trips_exactly(job: Job) -> None:
    """Job -> JSON text -> Job is the identity, and so is JSON -> Job -> JSON."""
    wire = json.loads(json.dumps(job.to_json()))
    assert job == Job.from_json(wire)
    assert wire == Job.from_json(wire).to_json()


@given(strategies.submissions)
def test_submission_round_trips(sub: JobSubmission) -> None:
    """A submission survives a trip through JSON text."""
    assert sub == JobSubmission.from_json(json.loads(json.dumps(sub.to_json())))


@given(strategies.reports)
def test_worker_report_round_trips(report: WorkerReport) -> None:
    """A worker report survives a trip through JSON text."""
    assert report == WorkerReport.from_json(json.loads(json.dumps(report.to_json())))


def test_original_api_job_round_trips_key_for_key() -> None:
    """A job captured from the hosted API parses and re-serialises unchanged."""
    job = Job.from_json(ORIGINAL_JOB)
    assert job.status is JobStatus.COMPLETED
    assert SyncSpec() == job.sync
    assert job.attempt is None
    assert list(ORIGINAL_JOB.items()) == list(job.to_json().items())


def test_unknown_keys_are_ignored() -> None:
    """Fields a newer server adds do not break parsing."""
    assert Job.from_json({**ORIGINAL_JOB, "shiny_new_field": 1}).id == "1a5fac9a"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("status", "exploded"),
        ("num_failures", "0"),
        ("num_failures", True),
        ("created", "yesterday"),
        ("arguments", "a b"),
        ("environment", {"A": 1}),
        ("command", None),
    ],
    ids=lambda v: repr(v),
)
def test_mistyped_fields_are_rejected(key: str, value: object) -> None:
    """A wrong type raises ResponseValidationError naming the field."""
    with pytest.raises(ResponseValidationError, match=key):
        Job.from_json({**ORIGINAL_JOB, key: value})


def test_non_object_is_rejected() -> None:
    """A list where a job should be is an error, not an AttributeError."""
    with pytest.raises(ResponseValidationError, match="JSON object"):
        Job.from_json([])


def test_submission_limits_are_validated() -> None:
    """max_failures and heartbeat_interval must be at least 1."""
    with pytest.raises(ValueError, match="max_failures must be between 1 and"):
        JobSubmission(command="x", container_group_id="g", max_failures=0)
    with pytest.raises(ResponseValidationError, match="heartbeat_interval"):
        JobSubmission.from_json(
            {"command": "x", "container_group_id": "g", "heartbeat_interval": 0}
        )


def test_timestamps_format_like_the_api() -> None:
    """Timestamps are ISO 8601 UTC with milliseconds and Z; SQLite style parses."""
    t = dt.datetime(2025, 8, 11, 21, 49, 44, 123456, tzinfo=dt.UTC)
    assert "2025-08-11T21:49:44.123Z" == format_timestamp(t)
    assert t.replace(microsecond=123000) == parse_timestamp("2025-08-11T21:49:44.123Z")
    assert dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC) == parse_timestamp(
        "2025-01-02 03:04:05"
    )


def test_user_round_trips() -> None:
    """A user parses from the wire and back."""
    wire = {"id": "u1", "username": "alice", "created": "2025-01-02T03:04:05.000Z"}
    assert wire == User.from_json(wire).to_json()
