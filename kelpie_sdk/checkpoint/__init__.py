"""
Explicit, atomic, incremental, asynchronous checkpoints on any fsspec store.

The five-line recipe::

    from kelpie_sdk import checkpoint
    ckpt = checkpoint.Checkpointer()      # or Checkpointer("s3://b/run", keep_last=3)
    start = ckpt.latest_step()                # None on a fresh start
    state = ckpt.load() if start is not None else init_state()
    for step in range(start or 0, total):
        ...                                   # one step of work
        if ckpt.should_save(step + 1):        # every N steps / T seconds / preemption
            ckpt.save(state, step=step + 1)   # async by default; blocking=True to wait
    ckpt.close()                              # flushes the in-flight save

Importing this module is cheap: no numpy, torch, HTTP or server code is loaded, and
nothing (signal handlers, exit hooks) is installed until you ask for it.
"""

from __future__ import annotations

from kelpie_sdk.checkpoint._checkpointer import Checkpointer, SaveStats
from kelpie_sdk.checkpoint._progress import report_progress
from kelpie_sdk.checkpoint._signals import install_preemption_handler, preempted
from kelpie_sdk.errors import (
    CheckpointCodecError,
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointStorageError,
)

__all__ = [
    "CheckpointCodecError",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointStorageError",
    "Checkpointer",
    "SaveStats",
    "install_preemption_handler",
    "preempted",
    "report_progress",
]
