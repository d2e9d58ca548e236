"""
Webhooks end to end: the outbox written with each status change, sent by the
dispatcher to a receiver on loopback, signed, retried, and kept off forbidden
addresses.

The dispatcher runs in the test's thread (``Dispatcher.run_once``) with the
server's fake clock, so that backoff is checked without waiting.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from kelpie_sdk.server._db import WEBHOOK_DELIVERIES
from kelpie_sdk.server._webhooks import (
    Dispatcher,
    WebhookSettings,
    forbidden_reason,
    literal_address,
    parse_allow,
    parse_retry_after,
)
from kelpie_sdk.webhooks import verify

from ..conftest import Api, FakeClock
from ..pg import fresh_database
from .helpers import report, sync_job

LOOPBACK = parse_allow(["127.0.0.0/8", "::1/128"])
ALLOW_LOOPBACK = WebhookSettings(allow=LOOPBACK)


class Receiver:
    """
    A threaded HTTP server on 127.0.0.1 that records each POST and answers
    from a script (status, headers), then 200.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback."""
    r = Receiver()
    yield r
    r.close()


class Hooks:
    """A server with the loopback allowlist, its clock, and a dispatcher."""

    def __init__(self, handle: Any, clock: FakeClock, settings: WebhookSettings):
        self.handle = handle
        self.clock = clock
        self.engine = handle.store.engine
        self.dispatcher = Dispatcher(
            self.engine, settings, clock=clock, rng=random.Random(7)
        )
        admin = Api(handle.url, handle.admin_key)
        user = admin.post("/users", json={"username": f"u-{uuid.uuid4().hex}"}).json()
        key = admin.post(
            f"/users/{user['id']}/token", json={"org_name": "o", "project_name": "p"}
        ).json()["token"]
        self.api = Api(handle.url, key)
        self.user_id = user["id"]

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(WEBHOOK_DELIVERIES).order_by(WEBHOOK_DELIVERIES.c.created)
                )
                .mappings()
                .all()
            )

    def secret(self) -> str:
        return str(self.api.get("/users/me/webhook-secret").json()["secret"])

    def submit(self, url: str, group: str = "g", **extra: Any) -> str:
        response = self.api.post("/jobs", json=sync_job(group, webhook=url, **extra))
        assert 202 == response.status_code, response.text
        return str(response.json()["id"])

    def claim(self, group: str = "g", machine: str = "m1") -> dict[str, Any]:
        jobs = self.api.get(
            "/work", params={"machine_id": machine, "container_group_id": group}
        ).json()
        assert 1 == len(jobs)
        return dict(jobs[0])


@contextlib.contextmanager
def _hooks(backend: str, settings: WebhookSettings = ALLOW_LOOPBACK) -> Iterator[Hooks]:
    from kelpie_sdk.testing import run_server

    clock = FakeClock()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database()) if backend == "postgresql" else None
        handle = stack.enter_context(
            run_server(
                database_url=url,
                clock=clock,
                webhooks=settings,
                webhook_dispatch=False,
            )
        )
        yield Hooks(handle, clock, settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def hooks(request: pytest.FixtureRequest) -> Iterator[Hooks]:
    """A server (per database) whose webhooks the test sends itself."""
    with _hooks(request.param) as h:
        yield h


def _body(req: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(req["body"]))


# -- each event ---------------------------------------------------------------------


def test_each_event_is_delivered_signed(hooks: Hooks, receiver: Receiver) -> None:
    """running, completed, failed and canceled reach the receiver, signed."""
    done = hooks.submit(receiver.url)
    hooks.claim()
    hooks.api.post(f"/jobs/{done}/completed", json=report("m1", "g"))
    failing = hooks.submit(receiver.url, max_failures=1)
    hooks.claim(machine="m2")
    hooks.api.post(f"/jobs/{failing}/failed", json=report("m2", "g"))
    canceled = hooks.submit(receiver.url)
    hooks.api.delete(f"/jobs/{canceled}")
    assert 5 == hooks.dispatcher.run_once()

    secret = hooks.secret()
    seen = []
    for req in receiver.requests:
        verify(req["body"], req["headers"], secret)
        Webhook(secret).verify(req["body"], req["headers"])
        body = _body(req)
        assert req["headers"]["webhook-id"] == body["event_id"]
        assert "application/json" == req["headers"]["Content-Type"]
        assert "x-kelpie-key" not in {k.lower() for k in req["headers"]}
        seen.append((body["job_id"], body["status"], body["machine_id"]))
        assert body["time"].endswith("Z")
        assert "g" == body["container_group_id"]
    assert sorted(
        [
            (done, "running", "m1"),
            (done, "completed", "m1"),
            (failing, "running", "m2"),
            (failing, "failed", "m2"),
            (canceled, "canceled", None),
        ]
    ) == sorted(seen)
    assert {"delivered"} == {r["state"] for r in hooks.rows()}


def test_a_non_final_failure_sends_nothing(hooks: Hooks, receiver: Receiver) -> None:
    """As in the original, only the final failure is announced."""
    job = hooks.submit(receiver.url, max_failures=3)
    hooks.claim()
    hooks.api.post(f"/jobs/{job}/failed", json=report("m1", "g"))
    assert ["running"] == [r["event"] for r in hooks.rows()]


def test_a_lease_takeover_announces_running_again(
    hooks: Hooks, receiver: Receiver
) -> None:
    """A job handed out again after its lease ran out sends running again."""
    hooks.submit(receiver.url, heartbeat_interval=1)
    hooks.claim(machine="m1")
    hooks.clock.advance(5)
    hooks.claim(machine="m2")
    hooks.dispatcher.run_once()
    assert [("running", "m1"), ("running", "m2")] == sorted(
        (_body(r)["status"], _body(r)["machine_id"]) for r in receiver.requests
    )


def test_jobs_without_webhook_write_no_outbox_rows(hooks: Hooks) -> None:
    """The hot path pays nothing for jobs that have no webhook URL."""
    job = hooks.api.post("/jobs", json=sync_job("g")).json()["id"]
    hooks.claim()
    hooks.api.post(f"/jobs/{job}/completed", json=report("m1", "g"))
    assert [] == hooks.rows()


def test_purge_announces_canceled_running_jobs(
    hooks: Hooks, receiver: Receiver
) -> None:
    """Purging a group cancels its running jobs, each announced."""
    job = hooks.submit(receiver.url, group="p")
    hooks.claim(group="p")
    hooks.api.delete("/jobs/container-groups/p")
    assert ["running", "canceled"] == [r["event"] for r in hooks.rows()]
    assert job == hooks.rows()[1]["job_id"]


# -- atomicity -------------------------------------------------------------------


def test_outbox_row_rolls_back_with_the_status_change(
    hooks: Hooks, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the completion's transaction fails, neither the status nor the row stays."""
    job = hooks.submit(receiver.url)
    hooks.claim()
    store = hooks.handle.store
    original = store._webhook

    def then_fail(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        raise RuntimeError("crash after the outbox insert")

    monkeypatch.setattr(store, "_webhook", then_fail)
    response = hooks.api.post(f"/jobs/{job}/completed", json=report("m1", "g"))
    assert 500 == response.status_code
    monkeypatch.undo()
    assert "running" == hooks.api.get(f"/jobs/{job}").json()["status"]
    assert ["running"] == [r["event"] for r in hooks.rows()]


# -- retries -----------------------------------------------------------------------


def test_5xx_then_200_delivers_on_the_retry(hooks: Hooks, receiver: Receiver) -> None:
    """A 500 is retried after the backoff (not before), then delivered once."""
    receiver.script = [(500, {})]
    hooks.submit(receiver.url)
    hooks.claim()
    assert 1 == hooks.dispatcher.run_once()
    (row,) = hooks.rows()
    assert ("pending", 500, 1) == (row["state"], row["last_status"], row["attempts"])
    wait = (row["next_attempt"] - hooks.dispatcher._now_ms()) / 1000
    assert 2.5 <= wait <= 5.0  # base 5 s, jittered to half..all
    assert 0 == hooks.dispatcher.run_once()
    hooks.clock.advance(wait + 0.1)
    assert 1 == hooks.dispatcher.run_once()
    assert 0 == hooks.dispatcher.run_once()
    assert 2 == len(receiver.requests)
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    (row,) = hooks.rows()
    assert ("delivered", 2) == (row["state"], row["attempts"])


def test_retry_after_is_honoured(hooks: Hooks, receiver: Receiver) -> None:
    """A 503 with Retry-After: 120 waits 120 s, not the 5 s backoff."""
    receiver.script = [(503, {"Retry-After": "120"})]
    hooks.submit(receiver.url)
    hooks.claim()
    hooks.dispatcher.run_once()
    hooks.clock.advance(100)
    assert 0 == hooks.dispatcher.run_once()
    hooks.clock.advance(21)
    assert 1 == hooks.dispatcher.run_once()
    assert 2 == len(receiver.requests)


def test_redirects_are_not_followed(hooks: Hooks, receiver: Receiver) -> None:
    """A 302 is a failed attempt; its Location is never requested."""
    receiver.script = [(302, {"Location": f"http://127.0.0.1:{receiver.port}/else"})]
    hooks.submit(receiver.url)
    hooks.claim()
    hooks.dispatcher.run_once()
    assert ["/hook"] == [r["path"] for r in receiver.requests]
    (row,) = hooks.rows()
    assert ("pending", 302) == (row["state"], row["last_status"])


def test_gives_up_after_a_day(hooks: Hooks, receiver: Receiver) -> None:
    """A receiver that keeps failing is abandoned once the next try is past a day."""
    receiver.script = [(500, {})] * 100
    hooks.submit(receiver.url)
    hooks.claim()
    attempts = 0
    while hooks.rows()[0]["state"] == "pending":
        attempts += hooks.dispatcher.run_once()
        hooks.clock.advance(3600)
        assert attempts < 60
    (row,) = hooks.rows()
    assert "abandoned" == row["state"]
    # The last try fell within the day (the loop steps an hour at a time).
    assert row["finished"] - row["created"] <= 25 * 3600 * 1000
    assert row["attempts"] == len(receiver.requests) == attempts


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    """delay(n) lies in [half, all] of min(cap, 5 * 2**(n-1))."""
    dispatcher = Dispatcher(sa.create_engine("sqlite://"), rng=random.Random(1))
    for attempts, ceiling in [(1, 5), (2, 10), (5, 80), (20, 3600)]:
        for _ in range(20):
            assert ceiling / 2 <= dispatcher.delay(attempts, None) <= ceiling
    assert 3600 == dispatcher.delay(1, 999_999)
    assert 7 == dispatcher.delay(9, 7)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("Thu, 01 Jan 1970 00:02:00 GMT", 60.0),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Seconds or an HTTP date; anything else is ignored."""
    assert expected == parse_retry_after(value, 60.0)


def test_a_claimed_delivery_is_not_sent_twice(hooks: Hooks, receiver: Receiver) -> None:
    """A second dispatcher (another replica) does not take a leased delivery."""
    hooks.submit(receiver.url)
    hooks.claim()
    now = hooks.dispatcher._now_ms()
    assert 1 == len(hooks.dispatcher._claim(now))
    other = Dispatcher(hooks.engine, hooks.dispatcher.settings, clock=hooks.clock)
    assert [] == other._claim(now)
    hooks.clock.advance(61)
    assert 1 == len(other._claim(other._now_ms()))


def test_postgresql_claim_skips_rows_another_replica_is_claiming(
    receiver: Receiver,
) -> None:
    """On PostgreSQL a claim passes over locked rows at once instead of waiting."""
    with _hooks("postgresql") as h:
        h.submit(receiver.url)
        h.claim()
        with h.engine.connect() as conn, conn.begin():
            conn.execute(sa.select(WEBHOOK_DELIVERIES).with_for_update())
            start = time.monotonic()
            assert [] == h.dispatcher._claim(h.dispatcher._now_ms())
            assert time.monotonic() - start < 2
        assert 1 == len(h.dispatcher._claim(h.dispatcher._now_ms()))


def test_finished_rows_are_cleaned_up(hooks: Hooks, receiver: Receiver) -> None:
    """Delivered rows go a week after delivery; pending rows stay."""
    hooks.submit(receiver.url)
    hooks.claim()
    hooks.dispatcher.run_once()
    hooks.submit("http://127.0.0.1:9/never")
    hooks.clock.advance(6 * 24 * 3600)
    assert 0 == hooks.dispatcher.cleanup()
    hooks.clock.advance(2 * 24 * 3600)
    assert 1 == hooks.dispatcher.cleanup()


def test_the_server_thread_delivers(receiver: Receiver) -> None:
    """With dispatch on (as `kelpie server` runs), deliveries go by themselves."""
    from kelpie_sdk.testing import run_server

    settings = WebhookSettings(allow=LOOPBACK, poll=0.05)
    with run_server(webhooks=settings) as handle:
        api = Api(handle.url, handle.admin_key)
        api.post("/jobs", json=sync_job("g", webhook=receiver.url))
        api.get("/work", params={"machine_id": "m", "container_group_id": "g"})
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ["running"] == [_body(r)["status"] for r in receiver.requests]


# -- the address guard ---------------------------------------------------------------


FORBIDDEN = [
    "http://127.0.0.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://10.1.2.3/",
    "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://240.0.0.1/",
    "https://[fd00::1]/",
]


@pytest.mark.parametrize("url", FORBIDDEN)
def test_forbidden_literal_addresses_are_refused_at_submit(api: Api, url: str) -> None:
    """A literal loopback/private/link-local/... address is a 400, in any form."""
    response = api.post("/jobs", json=sync_job("g", webhook=url))
    assert 400 == response.status_code, url
    assert "allowlist" in response.json()["message"]


def test_batch_refuses_a_forbidden_webhook_with_its_index(api: Api) -> None:
    """The batch names the offending job and inserts nothing."""
    response = api.post(
        "/jobs/batch",
        json=[
            sync_job("g", webhook="https://hooks.example.com/"),
            sync_job("g", webhook="http://10.0.0.1/"),
        ],
    )
    assert (400, 1) == (response.status_code, response.json()["index"])


def test_public_addresses_and_names_are_accepted_at_submit(api: Api) -> None:
    """Names are judged at delivery; public literals pass."""
    for url in ("https://hooks.example.com/x", "http://93.184.216.34/x"):
        assert 202 == api.post("/jobs", json=sync_job("g", webhook=url)).status_code


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("100.64.0.1", "not global"),
    ],
)
def test_forbidden_reason(address: str, reason: str | None) -> None:
    """IPv4-mapped IPv6 is judged as its IPv4 address."""
    ip = literal_address(address)
    assert ip is not None
    assert reason == forbidden_reason(ip)


def test_allowlist_covers_ipv4_mapped_addresses() -> None:
    """Allowing 127.0.0.0/8 also allows ::ffff:127.0.0.1, and nothing else."""
    mapped = literal_address("::ffff:127.0.0.1")
    assert mapped is not None
    assert None is forbidden_reason(mapped, LOOPBACK[:1])
    other = literal_address("::ffff:10.0.0.1")
    assert other is not None
    assert "private" == forbidden_reason(other, LOOPBACK[:1])


def test_allowlist_permits_a_literal_at_submit() -> None:
    """--webhook-allow lets an operator's own network through."""
    with _hooks("sqlite", WebhookSettings(allow=parse_allow(["10.0.0.0/8"]))) as h:
        assert (
            202
            == h.api.post(
                "/jobs", json=sync_job("g", webhook="http://10.1.2.3/")
            ).status_code
        )
        response = h.api.post("/jobs", json=sync_job("g", webhook="http://127.0.0.1/"))
        assert 400 == response.status_code


def test_a_name_resolving_to_loopback_is_refused_at_delivery(
    receiver: Receiver,
) -> None:
    """localhost passes submission but is never connected to without the allowlist."""
    with _hooks("sqlite", WebhookSettings()) as h:
        h.submit(f"http://localhost:{receiver.port}/hook")
        h.claim()
        h.dispatcher.run_once()
        (row,) = h.rows()
    assert [] == receiver.requests
    assert "abandoned" == row["state"]
    assert "loopback" in row["last_error"]


def test_delivery_connects_to_the_address_it_checked(receiver: Receiver) -> None:
    """
    The request goes to the resolved, checked address with the name in Host:
    a second lookup (DNS rebinding) never happens.
    """
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    with _hooks("sqlite") as h:
        h.dispatcher._resolve = resolve
        h.submit(f"http://hooks.invalid:{receiver.port}/hook")
        h.claim()
        h.dispatcher.run_once()
    assert ["hooks.invalid"] == lookups
    (req,) = receiver.requests
    assert f"hooks.invalid:{receiver.port}" == req["headers"]["Host"]


def test_any_forbidden_resolved_address_refuses(receiver: Receiver) -> None:
    """A name with one public and one private address is refused."""
    with _hooks("sqlite", WebhookSettings()) as h:
        h.dispatcher._resolve = lambda host, port: ["93.184.216.34", "10.0.0.1"]
        h.submit("http://mixed.invalid/hook")
        h.claim()
        h.dispatcher.run_once()
        (row,) = h.rows()
    assert "abandoned" == row["state"]
    assert "10.0.0.1" in row["last_error"]


# -- the secret --------------------------------------------------------------------


def test_secret_is_stable_until_rotated(hooks: Hooks) -> None:
    """GET returns the same secret; POST replaces it and reports the old one."""
    first = hooks.api.get("/users/me/webhook-secret").json()
    assert first["secret"].startswith("whsec_")
    assert first == hooks.api.get("/users/me/webhook-secret").json()
    rotated = hooks.api.post("/users/me/webhook-secret").json()
    assert first["secret"] == rotated["previous"]
    assert rotated["secret"] not in (first["secret"], None)


def test_secrets_are_per_tenant(hooks: Hooks) -> None:
    """Another user has another secret."""
    admin = Api(hooks.handle.url, hooks.handle.admin_key)
    assert (
        admin.get("/users/me/webhook-secret").json()["secret"]
        != hooks.api.get("/users/me/webhook-secret").json()["secret"]
    )


def test_rotation_signs_with_both_secrets_for_a_day(
    hooks: Hooks, receiver: Receiver
) -> None:
    """After a rotation both secrets verify; a day later only the new one."""
    old = hooks.secret()
    new = hooks.api.post("/users/me/webhook-secret").json()["secret"]
    hooks.submit(receiver.url)
    hooks.claim()
    hooks.dispatcher.run_once()
    req = receiver.requests[-1]
    assert 2 == len(req["headers"]["webhook-signature"].split())
    for secret in (old, new):
        verify(req["body"], req["headers"], secret)
        Webhook(secret).verify(req["body"], req["headers"])
    hooks.clock.advance(24 * 3600 + 1)
    hooks.submit(receiver.url, group="g2")
    hooks.claim(group="g2")
    hooks.dispatcher.run_once()
    req = receiver.requests[-1]
    now = hooks.clock()
    verify(req["body"], req["headers"], new, now=now)
    with pytest.raises(ValueError, match="signature"):
        verify(req["body"], req["headers"], old, now=now)
    assert None is hooks.api.get("/users/me/webhook-secret").json()["previous"]


def test_echo_key_is_off_by_default_and_opt_in(receiver: Receiver) -> None:
    """x-kelpie-key is sent only with echo_key=True, carrying the caller's key."""
    with _hooks("sqlite", WebhookSettings(allow=LOOPBACK, echo_key=True)) as h:
        h.submit(receiver.url)
        h.claim()
        h.dispatcher.run_once()
        key = h.api.session.headers["X-Kelpie-Key"]
    (req,) = receiver.requests
    assert key == req["headers"]["x-kelpie-key"]


# -- the SDK and the CLI ---------------------------------------------------------------


def test_client_reads_and_rotates_the_secret(api_server: Any, user_key: str) -> None:
    """Client.webhook_secret() reads; rotate=True replaces and reports the old one."""
    from kelpie_sdk import Client

    with Client(api_server.url, user_key) as client:
        first = client.webhook_secret()
        assert first == client.webhook_secret()
        assert None is first.previous
        rotated = client.webhook_secret(rotate=True)
    assert first.secret == rotated.previous
    assert first.secret != rotated.secret


def test_cli_webhooks_secret(api_server: Any, user_key: str) -> None:
    """`kelpie webhooks secret` prints the secret; --rotate shows both."""
    from tests.test_cli import Run

    kelpie = Run(api_server.url, user_key)
    assert 0 == kelpie("webhooks", "secret")
    first = kelpie.out.strip()
    assert first.startswith("whsec_")
    assert 0 == kelpie("webhooks", "secret", "--rotate", "--json")
    data = kelpie.json()
    assert first == data["previous"]
    assert 0 == kelpie("webhooks", "secret")
    assert data["secret"] in kelpie.out
    assert "still signs" in kelpie.out


# -- https ---------------------------------------------------------------------------


def _tls_contexts(tmp: Any, host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A private CA, a receiver's context for ``host``, and a client's trusting the CA."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(
        name: str, key: Any, issuer: Any, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = cert("test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(host, key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "leaf.key").write_bytes(
        key.private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "leaf.pem", tmp / "leaf.key")
    client = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    return server, client


def test_https_checks_the_certificate_of_the_name(tmp_path: Any) -> None:
    """
    Over https the server connects to the checked address but sends the URL's
    name as SNI and checks the certificate against it: another name on the
    same address fails.
    """
    server_tls, client_tls = _tls_contexts(tmp_path, "hooks.test")
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)
    receiver = Receiver(tls=server_tls)
    try:
        with _hooks("sqlite") as h:
            h.dispatcher = Dispatcher(
                h.engine,
                ALLOW_LOOPBACK,
                clock=h.clock,
                resolve=lambda host, port: ["127.0.0.1"],
                verify=client_tls,
            )
            h.submit(f"https://hooks.test:{receiver.port}/hook")
            h.submit(f"https://other.test:{receiver.port}/hook", group="g2")
            h.claim()
            h.claim(group="g2")
            h.dispatcher.run_once()
            rows = {r["url"].split("/")[2].split(":")[0]: r for r in h.rows()}
    finally:
        receiver.close()
    assert "delivered" == rows["hooks.test"]["state"]
    assert "pending" == rows["other.test"]["state"]
    assert "CERTIFICATE_VERIFY_FAILED" in rows["other.test"]["last_error"]
    assert 1 == len(receiver.requests)
    assert f"hooks.test:{receiver.port}" == receiver.requests[0]["headers"]["Host"]
    assert "hooks.test" in names


# -- kelpie server ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_kelpie_server_delivers_with_its_allowlist(
    tmp_path: Any, receiver: Receiver, how: str
) -> None:
    """`kelpie server` runs the dispatcher; --webhook-allow or the env allows loopback."""
    from .test_cli_server import kelpie_server

    key = "sekrit-" + "s" * 32
    env = {"KELPIE_ADMIN_KEY": key}
    args: tuple[str, ...] = ("--webhook-allow", "127.0.0.1/32")
    if how == "env":
        env["KELPIE_WEBHOOK_ALLOW"] = "10.0.0.0/8, 127.0.0.1/32"
        args = ()
    with kelpie_server(tmp_path / "w.db", env, *args) as (url, _):
        api = Api(url, key)
        response = api.post("/jobs", json=sync_job("g", webhook=receiver.url))
        assert 202 == response.status_code, response.text
        api.get("/work", params={"machine_id": "m", "container_group_id": "g"})
        deadline = time.monotonic() + 20
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        secret = api.get("/users/me/webhook-secret").json()["secret"]
    (req,) = receiver.requests
    verify(req["body"], req["headers"], secret)


def test_kelpie_server_refuses_a_bad_allowlist_entry() -> None:
    """A --webhook-allow that is not a CIDR stops the server with a one-line error."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kelpie_sdk", "server", "--webhook-allow", "intranet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 1 == proc.returncode
    assert "not a CIDR for the webhook allowlist: 'intranet'" in proc.stderr


def test_a_public_ipv6_literal_webhook_is_accepted(api: Api) -> None:
    """An IPv6 address in brackets is a host like any other: a public one is queued."""
    url = "https://[2606:4700:4700::1111]:8443/hook"
    response = api.post("/jobs", json=sync_job("g", webhook=url))
    assert 202 == response.status_code, response.text
