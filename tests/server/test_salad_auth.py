"""
SaladCloud credentials: workload tokens verified against a JWKS served on
loopback, API keys through a pluggable validator, and the tenant they map to.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server import SaladAuthSettings
from kelpie_sdk.server._salad_auth import (
    JWKSCache,
    SaladAuthError,
    add_salad_auth_arguments,
    salad_auth_settings,
    tenant_user_id,
)
from kelpie_sdk.testing import run_server

from ..conftest import Api
from ..pg import fresh_database

AUDIENCE = "kelpie-test"
VALIDATOR = "tests.server.test_salad_auth:validate_key"
#: The API keys ``validate_key`` knows, and their organizations.
SALAD_KEYS = {"good-acme-key": "acme"}


def validate_key(api_key: str, organization: str, project: str) -> str | None:
    """The test validator: known keys belong to their org; 'boom' fails."""
    if api_key == "boom":
        raise RuntimeError("the validation service is down")
    org = SALAD_KEYS.get(api_key)
    return org if org == organization else None


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig", "alg": "RS256"}


class JWKSServer:
    """A JWKS on 127.0.0.1 whose keys and health a test can change."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    try:
        yield server
    finally:
        server.close()


def _dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/jwks.json"


KEY = _rsa()
OTHER_KEY = _rsa()


def token(
    key: rsa.RSAPrivateKey = KEY,
    *,
    kid: str | None = "k1",
    algorithm: str = "RS256",
    **claims: Any,
) -> str:
    """A workload token for acme/proj, valid for an hour, with overrides."""
    now = int(time.time())
    body = {
        "salad_organization_name": "acme",
        "salad_project_name": "proj",
        "salad_workload_id": "w-1",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def bearer(jwt_token: str, project: str = "proj") -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt_token}", "Salad-Project": project}


def salad_key(key: str, org: str = "acme") -> dict[str, str]:
    return {"Salad-Api-Key": key, "Salad-Organization": org, "Salad-Project": "proj"}


@pytest.fixture(scope="module")
def jwks() -> Iterator[JWKSServer]:
    with jwks_server() as server:
        server.keys = [_jwk(KEY, "k1")]
        yield server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def salad_server(request: pytest.FixtureRequest, jwks: JWKSServer) -> Iterator[Any]:
    """A server that accepts acme's and globex's SaladCloud credentials."""
    settings = SaladAuthSettings(
        jwks_url=jwks.url,
        audience=AUDIENCE,
        organizations=frozenset({"acme", "globex"}),
        api_key_validator=VALIDATOR,
        min_refresh=0.0,
    )
    with contextlib.ExitStack() as stack:
        url = None
        if request.param == "postgresql":
            url = stack.enter_context(fresh_database())
        yield stack.enter_context(run_server(database_url=url, salad_auth=settings))


@pytest.fixture
def anon(salad_server: Any) -> Api:
    return Api(salad_server.url, None)


# -- workload tokens through the server ------------------------------------------


def test_good_token_is_the_organizations_user(anon: Api) -> None:
    """A valid token maps to its organization's user, created on first sight."""
    r = anon.get("/users/me", headers=bearer(token()))
    assert 200 == r.status_code
    assert (tenant_user_id("acme"), "acme") == (r.json()["id"], r.json()["username"])


def test_deleted_tenant_user_comes_back(anon: Api, salad_server: Any) -> None:
    """After DELETE /users, the organization's user is created again."""
    admin = Api(salad_server.url, salad_server.admin_key)
    assert 200 == anon.get("/users/me", headers=bearer(token())).status_code
    assert 204 == admin.delete("/users").status_code
    r = anon.get("/users/me", headers=bearer(token()))
    assert (200, "acme") == (r.status_code, r.json()["username"])


def test_token_and_api_key_of_one_org_share_a_queue(anon: Api) -> None:
    """A job submitted with an API key is listed with a token of the same org."""
    group = "0b5a7a4e-0000-4000-8000-000000000001"
    job = anon.post(
        "/jobs",
        json={"command": "true", "container_group_id": group, "sync": {}},
        headers=salad_key("good-acme-key"),
    )
    assert 202 == job.status_code
    listed = anon.get(f"/jobs?container_group_id={group}", headers=bearer(token()))
    assert [job.json()["id"]] == [j["id"] for j in listed.json()["jobs"]]


def test_another_org_sees_nothing(anon: Api) -> None:
    """globex's token does not see acme's jobs: tenants are organizations."""
    group = "0b5a7a4e-0000-4000-8000-000000000002"
    anon.post(
        "/jobs",
        json={"command": "true", "container_group_id": group, "sync": {}},
        headers=bearer(token()),
    )
    theirs = bearer(token(salad_organization_name="globex"))
    listed = anon.get(f"/jobs?container_group_id={group}", headers=theirs)
    assert (200, 0) == (listed.status_code, listed.json()["_count"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: token(exp=int(time.time()) - 3600), "expired"),
        (lambda: token(aud="someone-else"), "audience"),
        (lambda: token(aud=None), "aud"),
        (lambda: token(salad_organization_name="initech"), "initech"),
        (lambda: token(salad_organization_name=None), "salad_organization_name"),
        (lambda: token(salad_project_name="elsewhere"), "project"),
        (lambda: token(OTHER_KEY), "Signature verification failed"),
        (lambda: token(kid="no-such-key"), "signing key is unknown"),
        (lambda: token(kid=None, exp=None), "exp"),
        (lambda: "not.a.jwt", "invalid token"),
    ],
    ids=[
        "expired",
        "wrong-audience",
        "no-audience",
        "wrong-org",
        "no-org",
        "other-project",
        "bad-signature",
        "unknown-kid",
        "no-exp",
        "garbage",
    ],
)
def test_bad_tokens_are_403(anon: Api, make: Any, message: str) -> None:
    """Each failed check refuses the token with 403 and says why."""
    r = anon.get("/jobs", headers=bearer(make()))
    assert (403, "Forbidden") == (r.status_code, r.json()["error"])
    assert message.lower() in r.json()["message"].lower()


def test_symmetric_algorithm_confusion_is_refused(anon: Api) -> None:
    """A token 'signed' with HS256 using the public key as secret is refused."""
    public_pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    claims = {
        "salad_organization_name": "acme",
        "aud": AUDIENCE,
        "exp": int(time.time()) + 60,
    }
    signed = header + b"." + b64(json.dumps(claims).encode())
    mac = hmac.new(public_pem, signed, hashlib.sha256).digest()
    forged = (signed + b"." + b64(mac)).decode()
    r = anon.get("/jobs", headers=bearer(forged))
    assert (403, "Forbidden") == (r.status_code, r.json()["error"])


def test_token_principal_is_not_admin(anon: Api) -> None:
    """A workload token is an ordinary user: admin routes answer 403."""
    r = anon.delete("/jobs", headers=bearer(token()))
    assert (403, "Admin Only") == (r.status_code, r.json()["message"])


def test_rotated_key_is_fetched_on_unknown_kid(anon: Api, jwks: JWKSServer) -> None:
    """A token signed by a key added after the JWKS was cached is accepted."""
    assert 200 == anon.get("/users/me", headers=bearer(token())).status_code
    new_key = _rsa()
    jwks.keys = [_jwk(KEY, "k1"), _jwk(new_key, "k2")]
    try:
        r = anon.get("/users/me", headers=bearer(token(new_key, kid="k2")))
        assert 200 == r.status_code
    finally:
        jwks.keys = [_jwk(KEY, "k1")]


def test_jwks_unreachable_is_503() -> None:
    """With no JWKS to check against, the answer is 503: retry, not give up."""
    settings = SaladAuthSettings(
        jwks_url=_dead_url(), organizations=frozenset({"acme"}), jwks_timeout=1.0
    )
    with run_server(salad_auth=settings) as handle:
        r = Api(handle.url, None).get("/jobs", headers=bearer(token()))
    assert (503, "Service Unavailable") == (r.status_code, r.json()["error"])


# -- API keys --------------------------------------------------------------------


def test_api_key_is_checked_by_the_validator(anon: Api) -> None:
    """Known key: the org's user; unknown key or wrong org: 403; failure: 503."""
    r = anon.get("/users/me", headers=salad_key("good-acme-key"))
    assert (200, tenant_user_id("acme")) == (r.status_code, r.json()["id"])
    for headers in (salad_key("unknown"), salad_key("good-acme-key", "globex")):
        refused = anon.get("/users/me", headers=headers)
        assert (403, "Invalid API Key") == (
            refused.status_code,
            refused.json()["message"],
        )
    failed = anon.get("/users/me", headers=salad_key("boom"))
    assert 503 == failed.status_code


# -- off unless configured ---------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [bearer(token()), salad_key("good-acme-key")],
    ids=["token", "api-key"],
)
def test_off_unless_configured(api_server: Any, headers: dict[str, str]) -> None:
    """A server without SaladCloud settings refuses even valid credentials."""
    r = Api(api_server.url, None).get("/users/me", headers=headers)
    assert 403 == r.status_code
    assert "use X-Kelpie-Key" in r.json()["message"]


def _parse(*argv: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_salad_auth_arguments(parser, env or {})
    return parser.parse_args(list(argv))


def test_settings_are_off_by_default() -> None:
    """No option and no environment variable: no SaladCloud credentials."""
    assert salad_auth_settings(_parse()) is None


def test_settings_from_the_environment() -> None:
    """The KELPIE_SALAD_* variables set the same options."""
    settings = salad_auth_settings(
        _parse(
            env={
                "KELPIE_SALAD_JWKS_URL": "https://example.invalid/jwks.json",
                "KELPIE_SALAD_JWT_AUDIENCE": "aud",
                "KELPIE_SALAD_ALLOWED_ORGS": "acme, globex",
                "KELPIE_SALAD_API_KEY_VALIDATOR": VALIDATOR,
            }
        )
    )
    assert settings is not None
    assert (frozenset({"acme", "globex"}), "aud") == (
        settings.organizations,
        settings.audience,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--salad-jwks-url", "https://example.invalid/j"], "--salad-allowed-orgs"),
        (
            ["--salad-jwks-url", "http://example.invalid/j", "--salad-allowed-orgs=a"],
            "https",
        ),
        (["--salad-api-key-validator", "no_such_module:f"], "cannot load"),
        (["--salad-api-key-validator", "nocolon"], "module:function"),
    ],
    ids=["no-orgs", "plain-http", "missing-validator", "bad-validator-spec"],
)
def test_unusable_settings_stop_the_start(argv: list[str], message: str) -> None:
    """A JWKS without allowed orgs, over plain http, or a bad validator: refused."""
    with pytest.raises(ConfigError, match=message):
        salad_auth_settings(_parse(*argv))


# -- the JWKS cache ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_unknown_kids_fetch_at_most_once_per_interval() -> None:
    """Made-up key ids cannot make the server fetch the JWKS in a loop."""
    clock = Clock()
    with jwks_server() as server:
        server.keys = [_jwk(KEY, "k1")]
        cache = JWKSCache(server.url, min_refresh=30.0, clock=clock)
        assert "k1" == cache.key("k1").key_id
        for kid in ("x", "y", "z"):
            with pytest.raises(SaladAuthError) as refused:
                cache.key(kid)
            assert 403 == refused.value.status
        assert 1 == server.requests
        clock.now = 31.0
        with pytest.raises(SaladAuthError):
            cache.key("x")
        assert 2 == server.requests


def test_cached_keys_outlive_a_failing_jwks() -> None:
    """After the TTL, a failing refresh keeps the cached keys in use."""
    clock = Clock()
    with jwks_server() as server:
        server.keys = [_jwk(KEY, "k1")]
        cache = JWKSCache(server.url, ttl=60.0, min_refresh=5.0, clock=clock)
        cache.key("k1")
        server.status = 500
        clock.now = 61.0
        assert "k1" == cache.key("k1").key_id
        assert 2 == server.requests
        server.status = 200
        server.keys = [_jwk(OTHER_KEY, "k2")]
        clock.now = 67.0
        assert "k2" == cache.key("k2").key_id


def test_no_jwks_yet_is_503() -> None:
    """Before any JWKS could be fetched, the answer is 503, not 403."""
    cache = JWKSCache(_dead_url(), timeout=1.0)
    with pytest.raises(SaladAuthError) as unavailable:
        cache.key("k1")
    assert 503 == unavailable.value.status
