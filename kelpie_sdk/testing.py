"""
Test helpers: the real Kelpie API server on 127.0.0.1, in a background thread.

Use it in your own test suites::

    from kelpie_sdk.testing import run_server

    with run_server() as server:
        client = Client(server.url, server.admin_key)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import attrs

from kelpie_sdk.server import (
    ReputationPolicy,
    SaladAuthSettings,
    Store,
    WebhookSettings,
    create_app,
    open_store,
)
from kelpie_sdk.server._logs import DEFAULT_LOG_LIMIT
from kelpie_sdk.server._salad_auth import SaladAuth
from kelpie_sdk.server._webhooks import Dispatcher

__all__ = ["ServerHandle", "run_server"]


@attrs.frozen
class ServerHandle:
    """
    A running server.

    Attributes:
        url: Its base URL, e.g. ``http://127.0.0.1:41234``.
        admin_key: The admin's API key.
        store: The server's store, for direct inspection in tests.
    """

    url: str
    admin_key: str
    store: Store


@contextlib.contextmanager
def run_server(
    *,
    database_url: str | None = None,
    admin_key: str | None = None,
    clock: Callable[[], float] = time.time,
    metrics_public: bool = False,
    log_limit: int | None = None,
    policy: ReputationPolicy | None = None,
    salad_auth: SaladAuthSettings | None = None,
    webhooks: WebhookSettings | None = None,
    webhook_dispatch: bool = True,
    auth_failure_limit: int | None = None,
    key_rate_limit: int | None = None,
) -> Iterator[ServerHandle]:
    """
    Run the API server on 127.0.0.1 on a free port until the block ends.

    Args:
        database_url: A SQLite or PostgreSQL URL (the database must exist;
            its schema is migrated); default: a fresh SQLite file in a
            temporary directory, removed afterwards.
        admin_key: The admin key; default: a random one.
        clock: The server's clock (seconds since the epoch); tests pass a fake
            clock to expire leases without sleeping.
        metrics_public: Serve ``GET /metrics`` without a key.
        log_limit: Bytes of job output kept per attempt; default 1 MiB.
        policy: Quarantine and placement settings (default: the defaults).
        salad_auth: Which SaladCloud workload tokens and API keys to accept
            (default: none).
        webhooks: Send webhooks with these settings (e.g. an allowlist for
            a receiver on loopback); default: none are sent (the outbox still
            fills), and literal forbidden addresses are refused at submission.
        webhook_dispatch: With ``webhooks``, run the dispatcher thread; false
            leaves sending to the test (``Dispatcher.run_once``).
        auth_failure_limit: Failed authentications a minute from one address
            before it is answered 429; default: no limit, since every test
            client calls from 127.0.0.1.
        key_rate_limit: Requests a minute allowed per API key; default: none.
    """
    import uvicorn

    with contextlib.ExitStack() as stack:
        if database_url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kelpie-"))
            database_url = f"sqlite:///{tmp}/kelpie.db"
        admin_key = admin_key or secrets.token_urlsafe(24)
        store = open_store(
            database_url, clock=clock, policy=policy or ReputationPolicy()
        )
        store.ensure_admin(admin_key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(
                store,
                metrics_public=metrics_public,
                log_limit=DEFAULT_LOG_LIMIT if log_limit is None else log_limit,
                salad_auth=None if salad_auth is None else SaladAuth(salad_auth),
                webhooks=webhooks,
                auth_failure_limit=auth_failure_limit,
                key_rate_limit=key_rate_limit,
            ),
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = uvicorn.Server(config)

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))

        thread = threading.Thread(target=run, name="kelpie-test-server", daemon=True)
        thread.start()
        dispatcher = None
        if webhooks is not None and webhook_dispatch:
            dispatcher = Dispatcher(store.engine, webhooks, clock=clock)
            dispatcher.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        try:
            yield ServerHandle(
                url=f"http://127.0.0.1:{port}", admin_key=admin_key, store=store
            )
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
            store.close()
