"""
``kelpie users`` (who am I, users and API keys), ``kelpie keys`` (make, list
and revoke API keys) and ``kelpie rules`` (scaling rules): what was curl-only
before.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from kelpie_sdk.cli._common import (
    EXIT_OK,
    Context,
    UsageError,
    format_time,
    leaf_parser,
    non_negative_int,
    print_json,
)
from kelpie_sdk.models import ApiKey, ScalingRule, User

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``users``, ``keys`` and ``rules`` groups.
    """
    _register_users(subparsers)
    _register_keys(subparsers)
    _register_rules(subparsers)


# -- users ---------------------------------------------------------------------


def _register_users(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    users = subparsers.add_parser(
        "users",
        help="who you are; users and API keys (admin)",
        description="Users and API keys. Creating either needs the admin key.",
    )
    actions = users.add_subparsers(dest="users_command", metavar="ACTION")
    actions.required = True

    me = leaf_parser(actions, "me", "show the user of these credentials")
    me.set_defaults(handler=_me)

    create = leaf_parser(actions, "create", "create a user (admin)")
    create.add_argument("username", metavar="USERNAME")
    create.add_argument(
        "--token",
        action="store_true",
        help="also issue an API key for the new user",
    )
    _token_options(create)
    create.set_defaults(handler=_create_user)

    token = leaf_parser(
        actions,
        "token",
        "issue an API key for a user (admin); prints the key alone",
    )
    token.add_argument("user_id", metavar="USER_ID")
    _token_options(token)
    token.set_defaults(handler=_token)


def _token_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--org-name", default="", metavar="NAME", help="the key's organization"
    )
    parser.add_argument(
        "--project-name", default="", metavar="NAME", help="the key's project"
    )


def _user_table(user: User, token: str | None = None) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column("Field", style="bold")
    table.add_column("Value", overflow="fold")
    table.add_row("id", Text(user.id))
    table.add_row("username", Text(user.username))
    table.add_row("created", Text(format_time(user.created)))
    if token is not None:
        table.add_row("api key", Text(token))
    return table


def _me(args: argparse.Namespace, ctx: Context) -> int:
    user = ctx.client().me()
    if args.json:
        print_json(ctx.console, user.to_json())
    else:
        ctx.console.print(_user_table(user))
    return EXIT_OK


def _create_user(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    user = client.create_user(args.username)
    token = None
    if args.token:
        token = client.create_token(
            user.id, org_name=args.org_name, project_name=args.project_name
        )
    if args.json:
        data = user.to_json()
        if token is not None:
            data["token"] = token
        print_json(ctx.console, data)
    else:
        ctx.console.print(_user_table(user, token))
    return EXIT_OK


def _token(args: argparse.Namespace, ctx: Context) -> int:
    token = ctx.client().create_token(
        args.user_id, org_name=args.org_name, project_name=args.project_name
    )
    if args.json:
        print_json(ctx.console, {"token": token})
    else:
        ctx.console.out(token, highlight=False)
    return EXIT_OK


# -- API keys ------------------------------------------------------------------


def _register_keys(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="make, list and revoke API keys",
        description=(
            "API keys. A user key makes user and worker keys of its own user; "
            "only the admin makes admin keys or keys of another user."
        ),
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.required = True

    create = leaf_parser(
        actions,
        "create",
        "make an API key; prints the key alone (it is shown only once)",
    )
    create.add_argument(
        "--role",
        choices=["user", "worker", "admin"],
        default="user",
        help="user: submit, list, cancel; worker: only run jobs; admin: "
        "everything (default: user)",
    )
    create.add_argument(
        "--container-group",
        dest="container_groups",
        action="append",
        metavar="ID",
        help="a worker key may only claim from this container group "
        "(repeatable; default: all)",
    )
    create.add_argument(
        "--expires-in",
        type=non_negative_int,
        metavar="SECONDS",
        help="the key stops working after this many seconds (default: never)",
    )
    create.add_argument(
        "--user", dest="user_id", metavar="USER_ID", help="whose key (admin only)"
    )
    create.set_defaults(handler=_create_key)

    listing = leaf_parser(actions, "list", "list your live API keys, not their secrets")
    listing.add_argument(
        "--all-users", action="store_true", help="every user's keys (admin only)"
    )
    listing.set_defaults(handler=_list_keys)

    revoke = leaf_parser(actions, "revoke", "revoke an API key at once, by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=_revoke_key)


def _create_key(args: argparse.Namespace, ctx: Context) -> int:
    made = ctx.client().create_key(
        args.role,
        container_groups=args.container_groups,
        expires_in=args.expires_in,
        user_id=args.user_id,
    )
    if args.json:
        print_json(ctx.console, made.to_json())
    else:
        ctx.console.out(made.key or "", highlight=False)
    return EXIT_OK


def _keys_table(keys: Sequence[ApiKey]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("Id", no_wrap=True)
    table.add_column("Role", no_wrap=True)
    table.add_column("User", overflow="fold")
    table.add_column("Container groups", overflow="fold")
    table.add_column("Created", no_wrap=True)
    table.add_column("Expires", no_wrap=True)
    table.add_column("Last used", no_wrap=True)
    for key in keys:
        table.add_row(
            Text(key.id),
            key.role,
            Text(key.user_id),
            Text(", ".join(key.container_groups or ()) or "all"),
            format_time(key.created, seconds=False),
            format_time(key.expires, seconds=False) or "never",
            format_time(key.last_used, seconds=False) or "never",
        )
    return table


def _list_keys(args: argparse.Namespace, ctx: Context) -> int:
    keys = ctx.client().list_keys(all_users=args.all_users)
    if args.json:
        print_json(ctx.console, [k.to_json() for k in keys])
    elif keys:
        ctx.console.print(_keys_table(keys))
    else:
        ctx.console.print("No API keys.")
    return EXIT_OK


def _revoke_key(args: argparse.Namespace, ctx: Context) -> int:
    ctx.client().revoke_key(args.key_id)
    if args.json:
        print_json(ctx.console, {"revoked": args.key_id})
    else:
        ctx.console.print(Text(f"Revoked the API key {args.key_id}"))
    return EXIT_OK


# -- scaling rules -------------------------------------------------------------


def _register_rules(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    rules = subparsers.add_parser(
        "rules",
        help="scaling rules of container groups",
        description="Scaling rules: one per container group.",
    )
    actions = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    actions.required = True

    listing = leaf_parser(actions, "list", "list your scaling rules")
    listing.set_defaults(handler=_list_rules)

    create = leaf_parser(
        actions, "create", "create the scaling rule of a container group"
    )
    create.add_argument("container_group_id", metavar="CONTAINER_GROUP_ID")
    create.add_argument(
        "--min-replicas", type=non_negative_int, required=True, metavar="N"
    )
    create.add_argument(
        "--max-replicas", type=non_negative_int, required=True, metavar="N"
    )
    create.add_argument(
        "--idle-threshold-seconds",
        type=non_negative_int,
        required=True,
        metavar="SECONDS",
    )
    create.add_argument("--container-group-name", metavar="NAME")
    create.set_defaults(handler=_create_rule)

    get = leaf_parser(actions, "get", "show the scaling rule of a container group")
    get.add_argument("container_group_id", metavar="CONTAINER_GROUP_ID")
    get.set_defaults(handler=_get_rule)

    update = leaf_parser(actions, "update", "change limits of a scaling rule")
    update.add_argument("container_group_id", metavar="CONTAINER_GROUP_ID")
    update.add_argument("--min-replicas", type=non_negative_int, metavar="N")
    update.add_argument("--max-replicas", type=non_negative_int, metavar="N")
    update.add_argument(
        "--idle-threshold-seconds", type=non_negative_int, metavar="SECONDS"
    )
    update.set_defaults(handler=_update_rule)

    delete = leaf_parser(
        actions, "delete", "delete the scaling rule of a container group"
    )
    delete.add_argument("container_group_id", metavar="CONTAINER_GROUP_ID")
    delete.set_defaults(handler=_delete_rule)


def _rules_table(rules: Sequence[ScalingRule], width: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("Container group", no_wrap=width >= 100, overflow="fold")
    table.add_column("Min", justify="right", no_wrap=True)
    table.add_column("Max", justify="right", no_wrap=True)
    table.add_column("Idle (s)", justify="right", no_wrap=True)
    table.add_column("Updated", no_wrap=True)
    for rule in rules:
        table.add_row(
            Text(rule.container_group_id),
            str(rule.min_replicas),
            str(rule.max_replicas),
            str(rule.idle_threshold_seconds),
            format_time(rule.updated, seconds=False),
        )
    return table


def _show_rules(ctx: Context, rules: Sequence[ScalingRule], *, one: bool) -> int:
    if ctx.args.json:
        print_json(
            ctx.console, rules[0].to_json() if one else [r.to_json() for r in rules]
        )
    elif rules:
        ctx.console.print(_rules_table(rules, ctx.console.width))
    else:
        ctx.console.print("No scaling rules.")
    return EXIT_OK


def _list_rules(args: argparse.Namespace, ctx: Context) -> int:
    return _show_rules(ctx, ctx.client().list_scaling_rules(), one=False)


def _create_rule(args: argparse.Namespace, ctx: Context) -> int:
    rule = ctx.client().create_scaling_rule(
        container_group_id=args.container_group_id,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        idle_threshold_seconds=args.idle_threshold_seconds,
        container_group_name=args.container_group_name,
    )
    return _show_rules(ctx, [rule], one=True)


def _get_rule(args: argparse.Namespace, ctx: Context) -> int:
    rule = ctx.client().get_scaling_rule(args.container_group_id)
    return _show_rules(ctx, [rule], one=True)


def _update_rule(args: argparse.Namespace, ctx: Context) -> int:
    limits = (args.min_replicas, args.max_replicas, args.idle_threshold_seconds)
    if all(v is None for v in limits):
        raise UsageError(
            "nothing to change: give --min-replicas, --max-replicas or "
            "--idle-threshold-seconds"
        )
    rule = ctx.client().update_scaling_rule(
        args.container_group_id,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        idle_threshold_seconds=args.idle_threshold_seconds,
    )
    return _show_rules(ctx, [rule], one=True)


def _delete_rule(args: argparse.Namespace, ctx: Context) -> int:
    ctx.client().delete_scaling_rule(args.container_group_id)
    if args.json:
        print_json(ctx.console, {"deleted": args.container_group_id})
    else:
        ctx.console.print(
            Text(f"Deleted the scaling rule of {args.container_group_id}")
        )
    return EXIT_OK
