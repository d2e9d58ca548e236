"""
The retry policy as pure functions: when to retry, and how long to wait.

The transport calls these; they never sleep, log or touch the network, so they
are tested with tables and Hypothesis.

Policy:

- Retryable failures are connection errors, read timeouts and the statuses
  408, 429, 500, 502, 503 and 504.
- A request that is *safe to repeat* (GET, DELETE, PATCH with absolute values,
  the worker heartbeat) is retried on any of them.
- Any other request (a POST that creates something or reports an outcome) is
  retried only when the server cannot have acted on it: the connection failed
  before the request was sent, or the server answered 429.
- The wait is ``Retry-After`` if the server sent one (seconds or an HTTP date,
  capped at 60 s), else ``0.5 s * 2**attempt`` capped at 8 s, minus up to 25 %
  jitter.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import enum
import math
import random
from collections.abc import Callable

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "JITTER",
    "MAX_RETRY_AFTER",
    "RETRYABLE_STATUSES",
    "Failure",
    "backoff_delay",
    "parse_retry_after",
    "should_retry",
]

#: Statuses that mean "try again later".
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: The first backoff delay, in seconds.
BACKOFF_BASE = 0.5
#: The longest backoff delay, in seconds.
BACKOFF_CAP = 8.0
#: The largest fraction taken off a backoff delay at random.
JITTER = 0.25
#: The longest ``Retry-After`` honoured, in seconds; longer values are capped.
MAX_RETRY_AFTER = 60.0


class Failure(enum.Enum):
    """
    How a request attempt failed, as far as retrying is concerned.
    """

    #: The connection could not be made; the request was never sent.
    CONNECT = "connect"
    #: The request was sent but no (complete) answer came in time.
    READ_TIMEOUT = "read_timeout"
    #: The connection broke after the request may have been sent.
    CONNECTION = "connection"
    #: The server answered with a status (see ``status``).
    STATUS = "status"


def should_retry(
    failure: Failure,
    *,
    status: int | None = None,
    idempotent: bool,
    attempt: int,
    max_retries: int,
) -> bool:
    """
    Decide whether to repeat a failed request.

    Args:
        failure: How the attempt failed.
        status: The HTTP status, when ``failure`` is ``Failure.STATUS``.
        idempotent: Whether repeating the request is harmless.
        attempt: How many retries were already made (0 after the first try).
        max_retries: The most retries allowed.

    Returns:
        ``True`` to try again.
    """
    if attempt >= max_retries:
        return False
    if failure is Failure.CONNECT:
        return True
    if failure is Failure.STATUS:
        if status is None or status not in RETRYABLE_STATUSES:
            return False
        return idempotent or status == 429
    return idempotent


def backoff_delay(
    attempt: int,
    *,
    retry_after: float | None = None,
    random_fraction: Callable[[], float] = random.random,
) -> float:
    """
    Return the seconds to wait before retry number ``attempt + 1``.

    Args:
        attempt: How many retries were already made (0 before the first).
        retry_after: The server's ``Retry-After`` in seconds, if it sent one.
        random_fraction: Returns a number in ``[0, 1)`` for the jitter.

    Returns:
        ``retry_after`` capped to ``[0, MAX_RETRY_AFTER]`` when given; otherwise
        a value in ``[0.75 * d, d]`` where ``d = min(BACKOFF_CAP, 0.5 * 2**attempt)``.
    """
    if retry_after is not None and math.isfinite(retry_after):
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
    exponent = min(max(attempt, 0), 32)
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**exponent)
    fraction = min(max(random_fraction(), 0.0), 1.0)
    return delay * (1.0 - JITTER * fraction)


def parse_retry_after(
    value: str | None, *, now: dt.datetime | None = None
) -> float | None:
    """
    Parse a ``Retry-After`` header.

    Args:
        value: The header value: delay seconds or an HTTP date.
        now: The current time for HTTP dates (default: now, UTC).

    Returns:
        Seconds to wait, in ``[0, MAX_RETRY_AFTER]``; ``None`` when the header is
        missing or unparseable. Never raises.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until(text, now)
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _seconds_until(text: str, now: dt.datetime | None) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = dt.datetime.now(dt.UTC) if now is None else now
    if current.tzinfo is None:
        current = current.replace(tzinfo=dt.UTC)
    return (when - current).total_seconds()
