"""
The one place that speaks HTTP: a ``requests.Session`` with timeouts, retries
and error mapping.

No ``requests`` or ``urllib3`` exception leaves this module: transport failures
become ``APIConnectionError`` / ``APITimeoutError`` (the original is the
``__cause__``), non-2xx answers the ``APIStatusError`` subclass for the status,
and a 2xx answer that is not JSON a ``ResponseValidationError``.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import requests
import requests.adapters
import urllib3.exceptions

from kelpie_sdk._retry import (
    Failure,
    backoff_delay,
    parse_retry_after,
    should_retry,
)
from kelpie_sdk.config import CREDENTIAL_HEADERS
from kelpie_sdk.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ResponseValidationError,
    status_error_class,
)

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "Timeout",
    "Transport",
    "normalize_timeout",
]

logger = logging.getLogger(__name__)

#: Seconds: a single number for both, or ``(connect, read)``.
Timeout: TypeAlias = float | tuple[float, float]

DEFAULT_TIMEOUT: Timeout = (5.0, 30.0)
DEFAULT_MAX_RETRIES = 2
#: Methods that are safe to repeat unless the caller says otherwise.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

_USER_AGENT = "kelpie-sdk-python"


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number of seconds, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return number


def normalize_timeout(timeout: object) -> tuple[float, float]:
    """
    Check a ``Timeout`` and return it as ``(connect, read)`` seconds.

    Raises:
        ConfigError: ``None``, a non-number, or a value that is not positive.
    """
    if timeout is None:
        raise ConfigError(
            "timeout=None (wait forever) is not allowed; pass seconds or "
            "(connect, read)"
        )
    if isinstance(timeout, tuple):
        if len(timeout) != 2:
            raise ConfigError(f"timeout must be (connect, read), got {timeout!r}")
        return (
            _positive(timeout[0], "connect timeout"),
            _positive(timeout[1], "read timeout"),
        )
    value = _positive(timeout, "timeout")
    return (value, value)


def _check_retries(max_retries: object) -> int:
    if (
        isinstance(max_retries, bool)
        or not isinstance(max_retries, int)
        or max_retries < 0
    ):
        raise ConfigError(
            f"max_retries must be a non-negative integer, got {max_retries!r}"
        )
    return max_retries


def _mask(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        k: ("***" if k.lower() in CREDENTIAL_HEADERS else v) for k, v in headers.items()
    }


def _chain(exc: BaseException) -> list[object]:
    """The exception, its args, and what they wrap (urllib3 nests reasons)."""
    seen: list[object] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 20:
        item = todo.pop()
        if any(item is s for s in seen):
            continue
        seen.append(item)
        if isinstance(item, BaseException):
            todo.extend(item.args)
            for attr in ("reason", "__cause__", "__context__"):
                inner = getattr(item, attr, None)
                if isinstance(inner, BaseException):
                    todo.append(inner)
    return seen


def classify(exc: BaseException) -> Failure:
    """
    Say how a transport exception failed: before sending, by timeout, or after.
    """
    chain = _chain(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(
            e,
            urllib3.exceptions.NewConnectionError
            | urllib3.exceptions.ConnectTimeoutError,
        )
        for e in chain
    ):
        return Failure.CONNECT
    if isinstance(exc, requests.exceptions.Timeout) or any(
        isinstance(e, urllib3.exceptions.ReadTimeoutError | TimeoutError) for e in chain
    ):
        return Failure.READ_TIMEOUT
    return Failure.CONNECTION


def _connect_reason(exc: BaseException, connect_timeout: float) -> str:
    chain = _chain(exc)
    if any(
        isinstance(e, socket.gaierror | urllib3.exceptions.NameResolutionError)
        for e in chain
    ):
        return "host name not found"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or any(
        isinstance(e, str) and "Connection refused" in e for e in chain
    ):
        return "connection refused"
    if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        # NewConnectionError is a ConnectTimeoutError too, for old callers.
        isinstance(e, urllib3.exceptions.ConnectTimeoutError | TimeoutError)
        and not isinstance(e, urllib3.exceptions.NewConnectionError)
        for e in chain
    ):
        return f"no answer within {connect_timeout:g} s"
    return _short_reason(chain)


def _short_reason(chain: list[object]) -> str:
    """The innermost plain words of a transport error, without library reprs."""
    for item in reversed(chain):
        if isinstance(item, OSError) and item.strerror:
            return str(item.strerror).lower()
    texts = [
        str(item) or type(item).__name__
        for item in reversed(chain)
        if isinstance(item, BaseException)
        and not isinstance(
            item, requests.exceptions.RequestException | urllib3.exceptions.HTTPError
        )
    ]
    texts += [item for item in reversed(chain) if isinstance(item, str)]
    for raw in texts:
        text = re.sub(r"^\[Errno -?\d+\] ", "", raw.rsplit(": ", 1)[-1].strip())
        if text and not any(c in text for c in "()'\""):
            return text[0].lower() + text[1:]
    return type(chain[0]).__name__ if chain else "unknown error"


def connect_failure_text(
    base_url: str, exc: BaseException, connect_timeout: float
) -> str:
    """
    One line for a request that could not connect, e.g. ``cannot reach
    http://127.0.0.1:8787 (connection refused): is the server running? ...``.
    """
    reason = _connect_reason(exc, connect_timeout)
    return (
        f"cannot reach {base_url} ({reason}): is the server running? "
        "(`kelpie up` starts one)"
    )


def _error_detail(error: object) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    text = str(error.get("message", error))
    key = error.get("key") or error.get("field")
    return f"{key}: {text}" if key else text


def _is_kelpie_404(body: object) -> bool:
    """A Kelpie "no such job/rule/user" body, not an unknown route or a stranger."""
    return (
        isinstance(body, Mapping)
        and isinstance(body.get("error"), str)
        and body["error"] != "Route Not Found"
    )


class Transport:
    """
    Sends requests to one Kelpie API server, with retries.

    Thread-safe as far as ``requests.Session`` is (fine for concurrent simple
    requests; do not mutate the session while others use it).

    Args:
        base_url: The server, without a trailing slash.
        headers: Sent with every request (credentials included).
        timeout: The default timeout.
        max_retries: The default number of retries.
        sleep: Called with the seconds to wait between attempts.
        session: A session to share; a new one is made when ``None``.
        dynamic_headers: Called before each attempt for headers that change
            over time (a short-lived token); its errors propagate.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
        dynamic_headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.dynamic_headers = dynamic_headers
        self.timeout = normalize_timeout(timeout)
        self.max_retries = _check_retries(max_retries)
        self.sleep = sleep
        self.headers = {
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
            **headers,
        }
        if session is None:
            session = requests.Session()
            # No hidden retries below ours.
            adapter = requests.adapters.HTTPAdapter(max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session

    def close(self) -> None:
        """
        Close the session's pooled connections.
        """
        self.session.close()

    def with_options(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> Transport:
        """
        A copy with other defaults that shares this one's session.
        """
        return Transport(
            self.base_url,
            self.headers,
            timeout=self.timeout if timeout is None else timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            sleep=self.sleep,
            session=self.session,
            dynamic_headers=self.dynamic_headers,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float | list[str]] | None = None,
        json_body: Any = None,
        idempotent: bool | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
        headers: Mapping[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        """
        Send a request, retrying where it is safe, and decode the answer.

        Args:
            method: The HTTP method.
            path: The path below the base URL, starting with ``/``.
            params: Query parameters.
            json_body: A JSON-able body, or ``None`` for none.
            idempotent: Whether repeating is harmless; by default, true for
                GET, HEAD, OPTIONS, PUT and DELETE.
            timeout: Overrides the default timeout for this call.
            max_retries: Overrides the default retries for this call.
            headers: Extra headers for this call; they win over the defaults
                (e.g. a ``Content-Type`` other than JSON).
            response_headers: Filled with the 2xx answer's headers (names in
                lower case).

        Returns:
            The decoded JSON body, or ``None`` for an empty body (e.g. 204).

        Raises:
            APIStatusError: A non-2xx answer (the subclass for its status).
            APIConnectionError: No usable answer (``APITimeoutError`` on timeouts).
            ResponseValidationError: A 2xx answer whose body is not JSON.
        """
        method = method.upper()
        limits = self.timeout if timeout is None else normalize_timeout(timeout)
        retries = (
            self.max_retries if max_retries is None else _check_retries(max_retries)
        )
        safe = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        url = self.base_url + path
        send = dict(self.headers)
        data: bytes | None = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            send["Content-Type"] = "application/json"
        send.update(headers or {})
        attempt = 0
        while True:
            if self.dynamic_headers is not None:
                send.update(self.dynamic_headers())
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "request %s %s params=%s headers=%s",
                    method,
                    url,
                    dict(params or {}),
                    _mask(send),
                )
            started = time.monotonic()
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=send,
                    timeout=limits,
                    allow_redirects=False,
                )
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                http.client.HTTPException,
                OSError,
            ) as exc:
                failure = classify(exc)
                error: APIError
                if failure is Failure.CONNECTION:
                    error = APIConnectionError(
                        f"{method} {path}: the connection to {self.base_url} was "
                        f"lost before an answer came ({_short_reason(_chain(exc))})",
                        method=method,
                        url=url,
                    )
                elif failure is Failure.CONNECT:
                    error_cls: type[APIConnectionError] = (
                        APITimeoutError
                        if isinstance(exc, requests.exceptions.Timeout)
                        else APIConnectionError
                    )
                    error = error_cls(
                        connect_failure_text(self.base_url, exc, limits[0]),
                        method=method,
                        url=url,
                    )
                else:
                    error = APITimeoutError(
                        f"{method} {path}: timed out after {limits[1]:g} s "
                        f"waiting for the server",
                        method=method,
                        url=url,
                    )
                if should_retry(
                    failure, idempotent=safe, attempt=attempt, max_retries=retries
                ):
                    self._pause(attempt, None, f"{failure.value} error", method, path)
                    attempt += 1
                    continue
                raise error from exc
            logger.debug(
                "response %s %s -> %d in %.3f s",
                method,
                url,
                response.status_code,
                time.monotonic() - started,
            )
            if 200 <= response.status_code < 300:
                if response_headers is not None:
                    response_headers.update(
                        (k.lower(), v) for k, v in response.headers.items()
                    )
                return self._decode(response, method, path, url)
            status_error = self._status_error(
                response, method, path, url, self.base_url
            )
            if should_retry(
                Failure.STATUS,
                status=response.status_code,
                idempotent=safe,
                attempt=attempt,
                max_retries=retries,
            ):
                self._pause(
                    attempt,
                    status_error.retry_after,
                    f"status {response.status_code}",
                    method,
                    path,
                )
                attempt += 1
                continue
            raise status_error

    def _pause(
        self,
        attempt: int,
        retry_after: float | None,
        reason: str,
        method: str,
        path: str,
    ) -> None:
        delay = backoff_delay(attempt, retry_after=retry_after)
        logger.info(
            "retrying %s %s after %s (retry %d) in %.2f s",
            method,
            path,
            reason,
            attempt + 1,
            delay,
        )
        self.sleep(delay)

    @staticmethod
    def _decode(response: requests.Response, method: str, path: str, url: str) -> Any:
        if not response.content.strip():
            return None
        try:
            return json.loads(response.content)
        except ValueError as exc:
            snippet = response.text[:200]
            raise ResponseValidationError(
                f"{response.status_code} {method} {path}: the answer is not JSON: "
                f"{snippet!r}",
                method=method,
                url=url,
            ) from exc

    @staticmethod
    def _status_error(
        response: requests.Response, method: str, path: str, url: str, base_url: str
    ) -> APIStatusError:
        body: Any
        try:
            body = json.loads(response.content)
        except ValueError:
            body = response.text
        message = ""
        if response.status_code == 404 and not _is_kelpie_404(body):
            message = (
                f"{base_url} answered 404 for {path}: is KELPIE_API_URL the "
                "server's base URL?"
            )
        if isinstance(body, Mapping) and not message:
            for key in ("message", "error"):
                value = body.get(key)
                if isinstance(value, str) and value:
                    message = value
                    break
            errors = body.get("errors")
            if isinstance(errors, list) and errors:
                details = [
                    d for d in map(_error_detail, errors[:5]) if d not in message
                ]
                if details:
                    joined = "; ".join(details)
                    message = f"{message}: {joined}" if message else joined
        if not message:
            raw = body if isinstance(body, str) else json.dumps(body)
            message = raw.strip()[:200] or response.reason or "no message"
        index = body.get("index") if isinstance(body, Mapping) else None
        if isinstance(index, bool) or not isinstance(index, int):
            index = None
        else:
            # The server names the rejected item of a batch; say which.
            message = f"job at index {index}: {message}"
        request_id = response.headers.get("x-request-id")
        text = f"{response.status_code} {method} {path}: {message}"
        if request_id:
            text += f" (request_id={request_id})"
        error_cls = status_error_class(response.status_code)
        return error_cls(
            text,
            status_code=response.status_code,
            body=body,
            request_id=request_id,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            method=method,
            url=url,
            index=index,
        )
