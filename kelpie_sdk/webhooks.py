"""
Verify (and make) the signatures on the server's webhook requests.

The server signs each webhook per the Standard Webhooks scheme: the headers
``webhook-id``, ``webhook-timestamp`` (seconds since the epoch) and
``webhook-signature``, which holds one or more space-separated ``v1,<base64>``
signatures, each an HMAC-SHA256 over ``<id>.<timestamp>.<body>`` keyed with
the tenant's secret (``whsec_`` + base64 of the key bytes). A receiver::

    from kelpie_sdk.webhooks import verify

    verify(request_body_bytes, request_headers, "whsec_...")  # raises if bad

This module imports nothing but the standard library and ``kelpie_sdk.errors``,
so a receiver needs no server dependencies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kelpie_sdk.errors import WebhookVerificationError

__all__ = [
    "SECRET_PREFIX",
    "TOLERANCE_SECONDS",
    "WebhookSecret",
    "WebhookVerificationError",
    "generate_secret",
    "sign",
    "verify",
]

#: Every webhook secret starts with this.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret

#: How far (seconds) a request's timestamp may be from the receiver's clock.
TOLERANCE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class WebhookSecret:
    """
    A tenant's webhook signing secret, as ``GET /users/me/webhook-secret``
    returns it.

    Attributes:
        secret: The current secret (``whsec_...``).
        previous: The secret it replaced, while webhooks are still also
            signed with it (a day after a rotation); else ``None``.
    """

    secret: str
    previous: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WebhookSecret:
        """
        Read the API's JSON object.
        """
        previous = data.get("previous")
        return cls(secret=str(data["secret"]), previous=previous and str(previous))

    def to_json(self) -> dict[str, Any]:
        """
        The API's JSON object.
        """
        return {"secret": self.secret, "previous": self.previous}


def generate_secret() -> str:
    """
    A new random secret: ``whsec_`` + base64 of 32 random bytes.
    """
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookVerificationError(
            f"a webhook secret starts with {SECRET_PREFIX!r}"
        )
    try:
        return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookVerificationError("the webhook secret is not base64") from exc


def sign(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """
    The signature of one request: ``v1,`` + base64 HMAC-SHA256 over
    ``<msg_id>.<timestamp>.<body>``.

    Raises:
        WebhookVerificationError: The secret is not ``whsec_`` + base64.
    """
    payload = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise WebhookVerificationError(f"the {name} header is missing")


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """
    Check a webhook request's signature and timestamp.

    Pass the body exactly as received (bytes; a ``str`` is encoded as UTF-8):
    re-serialised JSON will not match.

    Args:
        body: The raw request body.
        headers: The request's headers (names in any case).
        secret: The tenant's webhook secret (``whsec_...``), as
            ``kelpie webhooks secret`` shows it.
        tolerance: Seconds the timestamp may be off from ``now``.
        now: The current time (seconds since the epoch); default: the clock.

    Raises:
        WebhookVerificationError: A header is missing, the timestamp is not a
            number or is more than ``tolerance`` seconds off, no ``v1``
            signature matches, or the header carries only unknown schemes.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise WebhookVerificationError(
            f"the webhook-timestamp header is not a number: {stamp!r}"
        ) from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"the webhook timestamp is {current - timestamp:+.0f} s off, more "
            f"than the {tolerance:g} s allowed"
        )
    expected = sign(msg_id, timestamp, raw, secret).encode()
    schemes = set()
    for candidate in signatures.split():
        scheme, _, _ = candidate.partition(",")
        schemes.add(scheme)
        if scheme == "v1" and hmac.compare_digest(candidate.encode(), expected):
            return
    if schemes and "v1" not in schemes:
        raise WebhookVerificationError(
            f"no signature in a known scheme (got {', '.join(sorted(schemes))})"
        )
    raise WebhookVerificationError("no webhook signature matches")
