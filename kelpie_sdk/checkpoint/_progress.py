"""
Progress records for the worker: a small JSON file replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import UTC, datetime
from typing import Any

from kelpie_sdk.errors import CheckpointCodecError, CheckpointStorageError

PROGRESS_FILE_ENV = "KELPIE_PROGRESS_FILE"


def report_progress(step: int, total: int | None = None, **metrics: Any) -> None:
    """
    Record the job's progress for the Kelpie worker to forward with its heartbeats.

    The record is written to a temporary file next to the path in
    ``KELPIE_PROGRESS_FILE`` and moved over it with `os.replace`, so a reader never
    sees half a record. Nothing happens when the variable is unset or empty (for
    example outside Kelpie). The variable is read at each call.

    The record is one JSON object::

        {"step": 10, "total": 100, "fraction": 0.1,
         "time": "2026-01-01T12:00:00.000000Z", "metrics": {"loss": 0.25}}

    ``fraction`` is ``step / total`` (``null`` when ``total`` is ``None`` or 0);
    ``time`` is UTC in ISO 8601 with a ``Z``.

    Args:
        step: The number of steps done.
        total: The number of steps in the whole job, if known.
        **metrics: JSON-able values (numbers, strings, lists, dicts) to pass along.

    Raises:
        CheckpointCodecError: A metric is not JSON-able (NaN and infinities included).
        CheckpointStorageError: The file cannot be written.
    """
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    fraction = step / total if total else None
    record = {
        "step": step,
        "total": total,
        "fraction": fraction,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "metrics": metrics,
    }
    try:
        data = json.dumps(record, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointCodecError(
            f"progress metrics must be JSON-able and finite: {exc}"
        ) from exc
    if fraction is not None and not math.isfinite(fraction):  # pragma: no cover
        raise CheckpointCodecError("progress fraction is not finite")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".progress-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CheckpointStorageError(
            f"cannot write the progress file {path!r} ({PROGRESS_FILE_ENV}): {exc}"
        ) from exc
