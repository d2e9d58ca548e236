"""
``kelpie worker``: run the worker agent in the foreground.
"""

from __future__ import annotations

import argparse

from kelpie_sdk.cli._common import Context, add_api_options

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``worker``.
    """
    from kelpie_sdk.worker._main import add_arguments

    parser = subparsers.add_parser(
        "worker",
        help="run the worker agent: claim jobs, run them, report",
        description=(
            "Run the Kelpie worker agent in the foreground. Settings come from "
            "the environment (the original worker's names); flags override them. "
            "SIGUSR1 makes it stop claiming, finish its running jobs and exit. "
            "Exit codes: 0 stopped by SIGTERM/SIGINT, drained, or moved to another "
            "node through SaladCloud's IMDS, 2 bad settings, 3 MAX_JOB_FAILURES "
            "reached, 4 MAX_TIME_WITH_NO_WORK_S reached (3 and 4 without IMDS). "
            "See docs/worker.md."
        ),
    )
    add_api_options(parser, suppress_defaults=True)
    add_arguments(parser, api_options=False)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace, ctx: Context) -> int:
    from kelpie_sdk.worker._main import run_worker

    return run_worker(args)
