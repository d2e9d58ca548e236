"""
The Kelpie worker agent (``kelpie worker``, ``python -m kelpie_sdk.worker``).

It runs inside the job container on every node: claims jobs from the API
server, heartbeats, moves inputs, checkpoints and outputs through
:mod:`kelpie_sdk.storage`, runs each job's command and reports the outcome.
See ``docs/worker.md``.
"""

from __future__ import annotations

from kelpie_sdk.worker._agent import (
    EXIT_CONFIG,
    EXIT_IDLE,
    EXIT_MAX_FAILURES,
    EXIT_OK,
    EXIT_QUARANTINED,
    RESCHEDULE_EXIT_CODE,
    Outcome,
    Worker,
)
from kelpie_sdk.worker._config import WorkerConfig
from kelpie_sdk.worker._main import build_parser, config_from_args, main

__all__ = [
    "EXIT_CONFIG",
    "EXIT_IDLE",
    "EXIT_MAX_FAILURES",
    "EXIT_OK",
    "EXIT_QUARANTINED",
    "RESCHEDULE_EXIT_CODE",
    "Outcome",
    "Worker",
    "WorkerConfig",
    "build_parser",
    "config_from_args",
    "main",
]
