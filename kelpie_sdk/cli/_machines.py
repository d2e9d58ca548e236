"""
``kelpie machines``: each machine's record on the server, and the container
groups that have pending jobs but no live machine.
"""

from __future__ import annotations

import argparse

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kelpie_sdk.cli._common import (
    EXIT_OK,
    Context,
    add_api_options,
    format_time,
    print_json,
)
from kelpie_sdk.client import Client
from kelpie_sdk.errors import NotFoundError
from kelpie_sdk.models import MachineTable

__all__ = ["print_unserved", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``machines``.
    """
    parser = subparsers.add_parser(
        "machines",
        help="the machines' records: claims, failures, interruptions, quarantine",
        description=(
            "Show each machine that worked for you (every user's with the admin "
            "key): its container group, when it was last seen, the job it runs, "
            "its claims, completions, failures (on how many jobs), interruptions "
            "and observed uptime, and whether it is quarantined. Container groups "
            "with pending jobs but no live machine are flagged below the table."
        ),
    )
    add_api_options(parser, suppress_defaults=True)
    parser.add_argument(
        "--json", action="store_true", help="print JSON on stdout and nothing else"
    )
    parser.set_defaults(handler=_machines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def machines_table(table: MachineTable) -> Table:
    """
    The machines, most recently seen first.
    """
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    out.add_column("Machine", overflow="fold")
    out.add_column("Container group", overflow="fold")
    out.add_column("Last seen", no_wrap=True)
    out.add_column("Job", no_wrap=True)
    for name in ("Claims", "Done", "Failed (jobs)", "Interrupted", "Uptime"):
        out.add_column(name, justify="right", no_wrap=True)
    out.add_column("State", no_wrap=True)
    for m in table.machines:
        if m.quarantined_until is not None:
            state = Text(
                f"quarantined until {format_time(m.quarantined_until)}", style="red"
            )
        else:
            state = Text("live", style="green") if m.live else Text("gone", "dim")
        out.add_row(
            Text(m.machine_id),
            Text(m.container_group_id),
            format_time(m.last_seen),
            (m.job_id or "")[:8],
            str(m.claims),
            str(m.completions),
            f"{m.failures} ({m.failed_jobs})",
            str(m.interruptions),
            _duration(m.uptime_seconds),
            state,
        )
    return out


def _unserved_lines(table: MachineTable) -> list[str]:
    return [
        f"! container group {group}: {n} pending job{'s' if n != 1 else ''} "
        "and no live machine"
        for group, n in table.unserved.items()
    ]


def print_unserved(
    console: Console, client: Client, *, group: str | None = None
) -> None:
    """
    Flag the groups (or this group) with pending jobs but no live machine,
    below a listing.

    Says nothing against a server without ``GET /machines`` (the original).
    """
    try:
        table = client.machines()
    except NotFoundError:
        return
    if group is not None:
        table = MachineTable(
            machines=table.machines,
            unserved={g: n for g, n in table.unserved.items() if g == group},
        )
    for line in _unserved_lines(table):
        console.print(Text(line, style="yellow"))


def _machines(args: argparse.Namespace, ctx: Context) -> int:
    table = ctx.client().machines()
    if args.json:
        print_json(ctx.console, table.to_json())
        return EXIT_OK
    if table.machines:
        ctx.console.print(machines_table(table))
    else:
        ctx.console.print("No machines yet.")
    for line in _unserved_lines(table):
        ctx.console.print(Text(line, style="yellow"))
    return EXIT_OK
