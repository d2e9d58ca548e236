"""
The worker's command line: flags (which override the environment) and ``main``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.worker._agent import EXIT_CONFIG, Worker
from kelpie_sdk.worker._config import WorkerConfig
from kelpie_sdk.worker._imds import IMDS_MODES

__all__ = [
    "CLAIMS_STOPPED_FILE_ENV",
    "add_arguments",
    "build_parser",
    "config_from_args",
    "configure_logging",
    "main",
    "run_worker",
]

#: flag destination -> WorkerConfig field
_FIELDS = {
    "api_url": "api_url",
    "api_key": "api_key",
    "machine_id": "machine_id",
    "container_group_id": "container_group_id",
    "max_retries": "max_retries",
    "max_job_failures": "max_job_failures",
    "max_time_with_no_work": "max_time_with_no_work_s",
    "poll_interval": "poll_interval_s",
    "state_file": "state_file",
    "input_dir": "input_dir",
    "output_dir": "output_dir",
    "checkpoint_dir": "checkpoint_dir",
    "storage_url": "storage_url",
    "kill_grace": "kill_grace_s",
    "long_poll": "long_poll_s",
    "slots": "slots",
    "slot_gpus": "slot_gpus",
    "log_level": "log_level",
    "imds": "imds_mode",
    "imds_url": "imds_url",
    "reallocate_wait": "reallocate_wait_s",
    "metrics_port": "metrics_port",
    "metrics_host": "metrics_host",
    "ship_logs": "ship_logs",
}


def add_arguments(parser: argparse.ArgumentParser, *, api_options: bool = True) -> None:
    """
    Add the worker's flags to ``parser``; each overrides its variable.

    Args:
        parser: The parser.
        api_options: Also add ``--api-url`` and ``--api-key`` (the ``kelpie``
            command adds its own).
    """
    a = parser.add_argument
    if api_options:
        a("--api-url", help="the API server (KELPIE_API_URL)")
        a("--api-key", help="a Kelpie API key (KELPIE_API_KEY)")
    a(
        "--machine-id",
        help="this machine's id (SALAD_MACHINE_ID; default: from the host name)",
    )
    a(
        "--container-group-id",
        help="the queue to serve (SALAD_CONTAINER_GROUP_ID, required)",
    )
    a("--max-retries", type=int, help="attempts per API call (MAX_RETRIES, 3)")
    a(
        "--max-job-failures",
        type=int,
        help="failures before the worker asks IMDS to reallocate the node, or "
        "exits with code 3 without IMDS (MAX_JOB_FAILURES, 5)",
    )
    a(
        "--max-time-with-no-work",
        type=float,
        metavar="SECONDS",
        help="idle time before the worker asks IMDS to reallocate the node, or "
        "exits with code 4 without IMDS; 0 = never (MAX_TIME_WITH_NO_WORK_S, 0)",
    )
    a(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="wait between empty polls without long-poll (HEARTBEAT_INTERVAL_S, 10)",
    )
    a("--state-file", help="state file (KELPIE_STATE_FILE, ./kelpie-state.json)")
    a("--input-dir", help="legacy input directory (INPUT_DIR, /input)")
    a("--output-dir", help="legacy output directory (OUTPUT_DIR, /output)")
    a(
        "--checkpoint-dir",
        help="legacy checkpoint directory (CHECKPOINT_DIR, /checkpoint)",
    )
    a("--storage-url", help="storage root: s3:// or file:///dir (KELPIE_STORAGE_URL)")
    a(
        "--kill-grace",
        type=float,
        metavar="SECONDS",
        help="SIGTERM -> SIGKILL delay (KELPIE_KILL_GRACE_S, 10)",
    )
    a(
        "--long-poll",
        type=float,
        metavar="SECONDS",
        help="how long the server may hold an empty claim; 0 = plain polling "
        "(KELPIE_LONG_POLL_S, 20)",
    )
    a("--slots", type=int, help="jobs run at once (KELPIE_SLOTS, 1)")
    a(
        "--slot-gpus",
        metavar="LIST",
        help="CUDA_VISIBLE_DEVICES per slot, e.g. '0,1' or '0+1,2+3' "
        "(KELPIE_SLOT_GPUS)",
    )
    a(
        "--imds",
        choices=IMDS_MODES,
        help="use SaladCloud's instance metadata service; auto = only on "
        "SaladCloud (KELPIE_IMDS, auto)",
    )
    a(
        "--imds-url",
        help="the instance metadata service (KELPIE_IMDS_URL, http://169.254.169.254)",
    )
    a(
        "--reallocate-wait",
        type=float,
        metavar="SECONDS",
        help="after a reallocation request, how long to wait for SaladCloud to "
        "stop the container before exiting 0 (KELPIE_REALLOCATE_WAIT_S, 60)",
    )
    a("--log-level", help="debug, info, warning, error (KELPIE_LOG_LEVEL, info)")
    a(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port; 0 = any free port "
        "(KELPIE_METRICS_PORT; default: off)",
    )
    a(
        "--metrics-host",
        metavar="ADDRESS",
        help="address the metrics port binds (KELPIE_METRICS_HOST, 127.0.0.1)",
    )
    a(
        "--ship-logs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send each job's output to the server, for `kelpie jobs logs` "
        "(KELPIE_SHIP_LOGS, true)",
    )


def build_parser(prog: str = "kelpie worker") -> argparse.ArgumentParser:
    """
    The stand-alone parser of ``python -m kelpie_sdk.worker``.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the Kelpie worker agent: claim jobs, run them, report.",
    )
    add_arguments(parser)
    return parser


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """
    Build the configuration: environment first, flags on top.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    overrides: dict[str, Any] = {}
    for dest, field in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[field] = value
    return WorkerConfig.from_env(environ, **overrides)


def configure_logging(level: str) -> None:
    """
    Plain log lines on stderr (the worker runs in containers; no colours).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_worker(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> int:
    """
    Configure, then run the worker in this (main) thread until it stops.

    Returns:
        The exit code (see ``docs/worker.md``).
    """
    env = os.environ if environ is None else environ
    configure_logging(
        getattr(args, "log_level", None) or env.get("KELPIE_LOG_LEVEL") or "info"
    )
    try:
        config = config_from_args(args, environ)
        worker = Worker(config)
        worker.make_client().close()  # fail fast on missing credentials
    except ConfigError as exc:
        logging.getLogger("kelpie_sdk.worker").error("configuration error: %s", exc)
        return EXIT_CONFIG
    worker.install_signal_handlers(_claims_stopped_marker(env))
    return worker.run()


#: A file the worker creates once it has stopped claiming after SIGUSR1; set by
#: ``kelpie up``, which releases no job before every worker has stopped claiming.
CLAIMS_STOPPED_FILE_ENV = "KELPIE_CLAIMS_STOPPED_FILE"


def _claims_stopped_marker(env: Mapping[str, str]) -> Callable[[], None] | None:
    name = env.get(CLAIMS_STOPPED_FILE_ENV)
    if not name:
        return None
    path = Path(name)

    def mark() -> None:
        try:
            path.touch()
        except OSError as exc:
            logging.getLogger("kelpie_sdk.worker").warning(
                "cannot create %s (%s): %s", path, CLAIMS_STOPPED_FILE_ENV, exc
            )

    return mark


def main(argv: Sequence[str] | None = None) -> int:
    """
    ``python -m kelpie_sdk.worker [flags]``.
    """
    parser = build_parser("python -m kelpie_sdk.worker")
    return run_worker(parser.parse_args(argv))
