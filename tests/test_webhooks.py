"""
kelpie_sdk.webhooks: signing and verification, checked against the
standardwebhooks package as an independent implementation.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import (
    WebhookVerificationError as OracleError,
)

from kelpie_sdk.errors import KelpieError, WebhookVerificationError
from kelpie_sdk.webhooks import generate_secret, sign, verify

BODY = (
    b'{"status":"completed","job_id":"j-1","machine_id":"m","container_group_id":"g"}'
)


def _headers(secret: str, stamp: int, body: bytes = BODY) -> dict[str, str]:
    return {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign("msg_1", stamp, body, secret),
    }


def test_our_signature_verifies_with_standardwebhooks() -> None:
    """A request we sign passes the reference implementation."""
    secret = generate_secret()
    headers = _headers(secret, int(time.time()))
    assert Webhook(secret).verify(BODY, headers)["job_id"] == "j-1"


def test_standardwebhooks_signature_verifies_with_ours() -> None:
    """A request the reference implementation signs passes verify()."""
    secret = generate_secret()
    now = int(time.time())
    signature = Webhook(secret).sign(
        "msg_2", dt.datetime.fromtimestamp(now, dt.UTC), BODY.decode()
    )
    headers = {
        "webhook-id": "msg_2",
        "webhook-timestamp": str(now),
        "webhook-signature": signature,
    }
    assert None is verify(BODY, headers, secret)


def test_header_names_in_any_case() -> None:
    """Receivers' frameworks capitalise header names differently."""
    secret = generate_secret()
    headers = {k.title(): v for k, v in _headers(secret, 1000).items()}
    assert None is verify(BODY, headers, secret, now=1000)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b, h: (b + b" ", h),
        lambda b, h: (
            b,
            {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)},
        ),
        lambda b, h: (b, {**h, "webhook-id": "msg_other"}),
        lambda b, h: (b, {**h, "webhook-signature": "v1,AAAA"}),
    ],
    ids=["body", "timestamp", "id", "signature"],
)
def test_tampering_fails_both_ways(tamper: object) -> None:
    """A changed body, timestamp, id or signature fails ours and the oracle."""
    secret = generate_secret()
    now = int(time.time())
    body, headers = tamper(BODY, _headers(secret, now))  # type: ignore[operator]
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, secret)
    with pytest.raises(OracleError):
        Webhook(secret).verify(body, headers)


def test_wrong_secret_fails() -> None:
    """Another tenant's secret does not verify."""
    headers = _headers(generate_secret(), 1000)
    with pytest.raises(WebhookVerificationError, match="no webhook signature"):
        verify(BODY, headers, generate_secret(), now=1000)


@pytest.mark.parametrize("offset", [-301, 301], ids=["old", "future"])
def test_timestamp_more_than_five_minutes_off_fails(offset: int) -> None:
    """Replays outside the window are refused, as by the oracle."""
    secret = generate_secret()
    now = int(time.time())
    headers = _headers(secret, now + offset)
    with pytest.raises(WebhookVerificationError, match="off"):
        verify(BODY, headers, secret)
    with pytest.raises(OracleError):
        Webhook(secret).verify(BODY, headers)


def test_timestamp_within_five_minutes_passes() -> None:
    """299 s of clock skew is tolerated."""
    secret = generate_secret()
    assert None is verify(BODY, _headers(secret, 1000), secret, now=1299)


def test_unknown_scheme_fails() -> None:
    """Only v1 signatures are understood; others are named in the error."""
    secret = generate_secret()
    headers = _headers(secret, 1000)
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v9,")
    with pytest.raises(WebhookVerificationError, match=r"known scheme.*v9"):
        verify(BODY, headers, secret, now=1000)


def test_any_of_several_signatures_passes() -> None:
    """During a rotation the header holds two signatures; either secret works."""
    old, new = generate_secret(), generate_secret()
    now = int(time.time())
    headers = _headers(new, now)
    headers["webhook-signature"] += " " + sign("msg_1", now, BODY, old)
    for secret in (old, new):
        assert None is verify(BODY, headers, secret)
        assert None is Webhook(secret).verify(BODY, headers, json_parse=False)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"webhook-id": "x", "webhook-timestamp": "1"},
        {"webhook-id": "x", "webhook-timestamp": "soon", "webhook-signature": "v1,x"},
    ],
    ids=["none", "no-signature", "bad-timestamp"],
)
def test_malformed_headers_fail(headers: dict[str, str]) -> None:
    """Missing or malformed headers raise the package's error."""
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, generate_secret(), now=1)


def test_error_is_a_kelpie_error_and_value_error() -> None:
    """Callers may catch KelpieError or ValueError."""
    assert issubclass(WebhookVerificationError, KelpieError)
    assert issubclass(WebhookVerificationError, ValueError)


def test_bad_secret_is_refused() -> None:
    """A secret without the whsec_ prefix is an error, not a silent mismatch."""
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify(BODY, _headers(generate_secret(), 1), "hunter2", now=1)


def test_module_is_light() -> None:
    """Importing kelpie_sdk.webhooks pulls in no server or HTTP library."""
    code = (
        "import sys, kelpie_sdk.webhooks; "
        "bad = [m for m in ('requests', 'httpx', 'sqlalchemy', 'litestar', "
        "'kelpie_sdk.server', 'kelpie_sdk.client') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "[]" == out.stdout.strip()
