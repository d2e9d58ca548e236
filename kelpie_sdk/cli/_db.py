"""
``kelpie db``: manage the API server's database schema.
"""

from __future__ import annotations

import argparse

from kelpie_sdk.cli._common import EXIT_OK, Context

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``db upgrade``.
    """
    parser = subparsers.add_parser(
        "db",
        help="manage the API server's database schema",
        description="Manage the API server's database schema.",
    )
    commands = parser.add_subparsers(dest="db_command", metavar="COMMAND")
    commands.required = True
    upgrade = commands.add_parser(
        "upgrade",
        help="apply the schema migrations this version knows",
        description=(
            "Create or upgrade the database schema to this version's head. "
            "Safe to run again, and from several machines at once; refuses a "
            "schema newer than this version knows."
        ),
    )
    upgrade.add_argument(
        "--database",
        metavar="URL",
        default=None,
        help=(
            "database URL, sqlite:///PATH or postgresql://... (default: the "
            "SQLite file under the user's data directory)"
        ),
    )
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace, ctx: Context) -> int:
    from kelpie_sdk.server import default_database_url, open_store
    from kelpie_sdk.server._db import head_revision

    database = args.database or default_database_url()
    open_store(database).close()
    ctx.console.print(
        f"Database schema is at revision {head_revision()} (the newest known).",
        highlight=False,
    )
    return EXIT_OK
