"""
The Kelpie API server: ``kelpie server``.

``create_app`` builds the Litestar application; ``open_store`` connects to a
database (SQLite by default) and migrates it; ``serve`` runs it under uvicorn.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server._access import AccessLog
from kelpie_sdk.server._app import HTTPProblem, create_app, validate_submission
from kelpie_sdk.server._autoscale import AutoscaleSettings
from kelpie_sdk.server._db import (
    ADMIN_ID,
    check_schema,
    make_engine,
    normalise_url,
    upgrade,
)
from kelpie_sdk.server._logs import DEFAULT_LOG_LIMIT
from kelpie_sdk.server._salad_auth import SaladAuthSettings
from kelpie_sdk.server._store import Principal, ReputationPolicy, Store
from kelpie_sdk.server._webhooks import Dispatcher, WebhookSettings

__all__ = [
    "ADMIN_ID",
    "DEFAULT_PORT",
    "AutoscaleSettings",
    "HTTPProblem",
    "Principal",
    "ReputationPolicy",
    "SaladAuthSettings",
    "Store",
    "WebhookSettings",
    "create_app",
    "default_database_url",
    "open_store",
    "serve",
    "validate_submission",
]

#: The port ``kelpie server`` listens on unless told otherwise.
DEFAULT_PORT = 8787


def default_database_url() -> str:
    """
    A SQLite file under the user's data directory.
    """
    from platformdirs import user_data_dir

    path = pathlib.Path(user_data_dir("kelpie", appauthor=False)) / "kelpie.db"
    return f"sqlite:///{path}"


def open_store(
    database_url: str | None = None,
    *,
    clock: Callable[[], float] = time.time,
    migrate: bool = True,
    policy: ReputationPolicy | None = None,
) -> Store:
    """
    Connect to a database, create or upgrade its schema, and return the store.

    Args:
        database_url: A SQLite or PostgreSQL URL (``postgresql://`` and
            ``postgres://`` mean psycopg 3); default: a SQLite file under the
            user's data directory.
        clock: The store's clock (seconds since the epoch).
        migrate: Apply pending migrations; if false, refuse a schema that is
            not current instead.
        policy: Quarantine and placement settings; default: from the
            ``KELPIE_QUARANTINE_*``, ``KELPIE_FLAKY_*``,
            ``KELPIE_PLACEMENT_WINDOW`` and ``KELPIE_LIVE_SECONDS`` environment
            variables, else the defaults.

    Raises:
        ConfigError: The URL is malformed or names an unsupported database, or
            the schema is newer than this version knows (or not current, with
            ``migrate=False``).
    """
    if policy is None:
        policy = ReputationPolicy.from_env(os.environ)
    url = normalise_url(database_url or default_database_url())
    try:
        backend = sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r} ({exc})") from exc
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"the {backend} database is not supported; use a sqlite:/// or "
            "postgresql:// URL"
        )
    engine = make_engine(url)
    try:
        if migrate:
            upgrade(engine)
        else:
            check_schema(engine)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise ConfigError(
            f"cannot reach the database at {sa.make_url(url)!r}: "
            f"{str(exc.orig).strip().splitlines()[0]}"
        ) from exc
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, clock=clock, policy=policy)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    database_url: str | None = None,
    admin_key: str | None = None,
    log_level: str = "info",
    access_log: bool = False,
    autoscale: AutoscaleSettings | None = None,
    migrate: bool = True,
    metrics_public: bool = False,
    log_limit: int = DEFAULT_LOG_LIMIT,
    secure_cookie: bool | None = None,
    salad_auth: SaladAuthSettings | None = None,
    webhooks: WebhookSettings | None = None,
    key_rate_limit: int | None = None,
) -> None:
    """
    Run the server in the foreground until interrupted.

    Args:
        host: The address to bind.
        port: The port to bind (0 picks a free one).
        database_url: A SQLAlchemy URL; default: a SQLite file under the user's
            data directory.
        admin_key: The admin's API key; default ``KELPIE_ADMIN_KEY``, else one
            is generated at first start and printed once.
        log_level: The level of uvicorn's and the server's log messages.
        access_log: Log each request with its status and duration.
        autoscale: Run the autoscaler in this process (when it wins the
            leadership among the servers sharing the database); ``None``: off.
        migrate: Apply pending migrations at start; if false, refuse to start
            unless the schema is current (``kelpie db upgrade`` applies them).
        metrics_public: Serve ``GET /metrics`` without a key (default: only
            with the admin's key).
        log_limit: Bytes of job output kept per attempt (the oldest lines go).
        secure_cookie: Mark the web dashboard's session cookie ``Secure``;
            ``None``: when the request came over https.
        salad_auth: Which SaladCloud workload tokens and API keys to accept;
            ``None``: none.
        webhooks: How webhooks are checked and sent (the allowlist, the key
            echo); default: ``KELPIE_WEBHOOK_ALLOW`` and the defaults. The
            dispatcher runs in this process (every replica runs one).
        key_rate_limit: Requests a minute allowed per API key, per server
            process (429 beyond); ``None``: no limit.

    Raises:
        ConfigError: The admin key is shorter than 32 characters, or the
            database cannot be used.
    """
    import uvicorn

    from kelpie_sdk.server._salad_auth import SaladAuth

    admin_key = admin_key or os.environ.get("KELPIE_ADMIN_KEY") or None
    store = open_store(database_url, migrate=migrate)
    if webhooks is None:
        webhooks = WebhookSettings.from_env(os.environ)
    try:
        generated = store.ensure_admin(admin_key)
    except BaseException:
        store.close()
        raise
    if generated:
        print(  # noqa: T201 - shown once, by design
            f"Generated the admin API key (shown only once): {generated}",
            file=sys.stderr,
        )
    app: Any = create_app(
        store,
        metrics_public=metrics_public,
        log_limit=log_limit,
        secure_cookie=secure_cookie,
        salad_auth=SaladAuth(salad_auth)
        if salad_auth is not None and salad_auth.enabled
        else None,
        webhooks=webhooks,
        key_rate_limit=key_rate_limit,
    )
    dispatcher = Dispatcher(store.engine, webhooks)
    dispatcher.start()
    if access_log:
        app = AccessLog(app)
    log_config = _log_config(log_level)
    scaler = None
    if autoscale is not None:
        import logging.config

        from kelpie_sdk.server._autoscale import Autoscaler

        # The autoscaler logs before uvicorn configures logging.
        logging.config.dictConfig(log_config)
        scaler = Autoscaler(
            store,
            autoscale.make_provider(),
            interval=autoscale.interval,
            window=autoscale.window,
        )
        scaler.start()
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            log_config=log_config,
            access_log=False,
        )
    finally:
        if scaler is not None:
            scaler.stop()
        dispatcher.stop()


def _log_config(level: str) -> dict[str, Any]:
    """
    uvicorn's logging configuration, plus the server's own loggers (access
    lines, ignored stale reports, autoscaler decisions) on the same handler.
    """
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["kelpie_sdk"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
