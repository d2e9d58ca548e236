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
    ``time`` is UTC in ISO 8601 with a ``Z``. ``checkpoint_time`` and
    ``checkpoint_step``, written by each committed checkpoint save (see
    `note_checkpoint`), are kept.

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
        "time": _now(),
        "metrics": metrics,
    }
    for key in _CHECKPOINT_KEYS:
        kept = _read(path).get(key)
        if kept is not None:
            record[key] = kept
    try:
        data = json.dumps(record, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointCodecError(
            f"progress metrics must be JSON-able and finite: {exc}"
        ) from exc
    if fraction is not None and not math.isfinite(fraction):  # pragma: no cover
        raise CheckpointCodecError("progress fraction is not finite")
    _write(path, data)


#: The keys a committed checkpoint adds to the progress record.
_CHECKPOINT_KEYS = ("checkpoint_time", "checkpoint_step")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def note_checkpoint(step: int) -> None:
    """
    Add the time of a committed checkpoint to the progress record.

    Sets ``checkpoint_time`` (now, UTC, ISO 8601 with a ``Z``) and
    ``checkpoint_step`` in the record at ``KELPIE_PROGRESS_FILE``, keeping its
    other keys; the worker forwards it, and the server counts the compute since
    then as lost if the attempt is interrupted. Nothing happens when the
    variable is unset or empty.

    Raises:
        CheckpointStorageError: The file cannot be written.
    """
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    record = _read(path)
    record["checkpoint_time"] = _now()
    record["checkpoint_step"] = step
    _write(path, json.dumps(record).encode())


def _write(path: str, data: bytes) -> None:
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
