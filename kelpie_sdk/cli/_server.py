"""
``kelpie server``: run the Kelpie API server.
"""

from __future__ import annotations

import argparse
import os

from kelpie_sdk.cli._common import EXIT_OK, Context

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``server``.
    """
    from kelpie_sdk.server import DEFAULT_PORT
    from kelpie_sdk.server._autoscale import add_autoscale_arguments
    from kelpie_sdk.server._salad_auth import add_salad_auth_arguments

    parser = subparsers.add_parser(
        "server",
        help="run the Kelpie API server (SQLite by default)",
        description=(
            "Run the Kelpie API server. The admin's API key comes from "
            "KELPIE_ADMIN_KEY, or is generated at first start and printed once."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to bind (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        default=None,
        help=(
            "database URL: sqlite:///PATH or postgresql://USER@HOST/DB "
            "(default: a SQLite file under the user's data directory)"
        ),
    )
    parser.add_argument(
        "--no-upgrade",
        dest="migrate",
        action="store_false",
        help=(
            "do not migrate the schema at start; refuse to start unless it is "
            "current (apply migrations with `kelpie db upgrade`)"
        ),
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log each request with its status and duration (default: off)",
    )
    add_autoscale_arguments(parser)
    add_salad_auth_arguments(parser)
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help=(
            "serve GET /metrics without a key; it names every user and container "
            "group (default: the admin's key is required)"
        ),
    )
    parser.add_argument(
        "--log-limit",
        metavar="BYTES",
        type=_log_limit,
        default=None,
        help=(
            "bytes of job output kept per attempt, the oldest lines going first; "
            "accepts K/M/G suffixes (default: 1M)"
        ),
    )
    parser.add_argument(
        "--secure-cookie",
        action="store_true",
        default=None,
        help=(
            "always mark the web dashboard's session cookie Secure (default: "
            "when the request came over https, X-Forwarded-Proto from a proxy "
            "on this host included)"
        ),
    )
    parser.add_argument(
        "--webhook-allow",
        metavar="CIDR",
        action="append",
        default=[],
        help=(
            "let webhooks go to addresses in this network, which are refused "
            "otherwise (loopback, private, link-local ...); repeatable; also "
            "KELPIE_WEBHOOK_ALLOW, comma-separated"
        ),
    )
    parser.add_argument(
        "--webhook-echo-key",
        action="store_true",
        help=(
            "send the original's x-kelpie-key header on webhooks: the API key of "
            "the request that caused the event (default: off; it hands the "
            "receiver a usable key)"
        ),
    )
    parser.add_argument(
        "--key-rate-limit",
        metavar="N",
        type=_rate,
        default=None,
        help=(
            "answer 429 to an API key that makes more than N requests a minute, "
            "counted per server process (default: no limit)"
        ),
    )
    parser.set_defaults(handler=_serve)


def _rate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of requests a minute, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _log_limit(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes such as 1048576 or 1M, got {text!r}"
        ) from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1K, got {text!r}")
    return value


def _serve(args: argparse.Namespace, ctx: Context) -> int:
    from kelpie_sdk.server import default_database_url, serve
    from kelpie_sdk.server._autoscale import autoscale_settings
    from kelpie_sdk.server._logs import DEFAULT_LOG_LIMIT
    from kelpie_sdk.server._salad_auth import salad_auth_settings
    from kelpie_sdk.server._store import check_admin_key
    from kelpie_sdk.server._webhooks import WebhookSettings

    # Before the banner: a refused key must not look like a started server.
    check_admin_key(os.environ.get("KELPIE_ADMIN_KEY") or None)
    autoscale = autoscale_settings(args)
    salad_auth = salad_auth_settings(args)
    webhooks = WebhookSettings.from_env(
        os.environ, args.webhook_allow, echo_key=args.webhook_echo_key
    )
    database = args.database or default_database_url()
    ctx.console.print(
        f"Kelpie API on http://{args.host}:{args.port}  "
        f"(database: {_without_password(database)}; docs: /docs)",
        highlight=False,
    )
    serve(
        host=args.host,
        port=args.port,
        database_url=database,
        log_level=args.log_level,
        access_log=args.access_log,
        autoscale=autoscale,
        migrate=args.migrate,
        metrics_public=args.metrics_public,
        log_limit=args.log_limit or DEFAULT_LOG_LIMIT,
        secure_cookie=args.secure_cookie,
        salad_auth=salad_auth,
        webhooks=webhooks,
        key_rate_limit=args.key_rate_limit,
    )
    return EXIT_OK


def _without_password(url: str) -> str:
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url
