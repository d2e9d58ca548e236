"""
Webhooks: the outbox rows, each tenant's signing secret, the address guard,
and the dispatcher that sends them.

A status change (running, completed, failed, canceled) of a job with a webhook
URL writes a row to ``webhook_deliveries`` in its own transaction. The
dispatcher, a thread in each server process, claims due rows (``FOR UPDATE
SKIP LOCKED`` on PostgreSQL, and a lease on every database: claiming moves
``next_attempt`` a minute ahead, so a replica that dies mid-send hands the row
to another), signs them per Standard Webhooks, and sends them with httpx: no
redirects followed, 5 s to connect, 10 s in all, a bounded number at once.
A failure is retried with exponential backoff and jitter (or after the
receiver's ``Retry-After``) for up to a day; delivered and abandoned rows are
deleted a week later.

The host is resolved at delivery time, every address it resolves to is
checked against the forbidden ranges (unless the operator's allowlist permits
it), and the request goes to the checked address, so a DNS answer that
changes between the check and the connection cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import attrs
import sqlalchemy as sa

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server._db import WEBHOOK_DELIVERIES, WEBHOOK_SECRETS
from kelpie_sdk.webhooks import generate_secret, sign

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "SECRET_GRACE_MS",
    "Dispatcher",
    "WebhookRefused",
    "WebhookSettings",
    "check_literal",
    "delivery_row",
    "forbidden_reason",
    "literal_address",
    "parse_allow",
    "parse_retry_after",
    "read_secret",
    "rotate_secret",
]

logger = logging.getLogger("kelpie_sdk.server.webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How long after a rotation the previous secret still signs (a day).
SECRET_GRACE_MS = 24 * 3600 * 1000

#: How long a replica holds a claimed delivery before another may send it.
_LEASE_MS = 60_000


def delivery_row(
    *,
    user_id: str,
    job_id: str,
    url: str,
    event: str,
    machine_id: str | None,
    group: str,
    now: int,
    echo_key: str | None = None,
) -> dict[str, Any]:
    """
    The outbox row of one event: the original's body plus ``event_id`` and
    ``time``, fixed now so that every attempt sends (and signs) the same bytes.
    """
    event_id = "msg_" + uuid.uuid4().hex
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 1000))
    body = {
        "status": event,
        "job_id": job_id,
        "machine_id": machine_id,
        "container_group_id": group,
        "event_id": event_id,
        "time": f"{stamp}.{now % 1000:03d}Z",
    }
    return {
        "id": event_id,
        "user_id": user_id,
        "job_id": job_id,
        "event": event,
        "url": url,
        "body": json.dumps(body, separators=(",", ":")),
        "echo_key": echo_key,
        "now": now,
    }


# -- secrets -------------------------------------------------------------------


def read_secret(engine: Engine, user_id: str, now: int) -> tuple[str, str | None]:
    """
    The tenant's secret (created on first use) and the previous one while it
    is still in its grace period.
    """
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(WEBHOOK_SECRETS).where(WEBHOOK_SECRETS.c.user_id == user_id)
        ).first()
        if row is None:
            secret = generate_secret()
            try:
                with conn.begin_nested():
                    conn.execute(
                        WEBHOOK_SECRETS.insert().values(
                            user_id=user_id, secret=secret, created=now
                        )
                    )
            except sa.exc.IntegrityError:
                # Created at the same moment elsewhere: use that one.
                return read_secret(engine, user_id, now)
            return secret, None
    previous = row.previous if (row.previous_until or 0) > now else None
    return str(row.secret), previous


def rotate_secret(engine: Engine, user_id: str, now: int) -> tuple[str, str | None]:
    """
    Replace the tenant's secret; the old one keeps signing for a day.
    """
    current, _ = read_secret(engine, user_id, now)
    secret = generate_secret()
    with engine.begin() as conn:
        conn.execute(
            WEBHOOK_SECRETS.update()
            .where(WEBHOOK_SECRETS.c.user_id == user_id)
            .values(
                secret=secret,
                previous=current,
                previous_until=now + SECRET_GRACE_MS,
                created=now,
            )
        )
    return secret, current


# -- the address guard -----------------------------------------------------------


class WebhookRefused(Exception):
    """
    The webhook's host is, or resolves to, a forbidden address.
    """


def parse_allow(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """
    Parse allowlist entries (CIDRs or single addresses; commas also split).

    Raises:
        ConfigError: An entry is not an address or network.
    """
    nets: list[IPNetwork] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise ConfigError(
                    f"not a CIDR for the webhook allowlist: {item!r}"
                ) from exc
    return tuple(nets)


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forbidden_reason(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """
    Why webhooks may not go to this address (``None``: they may).

    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
    """
    plain = _plain(ip)
    if any(ip in net or plain in net for net in allow):
        return None
    # The most specific name first: 169.254.0.0/16 and 0.0.0.0 are also
    # "private" to the ipaddress module.
    for kind in (
        "loopback",
        "link_local",
        "multicast",
        "unspecified",
        "reserved",
        "private",
    ):
        if getattr(plain, f"is_{kind}"):
            return kind.replace("_", "-")
    if not plain.is_global:
        return "not global"
    return None


_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def literal_address(host: str) -> IPAddress | None:
    """
    The address a host names literally, in any form a resolver accepts
    (``127.0.0.1``, ``::1``, ``2130706433``, ``0x7f.1``, ``0177.1``), or
    ``None`` for a name.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_literal(url: str, allow: Sequence[IPNetwork]) -> str | None:
    """
    Why a webhook URL is refused at submission (its host is a literal
    forbidden address), or ``None``. Names are checked at delivery.
    """
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    ip = literal_address(host)
    if ip is None:
        return None
    reason = forbidden_reason(ip, allow)
    if reason is None:
        return None
    return f"webhook address {ip} is {reason}; see the webhook allowlist"


# -- the dispatcher -------------------------------------------------------------


@attrs.frozen
class WebhookSettings:
    """
    How the server sends webhooks.

    Attributes:
        allow: Networks exempt from the address guard (the operator's
            allowlist: ``--webhook-allow``, ``KELPIE_WEBHOOK_ALLOW``).
        echo_key: Send the original's ``x-kelpie-key`` header (the API key of
            the request that caused the event). Off by default: it hands the
            receiver a usable key.
        max_in_flight: Deliveries sent at once by one server process.
        max_age: Seconds after the event that a delivery is given up.
        base_delay: Seconds before the first retry; doubled per attempt.
        max_delay: The longest wait between attempts (also caps Retry-After).
        keep: Seconds delivered and abandoned rows are kept.
        poll: Seconds between looks at the outbox when it is idle.
        connect_timeout: Seconds to connect.
        timeout: Seconds for the whole request.
    """

    allow: tuple[IPNetwork, ...] = ()
    echo_key: bool = False
    max_in_flight: int = 16
    max_age: float = 24 * 3600.0
    base_delay: float = 5.0
    max_delay: float = 3600.0
    keep: float = 7 * 24 * 3600.0
    poll: float = 1.0
    connect_timeout: float = 5.0
    timeout: float = 10.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], allow: Iterable[str] = (), **kwargs: Any
    ) -> WebhookSettings:
        """
        Settings from ``KELPIE_WEBHOOK_ALLOW`` (comma-separated CIDRs) plus
        the given allowlist entries.
        """
        entries = [*allow, environ.get("KELPIE_WEBHOOK_ALLOW", "")]
        return cls(allow=parse_allow(entries), **kwargs)


@attrs.frozen
class _Outcome:
    status: int | None = None
    retry_after: float | None = None
    error: str | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date).
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Dispatcher:
    """
    Sends the outbox's due deliveries; one per server process.

    Args:
        engine: The store's engine.
        settings: Timeouts, retries, allowlist.
        clock: Seconds since the epoch (the store's clock).
        rng: The jitter's random numbers.
        resolve: ``(host, port) -> addresses``; default: the system resolver.
        verify: The TLS context that checks receivers' certificates (against
            the URL's host name); default: the system's CAs.
    """

    def __init__(
        self,
        engine: Engine,
        settings: WebhookSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        resolve: Callable[[str, int], list[str]] | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or WebhookSettings()
        self._clock = clock
        self._rng = rng or random.Random()
        self._resolve = resolve or _system_resolve
        self._verify: ssl.SSLContext | bool = True if verify is None else verify
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_cleanup = 0.0

    # -- the loop ----------------------------------------------------------

    def start(self) -> None:
        """
        Run in a daemon thread until :meth:`stop`.
        """
        self._thread = threading.Thread(
            target=self._run, name="kelpie-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """
        Stop the thread (deliveries in flight finish or time out first).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception:
                logger.exception("webhook dispatch failed; retrying shortly")
                sent = 0
            if not sent:
                self._stop.wait(self.settings.poll)

    def run_once(self) -> int:
        """
        Claim the due deliveries (at most ``max_in_flight``), send them
        concurrently, record each outcome; now and then delete old finished
        rows. Returns how many were sent.
        """
        now = self._now_ms()
        if now - self._last_cleanup >= 60_000:
            self._last_cleanup = now
            self.cleanup(now)
        rows = self._claim(now)
        if not rows:
            return 0
        users = {r["user_id"] for r in rows}
        secrets = {user: self._signing_secrets(user, now) for user in users}
        outcomes = asyncio.run(self._send_all(rows, secrets))
        for row, outcome in zip(rows, outcomes, strict=True):
            self._record(row, outcome)
        return len(rows)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _signing_secrets(self, user_id: str, now: int) -> list[str]:
        current, previous = read_secret(self.engine, user_id, now)
        return [current] if previous is None else [current, previous]

    # -- the outbox ----------------------------------------------------------

    def _claim(self, now: int) -> list[dict[str, Any]]:
        t = WEBHOOK_DELIVERIES
        due = sa.select(t.c.id).where(t.c.state == "pending", t.c.next_attempt <= now)
        # An idle outbox costs one indexed read a second, not a write
        # transaction (on SQLite that would take the database's write lock).
        with (
            self.engine.connect().execution_options(readonly=True) as conn,
            conn.begin(),
        ):
            if conn.execute(due.limit(1)).first() is None:
                return []
        with self.engine.begin() as conn:
            rows = (
                conn.execute(
                    sa.select(t)
                    .where(t.c.state == "pending", t.c.next_attempt <= now)
                    .order_by(t.c.next_attempt)
                    .limit(self.settings.max_in_flight)
                    .with_for_update(skip_locked=True)
                )
                .mappings()
                .all()
            )
            if not rows:
                return []
            conn.execute(
                t.update()
                .where(t.c.id.in_([r["id"] for r in rows]))
                .values(next_attempt=now + _LEASE_MS, attempts=t.c.attempts + 1)
            )
        return [dict(r, attempts=r["attempts"] + 1) for r in rows]

    def delay(self, attempts: int, retry_after: float | None) -> float:
        """
        Seconds before the next attempt: the receiver's ``Retry-After`` if it
        sent one, else ``base_delay * 2**(attempts - 1)`` with jitter (half
        to all of it), both at most ``max_delay``.
        """
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.max_delay)
        ceiling = min(s.max_delay, s.base_delay * 2.0 ** min(attempts - 1, 32))
        return ceiling * self._rng.uniform(0.5, 1.0)

    def _record(self, row: Mapping[str, Any], outcome: _Outcome) -> None:
        t = WEBHOOK_DELIVERIES
        now = self._now_ms()
        values: dict[str, Any] = {
            "last_status": outcome.status,
            "last_error": outcome.error,
        }
        if outcome.delivered:
            values.update(state="delivered", finished=now)
        else:
            wait = self.delay(row["attempts"], outcome.retry_after)
            retry_at = now + int(wait * 1000)
            too_late = retry_at > row["created"] + self.settings.max_age * 1000
            if outcome.refused or too_late:
                values.update(state="abandoned", finished=now)
                logger.warning(
                    "gave up webhook %s for job %s after %d attempt(s): %s",
                    row["id"],
                    row["job_id"],
                    row["attempts"],
                    outcome.error or f"HTTP {outcome.status}",
                )
            else:
                values["next_attempt"] = retry_at
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == row["id"]).values(**values))

    def cleanup(self, now: int | None = None) -> int:
        """
        Delete delivered and abandoned rows older than ``keep``.
        """
        now = self._now_ms() if now is None else now
        t = WEBHOOK_DELIVERIES
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    t.delete().where(
                        t.c.state != "pending",
                        t.c.finished < now - int(self.settings.keep * 1000),
                    )
                ).rowcount
            )

    # -- sending -------------------------------------------------------------

    async def _send_all(
        self, rows: Sequence[Mapping[str, Any]], secrets: Mapping[str, list[str]]
    ) -> list[_Outcome]:
        import httpx

        s = self.settings
        timeout = httpx.Timeout(s.timeout, connect=s.connect_timeout)
        # No connection is reused: the pool is keyed by the address connected
        # to, and two hosts on one address must not share a TLS session
        # checked for only one of them.
        async with httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            verify=self._verify,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            return list(
                await asyncio.gather(
                    *(self._send(client, r, secrets[r["user_id"]]) for r in rows)
                )
            )

    async def _send(
        self, client: Any, row: Mapping[str, Any], secrets: Sequence[str]
    ) -> _Outcome:
        import httpx

        try:
            async with asyncio.timeout(self.settings.timeout):
                url = httpx.URL(row["url"])
                if url.scheme not in ("http", "https") or not url.host:
                    return _Outcome(error="not an http(s) URL", refused=True)
                port = url.port or (443 if url.scheme == "https" else 80)
                addresses = await asyncio.to_thread(self._resolve, url.host, port)
                target = self._check(url.host, addresses)
                body = row["body"].encode()
                stamp = int(self._clock())
                headers = {
                    "Host": url.netloc.decode("ascii"),
                    "Content-Type": "application/json",
                    "User-Agent": "kelpie-webhooks",
                    "webhook-id": row["id"],
                    "webhook-timestamp": str(stamp),
                    "webhook-signature": " ".join(
                        sign(row["id"], stamp, body, secret) for secret in secrets
                    ),
                }
                if self.settings.echo_key:
                    headers["x-kelpie-key"] = row["echo_key"] or ""
                extensions = {}
                if url.scheme == "https":
                    extensions["sni_hostname"] = url.host
                response = await client.post(
                    url.copy_with(host=target),
                    content=body,
                    headers=headers,
                    extensions=extensions,
                )
                return _Outcome(
                    status=response.status_code,
                    retry_after=parse_retry_after(
                        response.headers.get("retry-after"), self._clock()
                    )
                    if response.status_code >= 300
                    else None,
                )
        except WebhookRefused as exc:
            return _Outcome(error=f"refused: {exc}", refused=True)
        except TimeoutError:
            return _Outcome(error="timed out")
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return _Outcome(error=f"{type(exc).__name__}: {exc}"[:500])

    def _check(self, host: str, addresses: Sequence[str]) -> str:
        if not addresses:
            raise WebhookRefused(f"{host} resolves to no address")
        for address in addresses:
            ip = ipaddress.ip_address(address)
            reason = forbidden_reason(ip, self.settings.allow)
            if reason is not None:
                raise WebhookRefused(f"{host} resolves to {address} ({reason})")
        return addresses[0]


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
