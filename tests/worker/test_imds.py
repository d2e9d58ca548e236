"""
SaladCloud's instance metadata service: when it is used, the deletion-cost
ladder, reallocation and the workload token, against a loopback fake.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.errors import (
    APIConnectionError,
    BadRequestError,
    ConfigError,
    ResponseValidationError,
)
from kelpie_sdk.worker._agent import EXIT_IDLE, EXIT_MAX_FAILURES, EXIT_OK, Worker
from kelpie_sdk.worker._config import WorkerConfig
from kelpie_sdk.worker._imds import (
    DEFAULT_IMDS_URL,
    DELETION_COST_CLAIMED,
    DELETION_COST_FINAL_UPLOAD,
    DELETION_COST_IDLE,
    REALLOCATE_IDLE,
    REALLOCATE_MAX_FAILURES,
    SALADCLOUD_MARKERS,
    DeletionCost,
    Imds,
    deletion_cost_after_heartbeats,
    imds_enabled,
    jwt_expiry,
)
from tests.fake_imds import Call, FakeImds, closed_port_url, fake_imds

SALAD_ENV = {
    "SALAD_MACHINE_ID": "m-1",
    "SALAD_CONTAINER_GROUP_ID": "g-1",
    "SALAD_ORGANIZATION_NAME": "org",
    "SALAD_PROJECT_NAME": "proj",
}


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    yield from fake_imds()


def _jwt(claims: dict[str, object]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return f"eyJhbGciOiJSUzI1NiJ9.{payload.decode()}.c2ln"


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _no_sleep(seconds: float) -> None:
    pass


# -- when IMDS is used ---------------------------------------------------------------


def test_off_by_default_outside_saladcloud() -> None:
    """A worker configured as in tests and `kelpie up` never talks to IMDS."""
    env = {"SALAD_MACHINE_ID": "m-1", "SALAD_CONTAINER_GROUP_ID": "g-1"}
    config = WorkerConfig.from_env(env)
    assert "auto" == config.imds_mode
    assert DEFAULT_IMDS_URL == config.imds_url
    assert config.imds_enabled is False
    assert Worker(config).imds is None
    assert imds_enabled("auto", {}) is False


@pytest.mark.parametrize("missing", SALADCLOUD_MARKERS)
def test_auto_needs_every_saladcloud_variable(missing: str) -> None:
    """auto is on only where all of SaladCloud's own variables are set."""
    assert imds_enabled("auto", SALAD_ENV) is True
    env = {k: v for k, v in SALAD_ENV.items() if k != missing}
    assert imds_enabled("auto", env) is False


def test_explicit_modes_win() -> None:
    """on and off override the detection; anything else is a clear error."""
    assert imds_enabled("on", {}) is True
    assert imds_enabled("OFF", SALAD_ENV) is False
    off = WorkerConfig.from_env({**SALAD_ENV, "KELPIE_IMDS": "off"})
    assert off.imds_enabled is False
    on = WorkerConfig.from_env(
        {"SALAD_CONTAINER_GROUP_ID": "g", "KELPIE_IMDS": "on"},
        imds_url="http://127.0.0.1:9",
    )
    assert on.imds_enabled is True
    assert "http://127.0.0.1:9" == on.imds_url
    with pytest.raises(ConfigError, match="KELPIE_IMDS must be one of"):
        WorkerConfig.from_env({"SALAD_CONTAINER_GROUP_ID": "g", "KELPIE_IMDS": "yes"})
    with pytest.raises(ConfigError, match="KELPIE_IMDS_URL must start with"):
        WorkerConfig.from_env(
            {"SALAD_CONTAINER_GROUP_ID": "g", "KELPIE_IMDS_URL": "169.254.169.254"}
        )


def test_saladcloud_environment_turns_it_on() -> None:
    """With SaladCloud's variables the worker builds an IMDS client."""
    config = WorkerConfig.from_env(
        {**SALAD_ENV, "KELPIE_IMDS_URL": "http://127.0.0.1:9/"}
    )
    worker = Worker(config)
    assert worker.imds is not None
    assert "http://127.0.0.1:9" == worker.imds.base_url
    worker.imds.close()


# -- the calls ---------------------------------------------------------------------


def test_deletion_cost_is_put_with_the_metadata_header(imds: FakeImds) -> None:
    """PUT /v1/deletion-cost {"deletion_cost": n} with Metadata: true."""
    client = Imds(imds.url)
    assert client.set_deletion_cost(7) is True
    [call] = imds.snapshot()
    assert ("PUT", "/v1/deletion-cost", {"deletion_cost": 7}) == (
        call.method,
        call.path,
        call.body,
    )
    assert "true" == call.headers["Metadata"]


def test_failures_are_reported_not_raised(imds: FakeImds) -> None:
    """A refused connection or an error status gives False, never an exception."""
    absent = Imds(closed_port_url(), sleep=_no_sleep)
    assert absent.set_deletion_cost(1) is False
    assert absent.reallocate("why") is False
    imds.status = 503
    failing = Imds(imds.url, sleep=_no_sleep)
    assert failing.set_deletion_cost(1) is False
    assert failing.reallocate("why") is False
    # A deletion cost is sent once; a reallocation is retried.
    assert [1, 3] == [
        sum(1 for c in imds.snapshot() if c.path == path)
        for path in ("/v1/deletion-cost", "/v1/reallocate")
    ]


def test_reallocate_sends_the_reason(imds: FakeImds) -> None:
    """POST /v1/reallocate carries the reason."""
    assert Imds(imds.url).reallocate(REALLOCATE_MAX_FAILURES) is True
    assert [REALLOCATE_MAX_FAILURES] == imds.reallocations()


def test_token_is_fetched_once_until_near_its_expiry(imds: FakeImds) -> None:
    """Many uses, one fetch; a minute before exp it is fetched again."""
    clock = Clock()
    imds.jwt = _jwt({"exp": clock.now + 600, "salad_organization_name": "org"})
    client = Imds(imds.url, clock=clock)
    first = client.token()
    assert all(first == client.token() for _ in range(20))
    clock.now += 539
    assert first == client.token()
    assert 1 == len(imds.snapshot())
    imds.jwt = _jwt({"exp": clock.now + 600})
    clock.now += 2  # 59 s before exp
    assert imds.jwt == client.token()
    assert 2 == len(imds.snapshot())
    assert all(c.path == "/v1/token" for c in imds.snapshot())


def test_token_without_exp_is_reused_for_five_minutes(imds: FakeImds) -> None:
    """A token whose expiry cannot be read is fetched again after 300 s."""
    clock = Clock()
    client = Imds(imds.url, clock=clock)
    client.token()
    clock.now += 299
    client.token()
    assert 1 == len(imds.snapshot())
    clock.now += 2
    client.token()
    assert 2 == len(imds.snapshot())


def test_token_errors_are_clear(imds: FakeImds) -> None:
    """No IMDS, or an answer without a jwt, raise the SDK's errors."""
    with pytest.raises(APIConnectionError):
        Imds(closed_port_url(), sleep=_no_sleep).token()
    imds.jwt = ""
    with pytest.raises(ResponseValidationError, match="without a 'jwt'"):
        Imds(imds.url).token()


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (_jwt({"exp": 1700000000}), 1700000000.0),
        (_jwt({"exp": 1.5}), 1.5),
        (_jwt({"exp": "soon"}), None),
        (_jwt({"exp": True}), None),
        (_jwt({}), None),
        ("not-a-jwt", None),
        ("a.!!!.c", None),
        ("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c", None),
    ],
)
def test_jwt_expiry(token: str, expected: float | None) -> None:
    """exp is read from the payload without verifying; anything odd is None."""
    assert expected == jwt_expiry(token)


# -- the ladder --------------------------------------------------------------------


def test_ladder_values() -> None:
    """0 idle, 1 claimed, 3, 4, ... per heartbeat, the maximum while uploading."""
    assert (0, 1) == (DELETION_COST_IDLE, DELETION_COST_CLAIMED)
    assert [3, 4, 5] == [deletion_cost_after_heartbeats(n) for n in (1, 2, 3)]
    assert 999_999_999 == DELETION_COST_FINAL_UPLOAD


def test_node_cost_is_the_highest_slot_and_sent_on_change(imds: FakeImds) -> None:
    """Two slots: the node's cost is their maximum, sent only when it changes."""
    cost = DeletionCost(Imds(imds.url), slots=2)
    for slot, value in [
        (0, 0),
        (1, 0),  # unchanged: not sent again
        (0, 1),
        (1, 3),
        (0, DELETION_COST_FINAL_UPLOAD),
        (1, 0),  # the other slot idles while slot 0 uploads: unchanged
        (0, 0),
    ]:
        cost.set(slot, value)
        assert cost.flush(10)
    cost.close()
    assert [0, 1, 3, DELETION_COST_FINAL_UPLOAD, 0] == imds.deletion_costs()


def test_fast_changes_end_at_the_latest_value(imds: FakeImds) -> None:
    """Values set faster than they are sent: the last one is what IMDS has."""
    cost = DeletionCost(Imds(imds.url), slots=1)
    for n in range(50):
        cost.set(0, n + 2)
    cost.set(0, 0)
    cost.close()
    sent = imds.deletion_costs()
    assert 0 == sent[-1]
    assert len(sent) <= 51


def test_a_slow_imds_does_not_block_the_caller() -> None:
    """set() returns at once even when IMDS never answers."""
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections, never answers
        host, port = listener.getsockname()
        cost = DeletionCost(Imds(f"http://{host}:{port}", timeout=(1.0, 3.0)), 1)
        started = time.monotonic()
        cost.set(0, 1)
        cost.set(0, 3)
        assert time.monotonic() - started < 0.5
        cost.close(timeout=10)


def test_a_failed_cost_is_sent_again(imds: FakeImds) -> None:
    """After a failed send the same value goes out again on the next set."""
    cost = DeletionCost(Imds(imds.url), slots=1)
    imds.status = 503
    cost.set(0, 0)
    assert cost.flush(10)
    imds.status = 200
    cost.set(0, 0)
    assert cost.flush(10)
    cost.set(0, 0)
    cost.close()
    assert [0, 0] == imds.deletion_costs()


# -- reallocation ------------------------------------------------------------------


def _worker(tmp_path: Path, imds_url: str | None, **settings: object) -> Worker:
    config = WorkerConfig.from_env(
        {"SALAD_CONTAINER_GROUP_ID": "g", "SALAD_MACHINE_ID": "m"},
        state_file=tmp_path / "state.json",
        **settings,
    )
    return Worker(
        config,
        imds=None if imds_url is None else Imds(imds_url, sleep=_no_sleep),
    )


def test_max_failures_reallocates_and_stops(imds: FakeImds, tmp_path: Path) -> None:
    """At MAX_JOB_FAILURES the node is reallocated and the worker stops, code 0."""
    worker = _worker(tmp_path, imds.url, max_job_failures=2)
    worker.note_failure()
    assert [] == imds.reallocations()
    worker.note_failure()
    assert [REALLOCATE_MAX_FAILURES] == imds.reallocations()
    assert worker.stopping
    assert EXIT_OK == worker._exit_code


@pytest.mark.parametrize("imds_url", [None, "closed"])
def test_max_failures_without_imds_exits_3(
    imds_url: str | None, tmp_path: Path
) -> None:
    """IMDS off, or not answering: the worker stops with exit code 3."""
    url = closed_port_url() if imds_url == "closed" else None
    worker = _worker(tmp_path, url, max_job_failures=1)
    worker.note_failure()
    assert worker.stopping
    assert EXIT_MAX_FAILURES == worker._exit_code


def _idle_slots(worker: Worker, seconds: float) -> None:
    from kelpie_sdk.worker._agent import _Slot

    slot = _Slot(worker, worker.config.slot(0))
    assert slot.idle_since is not None
    slot.idle_since -= seconds
    worker._slots = [slot]


def test_idle_limit_reallocates_with_the_idle_time(
    imds: FakeImds, tmp_path: Path
) -> None:
    """Idle past MAX_TIME_WITH_NO_WORK_S: reallocate, saying for how long (ms)."""
    worker = _worker(tmp_path, imds.url, max_time_with_no_work_s=5.0)
    _idle_slots(worker, 2.0)
    worker.check_idle()
    assert not worker.stopping
    _idle_slots(worker, 7.0)
    worker.check_idle()
    [reason] = imds.reallocations()
    assert reason.startswith(REALLOCATE_IDLE)
    assert 7000 <= int(reason.removeprefix(REALLOCATE_IDLE)) < 60_000
    assert worker.stopping
    assert EXIT_OK == worker._exit_code


@pytest.mark.parametrize("imds_url", [None, "closed"])
def test_idle_limit_without_imds_exits_4(imds_url: str | None, tmp_path: Path) -> None:
    """IMDS off, or not answering: the idle worker stops with exit code 4."""
    url = closed_port_url() if imds_url == "closed" else None
    worker = _worker(tmp_path, url, max_time_with_no_work_s=1.0)
    _idle_slots(worker, 5.0)
    worker.check_idle()
    assert worker.stopping
    assert EXIT_IDLE == worker._exit_code


# -- the workload token as credentials ---------------------------------------------


def _api_calls(imds: FakeImds) -> list[Call]:
    return [c for c in imds.snapshot() if not c.path.startswith("/v1/")]


def test_worker_without_a_key_sends_the_cached_workload_token(
    imds: FakeImds, tmp_path: Path
) -> None:
    """No API key on SaladCloud: each API call carries the IMDS token as a
    bearer token with Salad-Project, and the token is fetched once."""
    imds.jwt = _jwt({"exp": 4_000_000_000})
    config = WorkerConfig.from_env(
        {**SALAD_ENV, "KELPIE_IMDS": "on"},
        api_url=imds.url,  # the fake records the API calls too
        state_file=tmp_path / "state.json",
    )
    worker = Worker(config, imds=Imds(imds.url))
    with worker.make_client() as client:
        for _ in range(3):
            with pytest.raises(BadRequestError):
                client.get_job("job-1")
    calls = _api_calls(imds)
    assert 3 == len(calls)
    for call in calls:
        assert f"Bearer {imds.jwt}" == call.headers["Authorization"]
        assert "proj" == call.headers["Salad-Project"]
        assert "X-Kelpie-Key" not in call.headers
    assert 1 == sum(1 for c in imds.snapshot() if c.path == "/v1/token")


def test_a_key_wins_over_the_workload_token(imds: FakeImds, tmp_path: Path) -> None:
    """With KELPIE_API_KEY the token is never fetched."""
    config = WorkerConfig.from_env(
        {**SALAD_ENV, "KELPIE_API_KEY": "k"},
        api_url=imds.url,
        state_file=tmp_path / "state.json",
    )
    worker = Worker(config, imds=Imds(imds.url))
    with worker.make_client() as client, pytest.raises(BadRequestError):
        client.get_job("job-1")
    [call] = imds.snapshot()
    assert "k" == call.headers["X-Kelpie-Key"]
    assert "Authorization" not in call.headers


def test_workload_token_needs_a_project(imds: FakeImds) -> None:
    """A token without a project is refused up front, with what to set."""
    with pytest.raises(ConfigError, match="SALAD_PROJECT / SALAD_PROJECT_NAME"):
        Client(imds.url, environ={}, workload_token=Imds(imds.url).token)
    assert [] == imds.snapshot()


def test_off_imds_means_no_token_and_a_clear_error(tmp_path: Path) -> None:
    """Outside SaladCloud a worker without a key stops at the configuration."""
    config = WorkerConfig.from_env(
        {"SALAD_CONTAINER_GROUP_ID": "g", "SALAD_PROJECT_NAME": "proj"},
        state_file=tmp_path / "state.json",
    )
    with pytest.raises(ConfigError, match="no API credentials"):
        Worker(config).make_client()
