"""
Tests for the pure retry policy in kelpie_sdk._retry.
"""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk._retry import (
    BACKOFF_CAP,
    MAX_RETRY_AFTER,
    Failure,
    backoff_delay,
    parse_retry_after,
    should_retry,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("failure", "status", "idempotent", "expected"),
    [
        (Failure.CONNECT, None, True, True),
        (Failure.CONNECT, None, False, True),
        (Failure.READ_TIMEOUT, None, True, True),
        (Failure.READ_TIMEOUT, None, False, False),
        (Failure.CONNECTION, None, True, True),
        (Failure.CONNECTION, None, False, False),
        (Failure.STATUS, 429, False, True),
        (Failure.STATUS, 429, True, True),
        (Failure.STATUS, 408, True, True),
        (Failure.STATUS, 408, False, False),
        (Failure.STATUS, 500, True, True),
        (Failure.STATUS, 500, False, False),
        (Failure.STATUS, 502, True, True),
        (Failure.STATUS, 503, True, True),
        (Failure.STATUS, 503, False, False),
        (Failure.STATUS, 504, True, True),
        (Failure.STATUS, 501, True, False),
        (Failure.STATUS, 400, True, False),
        (Failure.STATUS, 404, True, False),
        (Failure.STATUS, 409, True, False),
        (Failure.STATUS, None, True, False),
    ],
    ids=lambda v: str(getattr(v, "value", v)),
)
def test_should_retry_table(
    failure: Failure, status: int | None, idempotent: bool, expected: bool
) -> None:
    """Each failure kind is retried exactly where repeating is safe."""
    assert expected == should_retry(
        failure, status=status, idempotent=idempotent, attempt=0, max_retries=2
    )


@pytest.mark.parametrize(
    ("attempt", "max_retries", "expected"),
    [(0, 0, False), (0, 1, True), (1, 1, False), (1, 2, True), (2, 2, False)],
)
def test_should_retry_respects_the_budget(
    attempt: int, max_retries: int, expected: bool
) -> None:
    """No retry is allowed once max_retries retries were made."""
    assert expected == should_retry(
        Failure.CONNECT, idempotent=True, attempt=attempt, max_retries=max_retries
    )


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (100, 8.0)],
)
def test_backoff_without_jitter(attempt: int, expected: float) -> None:
    """With zero jitter the delay doubles from 0.5 s and stops at 8 s."""
    assert expected == backoff_delay(attempt, random_fraction=lambda: 0.0)


def test_backoff_full_jitter_takes_off_a_quarter() -> None:
    """The largest jitter shortens the delay by 25 %."""
    assert 0.375 == backoff_delay(0, random_fraction=lambda: 1.0)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(3.0, 3.0), (0.0, 0.0), (-5.0, 0.0), (120.0, MAX_RETRY_AFTER)],
)
def test_backoff_prefers_retry_after(retry_after: float, expected: float) -> None:
    """A server-given Retry-After replaces the backoff, capped at 60 s."""
    assert expected == backoff_delay(3, retry_after=retry_after)


@given(
    attempt=st.integers(min_value=-10, max_value=10_000),
    fraction=st.floats(allow_nan=False),
)
def test_backoff_is_within_bounds(attempt: int, fraction: float) -> None:
    """The backoff is always between 0 and the cap, whatever the inputs."""
    delay = backoff_delay(attempt, random_fraction=lambda: fraction)
    assert 0.0 <= delay <= BACKOFF_CAP


@given(retry_after=st.floats())
def test_backoff_with_any_retry_after_is_within_bounds(retry_after: float) -> None:
    """Any Retry-After value, even NaN or infinite, gives a delay within bounds."""
    delay = backoff_delay(1, retry_after=retry_after)
    assert 0.0 <= delay <= MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("3600", MAX_RETRY_AFTER),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        (
            email.utils.format_datetime(NOW + dt.timedelta(seconds=30), usegmt=True),
            30.0,
        ),
        (email.utils.format_datetime(NOW - dt.timedelta(seconds=30), usegmt=True), 0.0),
        (email.utils.format_datetime(NOW + dt.timedelta(hours=2), usegmt=True), 60.0),
        ("Wed, 31 Feb 2026 99:00:00 GMT", None),
    ],
    ids=repr,
)
def test_parse_retry_after_table(header: str | None, expected: float | None) -> None:
    """Seconds and HTTP dates are understood; anything else gives None."""
    assert expected == parse_retry_after(header, now=NOW)


def test_parse_retry_after_naive_date_and_now() -> None:
    """A date without a zone and a naive `now` are both taken as UTC."""
    naive_now = NOW.replace(tzinfo=None)
    assert 10.0 == parse_retry_after("Thu, 01 Jan 2026 12:00:10 -0000", now=naive_now)


def test_parse_retry_after_defaults_to_the_current_time() -> None:
    """Without `now`, a date far in the future is capped at the maximum."""
    assert MAX_RETRY_AFTER == parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")


@given(st.text())
def test_parse_retry_after_never_raises(header: str) -> None:
    """Any header text parses to None or a delay within [0, 60]."""
    value = parse_retry_after(header, now=NOW)
    assert value is None or 0.0 <= value <= MAX_RETRY_AFTER


@given(st.datetimes(timezones=st.just(dt.UTC)))
def test_parse_retry_after_any_http_date_is_bounded(when: dt.datetime) -> None:
    """Any valid HTTP date parses to a delay within [0, 60]."""
    value = parse_retry_after(email.utils.format_datetime(when, usegmt=True), now=NOW)
    assert value is not None
    assert 0.0 <= value <= MAX_RETRY_AFTER
