"""
Tests for the HTTP transport over real sockets, against the scripted fault server.
"""

from __future__ import annotations

import logging
import socket

import pytest
import requests
import urllib3

from kelpie_sdk import _transport
from kelpie_sdk._transport import Transport, classify, normalize_timeout
from kelpie_sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseValidationError,
    ServerError,
)
from tests.fault_server import (  # noqa: F401 (fixtures)
    FaultServer,
    Reply,
    closed_port_url_fixture,
    fault_server_fixture,
)


class Sleeps(list[float]):
    """Records the delays the transport asked for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make(url: str, sleeps: Sleeps | None = None, **kwargs: object) -> Transport:
    """A transport with a fake sleep and a short timeout."""
    options: dict[str, object] = {"timeout": (1.0, 2.0), "max_retries": 2}
    options.update(kwargs)
    return Transport(
        url,
        {"X-Kelpie-Key": "secret-key"},
        sleep=sleeps if sleeps is not None else Sleeps(),
        **options,  # type: ignore[arg-type]
    )


def test_returns_decoded_json(fault_server: FaultServer) -> None:
    """A 2xx JSON answer is decoded and the credentials header is sent."""
    fault_server.play(Reply(body={"ok": True}))
    assert {"ok": True} == make(fault_server.url).request("GET", "/x")
    assert "secret-key" == fault_server.requests[0].headers["x-kelpie-key"]


def test_empty_body_is_none(fault_server: FaultServer) -> None:
    """A 204 without a body gives None."""
    fault_server.play(Reply(status=204))
    assert make(fault_server.url).request("DELETE", "/x") is None


def test_sends_json_body_and_query(fault_server: FaultServer) -> None:
    """The JSON body and query parameters arrive as given."""
    fault_server.play(Reply(status=202, body={}))
    make(fault_server.url).request(
        "POST", "/jobs", params={"a": 1}, json_body={"command": "x"}
    )
    seen = fault_server.requests[0]
    assert ({"command": "x"}, {"a": ["1"]}) == (seen.json(), seen.query)
    assert "application/json" == seen.headers["content-type"]


def test_per_call_headers_win_over_the_defaults(fault_server: FaultServer) -> None:
    """A call's own headers replace the JSON content type and add to the rest."""
    fault_server.play(Reply(body={}))
    make(fault_server.url).request(
        "PATCH",
        "/x",
        json_body={"replicas": 2},
        headers={"Content-Type": "application/merge-patch+json", "Accept": "*/*"},
    )
    sent = fault_server.requests[0].headers
    assert "application/merge-patch+json" == sent["content-type"]
    assert "*/*" == sent["accept"]
    assert "secret-key" == sent["x-kelpie-key"]


def test_retries_503_honouring_retry_after(fault_server: FaultServer) -> None:
    """A GET answered 503 with Retry-After waits that long and tries again."""
    sleeps = Sleeps()
    fault_server.play(
        Reply(status=503, body={"error": "busy"}, headers={"Retry-After": "3"}),
        Reply(body=[1]),
    )
    assert [1] == make(fault_server.url, sleeps).request("GET", "/x")
    assert [3.0] == sleeps
    assert 2 == len(fault_server.requests)


def test_backoff_without_retry_after(fault_server: FaultServer) -> None:
    """Without Retry-After the waits grow exponentially, with jitter."""
    sleeps = Sleeps()
    fault_server.play(Reply(status=500), Reply(status=502), Reply(body={}))
    make(fault_server.url, sleeps).request("GET", "/x")
    assert 2 == len(sleeps)
    assert 0.375 <= sleeps[0] <= 0.5
    assert 0.75 <= sleeps[1] <= 1.0


def test_gives_up_after_max_retries(fault_server: FaultServer) -> None:
    """After max_retries retries the last error is raised."""
    sleeps = Sleeps()
    fault_server.play(*[Reply(status=503, body={"message": "down"})] * 3)
    with pytest.raises(ServerError, match="503 GET /x: down"):
        make(fault_server.url, sleeps).request("GET", "/x")
    assert (3, 2) == (len(fault_server.requests), len(sleeps))


def test_per_call_max_retries_override(fault_server: FaultServer) -> None:
    """max_retries=0 for one call means a single attempt."""
    fault_server.play(Reply(status=503), Reply(body={}))
    with pytest.raises(ServerError):
        make(fault_server.url).request("GET", "/x", max_retries=0)
    assert 1 == len(fault_server.requests)


def test_post_is_not_retried_on_5xx(fault_server: FaultServer) -> None:
    """A POST answered 503 may have acted, so it is not repeated."""
    fault_server.play(Reply(status=503), Reply(status=202, body={}))
    with pytest.raises(ServerError):
        make(fault_server.url).request("POST", "/jobs", json_body={})
    assert 1 == len(fault_server.requests)


def test_post_is_retried_on_429(fault_server: FaultServer) -> None:
    """A POST answered 429 was not acted on, so it is repeated after Retry-After."""
    sleeps = Sleeps()
    fault_server.play(
        Reply(status=429, headers={"Retry-After": "1"}), Reply(status=202, body={})
    )
    assert {} == make(fault_server.url, sleeps).request("POST", "/jobs", json_body={})
    assert [1.0] == sleeps


def test_idempotent_post_is_retried_on_5xx(fault_server: FaultServer) -> None:
    """A POST marked idempotent (the heartbeat) is retried like a GET."""
    fault_server.play(Reply(status=502), Reply(body={"status": "running"}))
    result = make(fault_server.url).request(
        "POST", "/jobs/1/heartbeat", json_body={}, idempotent=True
    )
    assert {"status": "running"} == result


def test_dropped_connection_retried_for_get(fault_server: FaultServer) -> None:
    """A GET whose connection is dropped is tried again."""
    fault_server.play(Reply(drop=True), Reply(body={"ok": 1}))
    assert {"ok": 1} == make(fault_server.url).request("GET", "/x")


def test_dropped_connection_not_retried_for_post(fault_server: FaultServer) -> None:
    """A POST whose connection drops may have acted: APIConnectionError, no retry."""
    fault_server.play(Reply(drop=True), Reply(status=202, body={}))
    with pytest.raises(APIConnectionError) as info:
        make(fault_server.url).request("POST", "/jobs", json_body={})
    assert not isinstance(info.value, APITimeoutError)
    assert info.value.__cause__ is not None
    assert type(info.value.__cause__).__module__.startswith("requests")
    assert 1 == len(fault_server.requests)


def test_connection_refused_is_retried_even_for_post(closed_port_url: str) -> None:
    """Nothing was sent when the connection is refused, so even a POST is retried."""
    sleeps = Sleeps()
    with pytest.raises(APIConnectionError, match="cannot reach") as info:
        make(closed_port_url, sleeps).request("POST", "/jobs", json_body={})
    assert 2 == len(sleeps)
    assert info.value.__cause__ is not None


def test_connection_refused_says_so_in_one_short_line(closed_port_url: str) -> None:
    """The text names the server and the likely fix, not urllib3's internals."""
    with pytest.raises(APIConnectionError) as info:
        make(closed_port_url, max_retries=0).request("GET", "/jobs")
    assert (
        f"cannot reach {closed_port_url} (connection refused): is the server "
        "running? (`kelpie up` starts one)"
    ) == str(info.value)


def _connection_error(reason: BaseException) -> requests.exceptions.RequestException:
    """What requests raises for a failed connect, built as it builds it."""
    pool_error = urllib3.exceptions.MaxRetryError(
        None,  # type: ignore[arg-type]
        "/jobs",
        reason,  # type: ignore[arg-type]
    )
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
        reason, urllib3.exceptions.NewConnectionError
    ):
        return requests.exceptions.ConnectTimeout(pool_error)
    return requests.exceptions.ConnectionError(pool_error)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (
            urllib3.exceptions.NameResolutionError(
                "kelpie.invalid",
                urllib3.connection.HTTPConnection("kelpie.invalid", 8787),
                socket.gaierror(-2, "Name or service not known"),
            ),
            "host name not found",
        ),
        (
            urllib3.exceptions.ConnectTimeoutError(
                None, "Connection to kelpie.invalid timed out. (connect timeout=1.0)"
            ),
            "no answer within 1 s",
        ),
        (
            urllib3.exceptions.NewConnectionError(
                urllib3.connection.HTTPConnection("kelpie.invalid", 8787),
                "Failed to establish a new connection: [Errno 101] Network is "
                "unreachable",
            ),
            "network is unreachable",
        ),
    ],
    ids=["dns", "connect-timeout", "unreachable"],
)
def test_connect_failures_have_short_reasons(
    reason: BaseException, expected: str
) -> None:
    """DNS failures, connect timeouts and other connect errors read plainly."""
    exc = _connection_error(reason)
    assert _transport.Failure.CONNECT == classify(exc)
    text = _transport.connect_failure_text("http://kelpie.invalid:8787", exc, 1.0)
    assert (
        f"cannot reach http://kelpie.invalid:8787 ({expected}): is the server "
        "running? (`kelpie up` starts one)"
    ) == text


def test_dropped_connection_text_has_no_internals(fault_server: FaultServer) -> None:
    """A connection lost before the answer is described without urllib3 reprs."""
    fault_server.play(Reply(drop=True))
    with pytest.raises(APIConnectionError) as info:
        make(fault_server.url).request("POST", "/jobs", json_body={})
    assert (
        f"POST /jobs: the connection to {fault_server.url} was lost before an "
        "answer came (remote end closed connection without response)"
    ) == str(info.value)


def test_slow_body_is_a_timeout(fault_server: FaultServer) -> None:
    """A body that arrives after the read timeout raises APITimeoutError."""
    fault_server.play(Reply(body={"late": 1}, body_delay=0.6))
    with pytest.raises(APITimeoutError) as info:
        make(fault_server.url, timeout=(1.0, 0.2), max_retries=0).request("GET", "/x")
    assert isinstance(info.value, TimeoutError)
    assert info.value.__cause__ is not None


def test_slow_answer_is_a_timeout_retried_for_get(fault_server: FaultServer) -> None:
    """A GET whose answer is late is retried and succeeds the second time."""
    fault_server.play(Reply(body={}, delay=0.6), Reply(body={"ok": 1}))
    transport = make(fault_server.url, timeout=0.2, max_retries=1)
    assert {"ok": 1} == transport.request("GET", "/x")


def test_slow_answer_not_retried_for_post(fault_server: FaultServer) -> None:
    """A POST whose answer is late is not repeated."""
    fault_server.play(Reply(status=202, body={}, delay=0.6), Reply(body={}))
    with pytest.raises(APITimeoutError, match="timed out"):
        make(fault_server.url, timeout=0.2).request("POST", "/jobs", json_body={})
    assert 1 == len(fault_server.requests)


def test_per_call_timeout_override(fault_server: FaultServer) -> None:
    """A per-call timeout replaces the default for that call."""
    fault_server.play(Reply(body={}, delay=0.25))
    transport = make(fault_server.url, timeout=0.1, max_retries=0)
    assert {} == transport.request("GET", "/x", timeout=(1.0, 3.0))


def test_non_json_success_is_a_validation_error(fault_server: FaultServer) -> None:
    """A 2xx answer that is not JSON raises ResponseValidationError."""
    fault_server.play(Reply(body="<html>hello</html>"))
    with pytest.raises(ResponseValidationError, match="not JSON"):
        make(fault_server.url).request("GET", "/jobs/1")


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, BadRequestError),
        (429, RateLimitError),
        (500, ServerError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_error_class(
    fault_server: FaultServer, status: int, cls: type[APIStatusError]
) -> None:
    """Each error status raises its class, carrying status, body and request id."""
    body = {"error": "Oops", "message": "it broke"}
    fault_server.play(Reply(status=status, body=body, headers={"x-request-id": "r1"}))
    with pytest.raises(cls) as info:
        make(fault_server.url, max_retries=0).request("GET", "/jobs/abc")
    error = info.value
    assert type(error) is cls
    assert f"{status} GET /jobs/abc: it broke (request_id=r1)" == str(error)
    assert (status, body, "r1") == (error.status_code, error.body, error.request_id)


def test_error_falls_back_to_error_field(fault_server: FaultServer) -> None:
    """Without `message`, the `error` field is the text, and no request id is shown."""
    fault_server.play(Reply(status=409, body={"error": "Job already completed"}))
    with pytest.raises(ConflictError) as info:
        make(fault_server.url).request("GET", "/nope")
    assert "409 GET /nope: Job already completed" == str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        {"error": "Route Not Found", "message": "/api/jobs"},
        "<html><body>404 Not Found</body></html>",
        {"detail": "Not Found"},
        None,
    ],
    ids=["unknown-route", "html", "foreign-json", "empty"],
)
def test_404_that_is_not_ours_suspects_the_base_url(
    fault_server: FaultServer, body: object
) -> None:
    """An unknown route, or a 404 that is not a Kelpie error, hints at the URL."""
    fault_server.play(Reply(status=404, body=body))
    with pytest.raises(NotFoundError) as info:
        make(fault_server.url).request("GET", "/jobs")
    assert (
        f"404 GET /jobs: {fault_server.url} answered 404 for /jobs: is "
        "KELPIE_API_URL the server's base URL?"
    ) == str(info.value)


def test_404_of_a_missing_job_keeps_the_server_message(
    fault_server: FaultServer,
) -> None:
    """A Kelpie 404 (an unknown job) is not blamed on the URL."""
    fault_server.play(
        Reply(status=404, body={"error": "Not Found", "message": "Job not found"})
    )
    with pytest.raises(NotFoundError) as info:
        make(fault_server.url).request("GET", "/jobs/x")
    assert "404 GET /jobs/x: Job not found" == str(info.value)


def test_error_with_text_body(fault_server: FaultServer) -> None:
    """A non-JSON error body is kept as text and shown."""
    fault_server.play(Reply(status=400, body="bad things"))
    with pytest.raises(BadRequestError) as info:
        make(fault_server.url).request("GET", "/x")
    assert ("400 GET /x: bad things", "bad things") == (
        str(info.value),
        info.value.body,
    )


def test_error_lists_validation_details(fault_server: FaultServer) -> None:
    """Validation `errors` are appended to the message."""
    body = {
        "error": "Bad Request",
        "message": "Validation failed",
        "errors": [
            {"message": "must be >= 1", "key": "max_failures"},
            "x is required",
            {"message": "Validation failed"},
        ],
    }
    fault_server.play(Reply(status=400, body=body))
    with pytest.raises(BadRequestError) as info:
        make(fault_server.url).request("POST", "/jobs", json_body={})
    expected = (
        "400 POST /jobs: Validation failed: max_failures: must be >= 1; x is required"
    )
    assert expected == str(info.value)


def test_error_names_the_batch_index(fault_server: FaultServer) -> None:
    """An `index` in the error body is kept on the error and named in its text."""
    body = {"error": "Bad Request", "message": "invalid job: no command", "index": 7}
    fault_server.play(Reply(status=400, body=body))
    with pytest.raises(BadRequestError) as info:
        make(fault_server.url).request("POST", "/jobs/batch", json_body=[])
    assert 7 == info.value.index
    assert "400 POST /jobs/batch: job at index 7: invalid job: no command" == str(
        info.value
    )


def test_error_without_index_has_none(fault_server: FaultServer) -> None:
    """Errors that name no item have `index` None (and a bool is no index)."""
    fault_server.play(Reply(status=400, body={"message": "bad", "index": True}))
    with pytest.raises(BadRequestError) as info:
        make(fault_server.url).request("POST", "/jobs", json_body={})
    assert info.value.index is None
    assert "400 POST /jobs: bad" == str(info.value)


def test_error_without_any_body_uses_reason(fault_server: FaultServer) -> None:
    """An empty error body falls back to the HTTP reason phrase."""
    fault_server.play(Reply(status=409))
    with pytest.raises(ConflictError, match="409 DELETE /x: Conflict"):
        make(fault_server.url).request("DELETE", "/x")


def test_rate_limit_error_keeps_retry_after(fault_server: FaultServer) -> None:
    """A 429 that is not retried keeps the server's Retry-After on the error."""
    fault_server.play(Reply(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimitError) as info:
        make(fault_server.url, max_retries=0).request("GET", "/x")
    assert 7.0 == info.value.retry_after


def test_logs_retries_and_masks_credentials(
    fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests are logged at DEBUG without secrets; retries at INFO."""
    caplog.set_level(logging.DEBUG, logger="kelpie_sdk._transport")
    fault_server.play(Reply(status=503), Reply(body={}))
    make(fault_server.url).request("GET", "/x")
    text = caplog.text
    assert "secret-key" not in text
    assert "'X-Kelpie-Key': '***'" in text
    retries = [r for r in caplog.records if r.levelno == logging.INFO]
    assert 1 == len(retries)
    assert "retrying GET /x after status 503" in retries[0].getMessage()


def test_with_options_shares_the_session(fault_server: FaultServer) -> None:
    """with_options copies the defaults it is given and keeps the session."""
    base = make(fault_server.url)
    other = base.with_options(timeout=9.0, max_retries=0)
    assert other.session is base.session
    assert ((9.0, 9.0), 0) == (other.timeout, other.max_retries)
    assert ((1.0, 2.0), 2) == (base.timeout, base.max_retries)
    same = base.with_options()
    assert (base.timeout, base.max_retries) == (same.timeout, same.max_retries)


def test_dynamic_headers_are_asked_for_each_attempt(
    fault_server: FaultServer,
) -> None:
    """A short-lived token is fetched again for every attempt, and copies made
    with with_options keep the source."""
    tokens = iter(["t1", "t2", "t3"])
    fault_server.play(Reply(status=503), Reply(body={}), Reply(body={}))
    base = make(
        fault_server.url,
        dynamic_headers=lambda: {"Authorization": f"Bearer {next(tokens)}"},
    )
    base.request("GET", "/x")
    base.with_options(max_retries=0).request("GET", "/y")
    assert ["Bearer t1", "Bearer t2", "Bearer t3"] == [
        r.headers["authorization"] for r in fault_server.requests
    ]


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(3, (3.0, 3.0)), (2.5, (2.5, 2.5)), ((1, 4.5), (1.0, 4.5))],
)
def test_normalize_timeout(timeout: object, expected: tuple[float, float]) -> None:
    """A number or a (connect, read) pair becomes a pair of floats."""
    assert expected == normalize_timeout(timeout)


@pytest.mark.parametrize(
    "timeout",
    [None, 0, -1, float("inf"), float("nan"), True, "5", (1.0,), (1.0, None), (0, 1)],
    ids=repr,
)
def test_invalid_timeouts_are_rejected(timeout: object) -> None:
    """None, non-positive, non-numeric and badly shaped timeouts are ConfigErrors."""
    with pytest.raises(ConfigError, match="timeout"):
        normalize_timeout(timeout)


@pytest.mark.parametrize("retries", [-1, True, 1.5, None])
def test_invalid_max_retries_are_rejected(retries: object) -> None:
    """max_retries must be a non-negative int."""
    with pytest.raises(ConfigError, match="max_retries"):
        Transport("http://127.0.0.1:1", {}, max_retries=retries)  # type: ignore[arg-type]


def test_classify_plain_oserror_as_connection() -> None:
    """An unknown transport error counts as 'may have been sent'."""
    assert _transport.Failure.CONNECTION == classify(OSError("boom"))
