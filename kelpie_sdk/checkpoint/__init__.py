"""
Explicit, atomic, incremental, asynchronous checkpoints on any fsspec store.

The five-line recipe::

    from kelpie_sdk import checkpoint
    ckpt = checkpoint.Checkpointer()      # or Checkpointer("s3://b/run", keep_last=3)
    start = ckpt.latest_step()                # None on a fresh start
    state = ckpt.load() if start is not None else init_state()
    for step in range(start or 0, total):
        train_one_step(state)                 # one step of work
        if ckpt.should_save(step + 1):        # every 300 s; SIGTERM under the worker
            ckpt.save(state, step=step + 1)   # async by default; blocking=True to wait
    ckpt.finish(state, step=total)            # final save unless saved; waits

Importing this module is cheap: no numpy, torch, HTTP or server code is loaded, and
nothing is installed on import. A Checkpointer registers an exit hook (to finish its
last save) and, in a job run by ``kelpie worker``, a SIGTERM handler (see
``Checkpointer(preemption=...)``).
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
