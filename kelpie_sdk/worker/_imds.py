"""
SaladCloud's instance metadata service (IMDS), as the worker uses it.

On a SaladCloud node the container can reach a metadata service at
``http://169.254.169.254`` (every call carries the header ``Metadata: true``).
The worker uses three of its endpoints:

- ``PUT /v1/deletion-cost`` ``{"deletion_cost": n}``: how much SaladCloud
  should prefer *not* to remove this node when it scales the group in;
- ``POST /v1/reallocate`` ``{"reason": "..."}``: give this node up and run the
  container on another one;
- ``GET /v1/token`` -> ``{"jwt": "..."}``: the workload identity token.

None of this exists elsewhere, so the worker only talks to IMDS when it runs on
SaladCloud (see :func:`imds_enabled`); everywhere else nothing is sent, and the
worker's exit codes stand in for reallocation.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping

from kelpie_sdk._transport import Timeout, Transport
from kelpie_sdk.errors import ConfigError, KelpieError, ResponseValidationError

__all__ = [
    "DEFAULT_IMDS_URL",
    "DELETION_COST_CLAIMED",
    "DELETION_COST_FINAL_UPLOAD",
    "DELETION_COST_IDLE",
    "IMDS_MODES",
    "REALLOCATE_IDLE",
    "REALLOCATE_MAX_FAILURES",
    "REALLOCATE_QUARANTINED",
    "SALADCLOUD_MARKERS",
    "DeletionCost",
    "Imds",
    "check_imds_mode",
    "check_imds_url",
    "deletion_cost_after_heartbeats",
    "imds_enabled",
    "jwt_expiry",
]

logger = logging.getLogger("kelpie_sdk.worker")

DEFAULT_IMDS_URL = "http://169.254.169.254"
#: ``KELPIE_IMDS`` / ``--imds`` values.
IMDS_MODES = ("auto", "on", "off")
#: Variables SaladCloud sets in every container; ``auto`` needs all of them.
#: (``kelpie up`` and plain ``kelpie worker`` runs set at most the first two.)
SALADCLOUD_MARKERS = (
    "SALAD_MACHINE_ID",
    "SALAD_CONTAINER_GROUP_ID",
    "SALAD_ORGANIZATION_NAME",
    "SALAD_PROJECT_NAME",
)

#: No job on this node: the cheapest node to remove.
DELETION_COST_IDLE = 0
#: A job was just claimed.
DELETION_COST_CLAIMED = 1
#: A finished job's outputs are being uploaded: never remove this node now.
DELETION_COST_FINAL_UPLOAD = 999_999_999

REALLOCATE_MAX_FAILURES = "Kelpie: Max Job Failures Exceeded"
#: The API server quarantined this machine (this project's addition).
REALLOCATE_QUARANTINED = "Kelpie: Machine quarantined by the API server"
#: Followed by the idle time in milliseconds.
REALLOCATE_IDLE = "Kelpie: Max idle time exceeded: "

#: Timeouts of every IMDS call: it is on the node, so it answers fast or not at all.
_TIMEOUT: Timeout = (2.0, 5.0)
#: A token is fetched again this many seconds before its ``exp``.
_REFRESH_MARGIN_S = 60.0
#: How long a token without a readable ``exp`` is reused.
_NO_EXPIRY_TTL_S = 300.0


def deletion_cost_after_heartbeats(count: int) -> int:
    """
    The deletion cost while a job runs: it rises with each heartbeat.

    Args:
        count: The job's successful heartbeats so far (from 1).

    Returns:
        ``count + 2``, so that a running job always costs more than a claim.
    """
    return count + 2


def check_imds_mode(mode: str) -> None:
    """
    Check a ``--imds`` / ``KELPIE_IMDS`` value (already lower-cased).

    Raises:
        ConfigError: ``mode`` is not one of ``IMDS_MODES``.
    """
    if mode not in IMDS_MODES:
        raise ConfigError(
            f"--imds / KELPIE_IMDS must be one of {', '.join(IMDS_MODES)}, got {mode!r}"
        )


def check_imds_url(url: str) -> None:
    """
    Check a ``--imds-url`` / ``KELPIE_IMDS_URL`` value.

    Raises:
        ConfigError: ``url`` is not an http:// or https:// URL.
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"--imds-url / KELPIE_IMDS_URL must start with http:// or "
            f"https://, got {url!r}"
        )


def imds_enabled(mode: str, environ: Mapping[str, str]) -> bool:
    """
    Whether the worker talks to IMDS.

    Args:
        mode: ``on``, ``off``, or ``auto`` (on only where every variable in
            ``SALADCLOUD_MARKERS`` is set, as SaladCloud does).
        environ: The environment.

    Raises:
        ConfigError: An unknown mode.
    """
    mode = mode.strip().lower()
    check_imds_mode(mode)
    if mode == "auto":
        return all(environ.get(name, "").strip() for name in SALADCLOUD_MARKERS)
    return mode == "on"


def jwt_expiry(token: str) -> float | None:
    """
    The ``exp`` claim of a JWT (seconds since the epoch), read without
    verifying the signature; ``None`` if there is none.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


class Imds:
    """
    A small client of SaladCloud's instance metadata service.

    Thread-safe: the slots and their heartbeat threads share one.

    Args:
        base_url: The service (``KELPIE_IMDS_URL``).
        timeout: Per request, ``(connect, read)`` seconds.
        max_retries: Retries of the token and reallocate calls (a deletion cost
            is not retried: the next change sends it again).
        sleep: Waits between retries.
        clock: Wall-clock seconds since the epoch (tokens expire by it).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_IMDS_URL,
        *,
        timeout: Timeout = _TIMEOUT,
        max_retries: int = 2,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_imds_url(base_url)
        self._transport = Transport(
            base_url,
            {"Metadata": "true"},
            timeout=timeout,
            max_retries=max_retries,
            sleep=sleep,
        )
        self._clock = clock
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_until = 0.0

    @property
    def base_url(self) -> str:
        """
        The service's base URL.
        """
        return self._transport.base_url

    def close(self) -> None:
        """
        Close the pooled connections.
        """
        self._transport.close()

    def set_deletion_cost(self, cost: int) -> bool:
        """
        Tell SaladCloud how costly removing this node would be now.

        Never raises: a failure is logged.

        Returns:
            Whether IMDS accepted it.
        """
        try:
            self._transport.request(
                "PUT",
                "/v1/deletion-cost",
                json_body={"deletion_cost": cost},
                max_retries=0,
            )
        except ResponseValidationError:
            pass  # a 2xx answer that is not JSON is still a yes
        except KelpieError as exc:
            logger.warning(
                "IMDS: setting the deletion cost to %d failed: %s", cost, exc
            )
            return False
        logger.debug("IMDS: deletion cost %d", cost)
        return True

    def reallocate(self, reason: str) -> bool:
        """
        Ask SaladCloud to move this container to another node.

        Never raises: a failure is logged.

        Returns:
            Whether IMDS accepted the request.
        """
        try:
            self._transport.request(
                "POST", "/v1/reallocate", json_body={"reason": reason}, idempotent=True
            )
        except ResponseValidationError:
            pass
        except KelpieError as exc:
            logger.error("IMDS: the reallocation request failed: %s", exc)
            return False
        logger.warning("IMDS: reallocation requested (%s)", reason)
        return True

    def token(self) -> str:
        """
        The workload identity token, fetched once and reused until shortly
        before it expires.

        Raises:
            KelpieError: IMDS did not give a token (``APIError`` subclasses for
                transport and status failures).
        """
        with self._token_lock:
            now = self._clock()
            if self._token is not None and now < self._token_until:
                return self._token
            body = self._transport.request("GET", "/v1/token")
            jwt = body.get("jwt") if isinstance(body, dict) else None
            if not isinstance(jwt, str) or not jwt:
                raise ResponseValidationError(
                    f"GET /v1/token: IMDS answered without a 'jwt': {body!r:.200}",
                    method="GET",
                    url=self.base_url + "/v1/token",
                )
            exp = jwt_expiry(jwt)
            if exp is None:
                until = now + _NO_EXPIRY_TTL_S
            else:
                until = max(exp - _REFRESH_MARGIN_S, now)
            self._token, self._token_until = jwt, until
            return jwt


class DeletionCost:
    """
    The node's deletion cost: the highest of its slots' values, sent to IMDS
    when it changes (or again after a failed send).

    A background thread sends, so a slow or absent IMDS never holds up a
    heartbeat; when values change faster than they are sent, the latest wins.

    Args:
        imds: Where to send it.
        slots: How many slots the worker runs.
    """

    def __init__(self, imds: Imds, slots: int) -> None:
        self.imds = imds
        self._values = [DELETION_COST_IDLE] * slots
        #: The value last handed to the sender, unless its send failed.
        self._target: int | None = None
        self._pending = False
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def set(self, slot: int, value: int) -> None:
        """
        Record one slot's value; the node's goes out if it changed.
        """
        with self._cond:
            self._values[slot] = value
            node = max(self._values)
            if node == self._target or self._closed:
                return
            self._target = node
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._send_loop, name="imds-deletion-cost", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """
        Wait until the latest value was sent (or failed).

        Returns:
            Whether nothing is left to send.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and not self._busy, timeout
            )

    def close(self, timeout: float = 5.0) -> None:
        """
        Send what is pending (waiting up to ``timeout``), then stop the sender.
        """
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                value = self._target
                self._pending = False
                self._busy = True
            ok = value is None or self.imds.set_deletion_cost(value)
            with self._cond:
                self._busy = False
                if not ok and self._target == value and not self._pending:
                    self._target = None
                self._cond.notify_all()
