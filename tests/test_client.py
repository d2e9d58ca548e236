"""
Tests for Client behaviour that needs no real server: configuration, headers,
waiting, long-poll timeouts and response validation (against the fault server).
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import pytest

from kelpie_sdk import Client, JobStatus, SyncSpec
from kelpie_sdk.errors import (
    BadRequestError,
    ConfigError,
    InvalidIdError,
    ResponseValidationError,
    ServerError,
    WaitTimeoutError,
)
from kelpie_sdk.models import Job, WorkerReport, format_timestamp
from tests.fault_server import (  # noqa: F401 (fixtures)
    FaultServer,
    Reply,
    fault_server_fixture,
)

CG = "11111111-2222-3333-4444-555555555555"


class Sleeps(list[float]):
    """Records requested sleeps instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def job_json(job_id: str = "j1", status: str = "pending", **extra: Any) -> Any:
    """A job as the server sends it."""
    data = {
        "id": job_id,
        "user_id": "u1",
        "status": status,
        "created": "2026-01-01T00:00:00.000Z",
        "num_failures": 0,
        "machine_id": None,
        "command": "python",
        "arguments": [],
        "environment": {},
        "max_failures": 3,
        "heartbeat_interval": 30,
        "container_group_id": CG,
        "webhook": None,
        "compression": False,
        "num_heartbeats": 0,
        "sync": {},
    }
    data.update(extra)
    return data


def make(server: FaultServer, sleeps: Sleeps | None = None, **kwargs: Any) -> Client:
    """A client for the fault server with a fake sleep."""
    return Client(
        server.url,
        "key-1",
        environ={},
        sleep=sleeps if sleeps is not None else Sleeps(),
        **kwargs,
    )


def test_env_fallbacks() -> None:
    """URL and key come from KELPIE_API_URL / KELPIE_API_KEY, trailing / stripped."""
    client = Client(
        environ={"KELPIE_API_URL": "http://127.0.0.1:9/", "KELPIE_API_KEY": "k"}
    )
    assert "http://127.0.0.1:9" == client.base_url
    assert "k" == client.settings.api_key


def test_reads_os_environ_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `environ`, the process environment is read in the constructor."""
    monkeypatch.setenv("KELPIE_API_KEY", "env-key")
    assert "env-key" == Client().settings.api_key


def test_default_url() -> None:
    """Without a URL anywhere, the local default is used."""
    assert "http://127.0.0.1:8787" == Client(api_key="k", environ={}).base_url


def test_arguments_beat_environment() -> None:
    """Explicit arguments win over the environment."""
    client = Client(
        "http://127.0.0.1:1",
        "arg-key",
        environ={"KELPIE_API_URL": "http://127.0.0.1:2", "KELPIE_API_KEY": "env"},
    )
    assert ("http://127.0.0.1:1", "arg-key") == (
        client.base_url,
        client.settings.api_key,
    )


@pytest.mark.parametrize("url", ["127.0.0.1:8787", "ftp://127.0.0.1", ""])
def test_url_must_be_http(url: str) -> None:
    """A base URL without http:// or https:// is a ConfigError, not a retried failure."""
    with pytest.raises(ConfigError, match="http:// or https://"):
        Client(url, "k", environ={})


def test_no_credentials_is_a_config_error() -> None:
    """A client without any credentials cannot be made."""
    with pytest.raises(ConfigError, match="KELPIE_API_KEY"):
        Client(environ={})


def test_timeout_none_is_rejected() -> None:
    """timeout=None is refused: every call must have a timeout."""
    with pytest.raises(ConfigError, match="timeout"):
        Client(api_key="k", environ={}, timeout=None)  # type: ignore[arg-type]


def test_defaults() -> None:
    """The default timeout is (5, 30) and two retries."""
    client = Client(api_key="k", environ={})
    assert ((5.0, 30.0), 2) == (client.timeout, client.max_retries)
    assert "<Client http://127.0.0.1:8787>" == repr(client)


def test_salad_headers_are_sent(fault_server: FaultServer) -> None:
    """Salad credentials are sent as the three Salad headers."""
    fault_server.play(Reply(body=job_json()))
    client = Client(
        fault_server.url,
        environ={
            "SALAD_API_KEY": "sk",
            "SALAD_ORGANIZATION_NAME": "org",
            "SALAD_PROJECT": "proj",
        },
    )
    client.get_job("j1")
    headers = fault_server.requests[0].headers
    assert ("sk", "org", "proj") == (
        headers["salad-api-key"],
        headers["salad-organization"],
        headers["salad-project"],
    )
    assert "x-kelpie-key" not in headers


def test_context_manager_closes(fault_server: FaultServer) -> None:
    """The client works as a context manager."""
    fault_server.play(Reply(body=job_json()))
    with make(fault_server) as client:
        assert "j1" == client.get_job("j1").id


def test_with_options_overrides_and_shares(fault_server: FaultServer) -> None:
    """with_options changes only the given defaults and keeps the connections."""
    client = make(fault_server, timeout=3.0)
    other = client.with_options(max_retries=0)
    assert ((3.0, 3.0), 0) == (other.timeout, other.max_retries)
    assert other._transport.session is client._transport.session
    fault_server.play(Reply(status=503), Reply(body=job_json()))
    with pytest.raises(ServerError):
        other.get_job("j1")


def test_job_ids_are_quoted(fault_server: FaultServer) -> None:
    """A job id is one path segment: characters that need it are quoted."""
    fault_server.play(Reply(body=job_json()))
    make(fault_server).get_job("a b?c#d%")
    assert "/jobs/a%20b%3Fc%23d%25" == fault_server.requests[0].path


_REPORT = WorkerReport(machine_id="m", container_group_id=CG)
#: Every Client method that puts an id in the path, called with ``bad``.
_ID_CALLS: dict[str, Any] = {
    "get_job": lambda c, bad: c.get_job(bad),
    "events": lambda c, bad: c.events(bad),
    "cancel": lambda c, bad: c.cancel(bad),
    "logs": lambda c, bad: c.logs(bad),
    "purge_container_group": lambda c, bad: c.purge_container_group(bad),
    "get_scaling_rule": lambda c, bad: c.get_scaling_rule(bad),
    "update_scaling_rule": lambda c, bad: c.update_scaling_rule(bad, min_replicas=1),
    "delete_scaling_rule": lambda c, bad: c.delete_scaling_rule(bad),
    "create_token": lambda c, bad: c.create_token(bad),
    "heartbeat": lambda c, bad: c.heartbeat(bad, _REPORT),
    "report_completed": lambda c, bad: c.report_completed(bad, _REPORT),
    "report_failed": lambda c, bad: c.report_failed(bad, _REPORT),
    "release": lambda c, bad: c.release(bad, _REPORT),
    "report_progress": lambda c, bad: c.report_progress(
        bad, attrs.evolve(_REPORT, progress={"step": 1})
    ),
    "holder_status": lambda c, bad: c.holder_status(bad, machine_id="m"),
    "ship_logs": lambda c, bad: c.ship_logs(
        bad, machine_id="m", attempt=1, offset=0, lines=[]
    ),
}


@pytest.mark.parametrize("bad", ["", " ", "/", "a/b", "..", "a\\b", "a\nb", "x" * 257])
@pytest.mark.parametrize("call", sorted(_ID_CALLS))
def test_a_malformed_id_is_refused_before_sending(
    fault_server: FaultServer, call: str, bad: str
) -> None:
    """An empty or malformed id raises InvalidIdError and sends nothing."""
    with pytest.raises(InvalidIdError) as info:
        _ID_CALLS[call](make(fault_server), bad)
    assert isinstance(info.value, ValueError)
    assert [] == fault_server.requests


def test_submit_job_wire_body(fault_server: FaultServer) -> None:
    """submit_job sends the wire shape, with a mapping `sync` passed through."""
    fault_server.play(Reply(status=202, body=job_json()))
    job = make(fault_server).submit_job(
        command="python",
        arguments=["train.py"],
        environment={"A": "1"},
        container_group_id=CG,
        max_failures=5,
        sync={"before": []},
    )
    assert "j1" == job.id
    expected = {
        "command": "python",
        "arguments": ["train.py"],
        "environment": {"A": "1"},
        "max_failures": 5,
        "heartbeat_interval": 30,
        "container_group_id": CG,
        "compression": False,
        "sync": {"before": []},
    }
    assert expected == fault_server.requests[0].json()


def test_submit_job_with_sync_spec(fault_server: FaultServer) -> None:
    """A SyncSpec is serialised by the model."""
    fault_server.play(Reply(status=202, body=job_json()))
    make(fault_server).submit_job(command="x", container_group_id=CG, sync=SyncSpec())
    assert {} == fault_server.requests[0].json()["sync"]


def test_submit_job_validates_locally() -> None:
    """max_failures below 1 is refused before any request."""
    client = Client("http://127.0.0.1:1", "k", environ={})
    with pytest.raises(ValueError, match="max_failures"):
        client.submit_job(command="x", container_group_id=CG, max_failures=0)


def test_submit_jobs_rejects_non_jobs() -> None:
    """Each job must be a JobSubmission or a mapping."""
    client = Client("http://127.0.0.1:1", "k", environ={})
    with pytest.raises(TypeError, match="JobSubmission"):
        client.submit_jobs([42])  # type: ignore[list-item]


def test_submit_jobs_checks_the_answer_length(fault_server: FaultServer) -> None:
    """A batch answer with a different number of jobs is a validation error."""
    fault_server.play(Reply(status=202, body=[job_json()]))
    jobs = [{"command": "x", "container_group_id": CG, "sync": {}}] * 2
    with pytest.raises(ResponseValidationError, match="sent 2 jobs, got 1"):
        make(fault_server).submit_jobs(jobs)


def test_submit_jobs_empty_sends_nothing(fault_server: FaultServer) -> None:
    """No jobs means no request."""
    assert [] == make(fault_server).submit_jobs([])
    assert [] == fault_server.requests


def test_wait_polls_until_finished(fault_server: FaultServer) -> None:
    """wait polls each unfinished job until all are finished, in given order."""
    sleeps = Sleeps()
    fault_server.play(
        Reply(body=job_json("a", "running")),
        Reply(body=job_json("b", "completed")),
        Reply(body=job_json("a", "failed")),
    )
    client = make(fault_server, sleeps)
    a = Job.from_json(job_json("a"))
    jobs = client.wait([a, "b"], poll_interval=0.5)
    assert [("a", JobStatus.FAILED), ("b", JobStatus.COMPLETED)] == [
        (j.id, j.status) for j in jobs
    ]
    assert [0.5] == sleeps
    assert ["/jobs/a", "/jobs/b", "/jobs/a"] == [r.path for r in fault_server.requests]


def test_wait_single_id(fault_server: FaultServer) -> None:
    """A single id is accepted and gives a one-item list."""
    fault_server.play(Reply(body=job_json("a", "canceled")))
    assert ["a"] == [j.id for j in make(fault_server).wait("a")]


def test_wait_deadline_raises(fault_server: FaultServer) -> None:
    """When the deadline passes first, WaitTimeoutError names what is unfinished."""
    fault_server.play(Reply(body=job_json("a", "running")))
    with pytest.raises(WaitTimeoutError, match=r"1 of 1 job.*a") as info:
        make(fault_server).wait("a", timeout=0)
    assert isinstance(info.value, TimeoutError)


def test_wait_sleep_is_cut_to_the_deadline(fault_server: FaultServer) -> None:
    """The last sleep is no longer than the time left."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    fault_server.play(*[Reply(body=job_json("a", "running"))] * 5)
    client = Client(fault_server.url, "k", environ={}, sleep=sleep)
    with pytest.raises(WaitTimeoutError):
        client.wait("a", timeout=0.05, poll_interval=10)
    assert 1 <= len(sleeps)
    assert all(s <= 0.05 for s in sleeps)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"poll_interval": 0}, "poll_interval"), ({"timeout": -1}, "timeout")],
)
def test_wait_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    """A non-positive poll interval or a negative timeout is a ValueError."""
    client = Client("http://127.0.0.1:1", "k", environ={})
    with pytest.raises(ValueError, match=match):
        client.wait("a", **kwargs)


def test_claim_work_long_poll_extends_read_timeout(fault_server: FaultServer) -> None:
    """claim_work(wait=w) sends wait and allows w + 5 s to read the answer."""
    fault_server.play(Reply(body=[job_json("a", "running")], delay=0.3))
    client = make(fault_server, timeout=0.1, max_retries=0)
    job = client.claim_work(machine_id="m", container_group_id=CG, wait=0)
    assert job is not None
    assert "a" == job.id
    query = fault_server.requests[0].query
    assert {"machine_id": ["m"], "container_group_id": [CG], "wait": ["0"]} == query


def test_claim_work_empty_queue(fault_server: FaultServer) -> None:
    """An empty answer means no work."""
    fault_server.play(Reply(body=[]))
    assert make(fault_server).claim_work(machine_id="m", container_group_id=CG) is None
    assert "wait" not in fault_server.requests[0].query


def test_claim_work_is_not_retried_after_sending(fault_server: FaultServer) -> None:
    """A claim answered 503 may have claimed a job, so it is not repeated."""
    fault_server.play(Reply(status=503), Reply(body=[]))
    with pytest.raises(ServerError):
        make(fault_server).claim_work(machine_id="m", container_group_id=CG)
    assert 1 == len(fault_server.requests)


def test_claim_work_rejects_two_jobs(fault_server: FaultServer) -> None:
    """More than one job in a claim answer is a validation error."""
    fault_server.play(Reply(body=[job_json("a"), job_json("b")]))
    with pytest.raises(ResponseValidationError, match="at most one"):
        make(fault_server).claim_work(machine_id="m", container_group_id=CG)


def test_claim_work_rejects_negative_wait() -> None:
    """A negative long-poll wait is a ValueError."""
    client = Client("http://127.0.0.1:1", "k", environ={})
    with pytest.raises(ValueError, match="wait"):
        client.claim_work(machine_id="m", container_group_id=CG, wait=-1)


def test_heartbeat_is_retried_and_parsed(fault_server: FaultServer) -> None:
    """The heartbeat is idempotent: a 503 is retried, and the status parsed."""
    fault_server.play(Reply(status=503), Reply(body={"status": "canceled"}))
    report = WorkerReport(machine_id="m", container_group_id=CG, attempt=2)
    status = make(fault_server).heartbeat("a", report)
    assert JobStatus.CANCELED == status
    assert {"machine_id": "m", "container_group_id": CG, "attempt": 2} == json.loads(
        fault_server.requests[1].body
    )


def test_heartbeat_bad_status_is_a_validation_error(fault_server: FaultServer) -> None:
    """An unknown status in a heartbeat answer is a validation error."""
    fault_server.play(Reply(body={"status": "sleeping"}))
    report = WorkerReport(machine_id="m", container_group_id=CG)
    with pytest.raises(ResponseValidationError, match="sleeping"):
        make(fault_server).heartbeat("a", report)


@pytest.mark.parametrize("outcome", ["completed", "failed", "release"])
def test_outcome_reports_are_not_retried_on_5xx(
    fault_server: FaultServer, outcome: str
) -> None:
    """Completed/failed/release reports are not repeated once they may have acted."""
    fault_server.play(Reply(status=500), Reply(body={}))
    client = make(fault_server)
    method = {
        "completed": client.report_completed,
        "failed": client.report_failed,
        "release": client.release,
    }[outcome]
    with pytest.raises(ServerError):
        method("a", WorkerReport(machine_id="m", container_group_id=CG))
    assert [f"/jobs/a/{outcome}"] == [r.path for r in fault_server.requests]


@pytest.mark.parametrize(
    ("body", "call", "match"),
    [
        ({"count": "3"}, "purge", "count"),
        ([], "purge", "JSON object"),
        ({"token": 5}, "token", "token"),
        ({"rules": {}}, "rules", "rules"),
        ({"x": 1}, "job", "Job"),
    ],
)
def test_malformed_answers_are_validation_errors(
    fault_server: FaultServer, body: Any, call: str, match: str
) -> None:
    """Answers that do not match the protocol raise ResponseValidationError."""
    fault_server.play(Reply(status=200, body=body))
    client = make(fault_server)
    calls = {
        "purge": lambda: client.purge_container_group(CG),
        "token": lambda: client.create_token("u"),
        "rules": client.list_scaling_rules,
        "job": lambda: client.get_job("a"),
    }
    with pytest.raises(ResponseValidationError, match=match):
        calls[call]()


def test_update_scaling_rule_needs_a_change() -> None:
    """An update without any limit is refused before any request."""
    client = Client("http://127.0.0.1:1", "k", environ={})
    with pytest.raises(ValueError, match="at least one"):
        client.update_scaling_rule(CG)


def test_update_scaling_rule_is_retried(fault_server: FaultServer) -> None:
    """PATCH with absolute values is safe to repeat, so a 502 is retried."""
    rule = {
        "container_group_id": CG,
        "org_name": "o",
        "project_name": "p",
        "container_group_name": None,
        "user_id": "u",
        "created": format_timestamp(Job.from_json(job_json()).created),
        "updated": "2026-01-01 00:00:00",
        "min_replicas": 0,
        "max_replicas": 4,
        "idle_threshold_seconds": 60,
    }
    fault_server.play(Reply(status=502), Reply(body=rule))
    updated = make(fault_server).update_scaling_rule(CG, max_replicas=4)
    assert 4 == updated.max_replicas
    assert {"max_replicas": 4} == fault_server.requests[1].json()


def test_submit_jobs_chunks_and_notes_partial_success(
    fault_server: FaultServer,
) -> None:
    """1001 jobs go in batches of 1000 and 1; a failing later batch notes the rest."""
    first = [job_json(f"j{i}") for i in range(1000)]
    fault_server.play(
        Reply(status=202, body=first), Reply(status=400, body={"message": "nope"})
    )
    jobs = [{"command": "x", "container_group_id": CG, "sync": {}}] * 1001
    with pytest.raises(BadRequestError) as info:
        make(fault_server).submit_jobs(jobs)
    assert [1000, 1] == [len(r.json()) for r in fault_server.requests]
    assert ["1000 job(s) of earlier batches were queued: first j0, last j999"] == (
        info.value.__notes__
    )


def test_submit_jobs_names_the_bad_job_across_batches(
    fault_server: FaultServer,
) -> None:
    """The index of a rejected job counts from the first job given, not the batch."""
    first = [job_json(f"j{i}") for i in range(1000)]
    fault_server.play(
        Reply(status=202, body=first),
        Reply(
            status=400,
            body={"error": "Bad Request", "message": "invalid job: x", "index": 2},
        ),
    )
    jobs = [{"command": "x", "container_group_id": CG, "sync": {}}] * 1005
    with pytest.raises(BadRequestError) as info:
        make(fault_server).submit_jobs(jobs)
    assert 1002 == info.value.index
    assert "400 POST /jobs/batch: job at index 1002: invalid job: x" == str(info.value)


def test_list_jobs_id_prefix_filters_what_an_older_server_sends(
    fault_server: FaultServer,
) -> None:
    """A server that ignores id_prefix sends every job; only matches come out."""
    fault_server.play(
        Reply(
            body={
                "_count": 3,
                "jobs": [job_json("ab1"), job_json("cd2"), job_json("ab3")],
            }
        )
    )
    jobs = list(make(fault_server).list_jobs(id_prefix="ab", page_size=5))
    assert ["ab1", "ab3"] == [j.id for j in jobs]
    assert ["ab"] == fault_server.requests[0].query["id_prefix"]
