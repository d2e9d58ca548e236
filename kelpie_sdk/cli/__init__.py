"""
The ``kelpie`` command line.

Each group of subcommands lives in its own module with a
``register(subparsers) -> None`` function that adds its parsers and sets
``handler`` (a ``Handler``: ``(args, ctx) -> exit code``) on each leaf. To add a
group, write such a module and list its ``register`` in ``_REGISTRARS``.

Exit codes: 0 success; 1 a ``KelpieError`` (or bad input such as an unreadable
file), reported as one ``Error: ...`` line on stderr (with a traceback only under
``--debug``); 2 a usage error; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console

from kelpie_sdk.cli import (
    _admin,
    _chaos,
    _db,
    _jobs,
    _machines,
    _server,
    _up,
    _webhooks,
    _worker,
)
from kelpie_sdk.cli._common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Context,
    UsageError,
    add_api_options,
)
from kelpie_sdk.errors import KelpieError

__all__ = ["EXIT_OK", "build_parser", "main", "run"]

#: Every command group's ``register(subparsers)``, in help order.
_REGISTRARS: list[
    Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
] = [
    _jobs.register,
    _machines.register,
    _admin.register,
    _webhooks.register,
    _server.register,
    _db.register,
    _worker.register,
    _up.register,
    _chaos.register,
]


def build_parser() -> argparse.ArgumentParser:
    """
    The full argument parser, with every registered command group.
    """
    parser = argparse.ArgumentParser(
        prog="kelpie",
        description="Run long jobs to completion on interruptible machines.",
    )
    add_api_options(parser, suppress_defaults=False)
    parser.add_argument("--version", action="version", version=f"kelpie {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr (-v: retries, -vv: every request)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kelpie-sdk")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


_LOG_HANDLER = "kelpie-cli"


def _setup_logging(verbosity: int) -> None:
    if verbosity <= 0:
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False)
    handler.set_name(_LOG_HANDLER)
    logger = logging.getLogger("kelpie_sdk")
    for old in [h for h in logger.handlers if h.get_name() == _LOG_HANDLER]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """
    Run the ``kelpie`` command.

    Args:
        argv: The arguments, without the program name (default: ``sys.argv[1:]``).
        console: Where output goes (default: a console on stdout). Errors go to
            stderr.

    Returns:
        The exit code.
    """
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is a job's command line (`kelpie submit
    # ... -- python script.py`); argparse would take its first word for FILE.
    after: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, after = words[:cut], words[cut + 1 :]
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if after is not None and not getattr(args, "takes_command", False):
        parser.print_usage(sys.stderr)
        print(
            f"Error: kelpie {_command_name(args)} takes no arguments after --",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args.command_line = after
    ctx = Context(console=console or Console(), args=args)
    _setup_logging(args.verbose)
    try:
        code: int = args.handler(args, ctx)
        return code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KelpieError, ValueError, OSError) as exc:
        # ValueError: bad values caught client-side (incl. JSON decode errors);
        # OSError: a job file that cannot be read.
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        message = (
            str(exc)
            if not isinstance(exc, json.JSONDecodeError)
            else (f"invalid JSON: {exc}")
        )
        print(f"Error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        ctx.close()


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "jobs_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def run() -> NoReturn:
    """
    The console script's entry point: ``sys.exit(main())``.
    """
    sys.exit(main())
