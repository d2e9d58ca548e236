"""
``python -m kelpie_sdk.server``: the same as ``kelpie server``.
"""

from __future__ import annotations

import argparse

from kelpie_sdk.server import DEFAULT_PORT, serve
from kelpie_sdk.server._autoscale import add_autoscale_arguments, autoscale_settings


def main() -> None:
    """
    Parse the command line and serve.
    """
    parser = argparse.ArgumentParser(prog="python -m kelpie_sdk.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--database", default=None, help="a SQLAlchemy URL")
    add_autoscale_arguments(parser)
    args = parser.parse_args()
    serve(
        host=args.host,
        port=args.port,
        database_url=args.database,
        autoscale=autoscale_settings(args),
    )


if __name__ == "__main__":
    main()
