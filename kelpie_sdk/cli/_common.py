"""
What every command group shares: the context, API options, output helpers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import attrs
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kelpie_sdk.client import Client
from kelpie_sdk.models import Job, format_progress

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Context",
    "Handler",
    "UsageError",
    "add_api_options",
    "format_progress",
    "format_time",
    "jobs_table",
    "leaf_parser",
    "non_negative_int",
    "print_json",
    "resolve_job_id",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """
    The arguments make no sense together (exit code 2).
    """


@attrs.define
class Context:
    """
    What a command handler gets besides its arguments.

    Attributes:
        console: Where output goes (stdout).
        args: The parsed arguments.
    """

    console: Console
    args: argparse.Namespace
    _client: Client | None = None

    def client(self) -> Client:
        """
        The API client, made on first use from ``--api-url``/``--api-key`` and
        the environment.
        """
        if self._client is None:
            self._client = Client(
                getattr(self.args, "api_url", None),
                getattr(self.args, "api_key", None),
            )
        return self._client

    def close(self) -> None:
        """
        Close the client, if one was made.
        """
        if self._client is not None:
            self._client.close()
            self._client = None


#: A command handler: returns the exit code.
Handler: TypeAlias = Callable[[argparse.Namespace, Context], int]


def add_api_options(
    parser: argparse.ArgumentParser, *, suppress_defaults: bool
) -> None:
    """
    Add ``--api-url`` and ``--api-key``.

    The top-level parser has them with ``None`` defaults; leaf parsers repeat
    them with suppressed defaults, so they may come before or after the
    subcommand without one position resetting the other.
    """
    default = argparse.SUPPRESS if suppress_defaults else None
    parser.add_argument(
        "--api-url",
        metavar="URL",
        default=default,
        help="the Kelpie API (default: $KELPIE_API_URL or http://127.0.0.1:8787)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=default,
        help="the API key (default: $KELPIE_API_KEY)",
    )


def leaf_parser(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    """
    A subcommand's parser: its help as the description, the API options and
    ``--json``.
    """
    parser = actions.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + "."
    )
    add_api_options(parser, suppress_defaults=True)
    parser.add_argument(
        "--json", action="store_true", help="print JSON on stdout and nothing else"
    )
    return parser


def non_negative_int(text: str) -> int:
    """
    An argparse ``type``: an integer, 0 or more.
    """
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


#: The length of a full job id (a UUID): such an id is used as it is.
FULL_ID_LENGTH = 36
#: How many candidates an ambiguous prefix error lists.
_CANDIDATES = 10


def resolve_job_id(client: Client, text: str) -> str:
    """
    The one job of the caller whose id starts with ``text`` (a full id is
    taken as it is, without a request).

    Raises:
        ValueError: No job id starts with ``text``, or several do (the error
            lists them).
    """
    text = text.strip()
    if not text:
        raise ValueError("a job id must not be empty")
    if len(text) >= FULL_ID_LENGTH:
        return text
    matches = [
        job.id
        for job in itertools.islice(
            client.list_jobs(id_prefix=text, page_size=_CANDIDATES + 1),
            _CANDIDATES + 1,
        )
    ]
    if text in matches:
        return text
    if not matches:
        raise ValueError(
            f"no job id starts with {text!r}: check it with 'kelpie jobs list'"
        )
    if len(matches) > 1:
        shown = ", ".join(matches[:_CANDIDATES])
        more = " ..." if len(matches) > _CANDIDATES else ""
        raise ValueError(
            f"{text!r} is the start of several job ids ({shown}{more}): "
            "give more characters"
        )
    return matches[0]


def print_json(console: Console, data: Any) -> None:
    """
    Print stable JSON (indented, keys in wire order) and nothing else.
    """
    console.out(json.dumps(data, indent=2, ensure_ascii=False), highlight=False)


def format_time(value: dt.datetime | None, *, seconds: bool = True) -> str:
    """
    A timestamp as ``YYYY-MM-DD HH:MM[:SS]`` UTC, or empty.
    """
    if value is None:
        return ""
    pattern = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return value.astimezone(dt.UTC).strftime(pattern)


_STATUS_STYLES = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "canceled": "magenta",
    "failed": "red",
}


#: A column's cost beyond its text: padding on both sides and a separator.
_COLUMN_GAP = 3
#: The narrowest progress column worth showing (it is cut with an ellipsis).
_MIN_PROGRESS = 12


def jobs_table(
    jobs: Iterable[Job], *, title: str | None = None, width: int | None = None
) -> Table:
    """
    A table of jobs: id, status, group, created, failures, heartbeats, progress.

    The id and the status are always shown whole. When ``width`` (the
    console's) is too small for everything, the other columns are left out,
    least useful first: heartbeats, container group, created, failures; the
    progress column takes what is left, cut with an ellipsis.
    """
    rows = [
        {
            "ID": Text(job.id),
            "Status": Text(job.status.value, style=_STATUS_STYLES[job.status.value]),
            "Container group": Text(job.container_group_id),
            "Created": Text(format_time(job.created, seconds=False)),
            "Failures": Text(f"{job.num_failures}/{job.max_failures}"),
            "Heartbeats": Text(str(job.num_heartbeats)),
            "Progress": Text(format_progress(job.progress)),
        }
        for job in jobs
    ]

    def natural(name: str) -> int:
        return max([len(name), *(r[name].cell_len for r in rows)])

    shown = ["ID", "Status"]
    progress_width: int | None = None
    if width is not None:
        used = sum(natural(n) + _COLUMN_GAP for n in shown)
        progress = (
            min(natural("Progress"), 24) if any(r["Progress"] for r in rows) else 0
        )
        reserve = progress + _COLUMN_GAP if progress else 0
        for name in ("Failures", "Created", "Container group", "Heartbeats"):
            cost = natural(name) + _COLUMN_GAP
            if used + cost + reserve <= width:
                shown.append(name)
                used += cost
        room = width - used - _COLUMN_GAP
        if progress and room >= _MIN_PROGRESS:
            shown.append("Progress")
            progress_width = room
    else:
        shown += ["Container group", "Created", "Failures", "Heartbeats", "Progress"]
    order = [
        "ID",
        "Status",
        "Container group",
        "Created",
        "Failures",
        "Heartbeats",
        "Progress",
    ]
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True
    )
    for name in order:
        if name not in shown:
            continue
        if name == "Progress":
            table.add_column(
                name, no_wrap=True, overflow="ellipsis", max_width=progress_width
            )
        elif name == "Container group" and width is None:
            table.add_column(name, overflow="fold")
        else:
            table.add_column(
                name,
                no_wrap=True,
                min_width=natural(name),
                justify="right" if name in ("Failures", "Heartbeats") else "left",
            )
    for row in rows:
        table.add_row(*(row[name] for name in order if name in shown))
    return table
