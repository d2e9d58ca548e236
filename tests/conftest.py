"""
Shared fixtures: loopback servers (moto S3 now, the Kelpie API server as it lands).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_STRIPPED_PREFIXES = ("KELPIE_", "SALAD_")


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without KELPIE_*/SALAD_* variables from the outside."""
    for name in list(os.environ):
        if name.startswith(_STRIPPED_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """
    Moto's S3 server on 127.0.0.1 (an ephemeral port), for the whole session.

    Sets dummy AWS credentials and AWS_ENDPOINT_URL in the environment so that
    boto3 and s3fs both reach it and never look for real credentials.
    """
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_PROFILE",
        )
    }
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A new, empty bucket on the moto server; its name is returned."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


# -- the Kelpie API server -------------------------------------------------------


class FakeClock:
    """
    Real time plus an offset that tests can advance, to expire leases at once.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="session")
def server_clock() -> FakeClock:
    """The clock of the session's API server."""
    return FakeClock()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def api_server(
    request: pytest.FixtureRequest, server_clock: FakeClock
) -> Iterator[Any]:
    """
    The real API server on 127.0.0.1, for the session, once per database:
    SQLite in a temp dir, and a fresh database on the local PostgreSQL.
    """
    from kelpie_sdk.testing import run_server

    from .pg import fresh_database

    with contextlib.ExitStack() as stack:
        url = None
        if request.param == "postgresql":
            url = stack.enter_context(fresh_database())
        handle = stack.enter_context(run_server(database_url=url, clock=server_clock))
        yield handle


class Api:
    """
    Raw HTTP against the server, to test the wire format itself.
    """

    def __init__(self, url: str, key: str | None) -> None:
        import requests

        self.url = url
        self.session = requests.Session()
        if key is not None:
            self.session.headers["X-Kelpie-Key"] = key

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


@pytest.fixture
def admin_api(api_server: Any) -> Api:
    """Raw HTTP as the admin."""
    return Api(api_server.url, api_server.admin_key)


@pytest.fixture
def user_key(admin_api: Api) -> str:
    """The API key of a fresh user, so that every test has its own jobs."""
    user = admin_api.post("/users", json={"username": f"u-{uuid.uuid4().hex}"}).json()
    return str(
        admin_api.post(
            f"/users/{user['id']}/token",
            json={"org_name": "acme", "project_name": "proj"},
        ).json()["token"]
    )


@pytest.fixture
def api(api_server: Any, user_key: str) -> Api:
    """Raw HTTP as a fresh user."""
    return Api(api_server.url, user_key)


@pytest.fixture
def container_group_id() -> str:
    """A fresh queue name."""
    return str(uuid.uuid4())


@pytest.fixture
def admin_client(api_server: Any) -> Any:
    """The SDK client as the admin."""
    from kelpie_sdk.client import Client

    with Client(api_server.url, api_server.admin_key) as client:
        yield client


@pytest.fixture
def client(api_server: Any, user_key: str) -> Any:
    """The SDK client as a fresh user."""
    from kelpie_sdk.client import Client

    with Client(api_server.url, user_key) as client:
        yield client
