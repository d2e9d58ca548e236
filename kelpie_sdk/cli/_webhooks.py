"""
``kelpie webhooks``: the tenant's webhook signing secret.
"""

from __future__ import annotations

import argparse

from rich.table import Table
from rich.text import Text

from kelpie_sdk.cli._common import EXIT_OK, Context, leaf_parser, print_json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``webhooks`` group.
    """
    hooks = subparsers.add_parser(
        "webhooks",
        help="the secret that signs your jobs' webhooks",
        description=(
            "Webhooks are signed per Standard Webhooks with a secret of your "
            "own; receivers check them with kelpie_sdk.webhooks.verify."
        ),
    )
    actions = hooks.add_subparsers(dest="webhooks_command", metavar="ACTION")
    actions.required = True
    secret = leaf_parser(
        actions, "secret", "show your webhook signing secret (--rotate: replace it)"
    )
    secret.add_argument(
        "--rotate",
        action="store_true",
        help=("issue a new secret; webhooks are signed with the old one too for a day"),
    )
    secret.set_defaults(handler=_secret)


def _secret(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.client().webhook_secret(rotate=args.rotate)
    if args.json:
        print_json(ctx.console, result.to_json())
        return EXIT_OK
    if result.previous is None:
        ctx.console.out(result.secret, highlight=False)
        return EXIT_OK
    table = Table(show_header=False, box=None)
    table.add_column("Field", style="bold")
    table.add_column("Value", overflow="fold")
    table.add_row("secret", Text(result.secret))
    table.add_row("previous", Text(f"{result.previous} (still signs for a day)"))
    ctx.console.print(table)
    return EXIT_OK
