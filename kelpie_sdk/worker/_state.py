"""
The worker's state file: which job a slot holds, written atomically.

The original rewrote the file in place, concurrently, never pruned it and never
read it back (W-23). Here every write goes to a temporary file in the same
directory, is fsync'ed and then ``os.replace``'d over the old one, so a reader
(the job, through ``KELPIE_STATE_FILE``, or the worker after a restart) always
sees a complete document. The worker reads it at start-up to release a job it
held when it died. The history of finished jobs is capped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import attrs

__all__ = ["HISTORY_LIMIT", "HeldJob", "StateFile", "atomic_write_json"]

logger = logging.getLogger(__name__)

#: How many finished jobs the state file remembers.
HISTORY_LIMIT = 20


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def atomic_write_json(path: Path, data: Any) -> None:
    """
    Write JSON so that readers see either the old or the new document.

    Args:
        path: The destination; its directory is created if needed.
        data: Anything ``json.dumps`` accepts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@attrs.frozen(kw_only=True)
class HeldJob:
    """
    A job a slot holds, as recorded in the state file.

    Attributes:
        id: The job id.
        attempt: The claim number the server gave (``None`` for old servers).
        machine_id: The machine id the job was claimed with.
        container_group_id: The queue it came from.
        phase: ``starting``, ``downloading``, ``running`` or ``uploading``
            (which includes reporting the outcome).
        start: When the claim happened (ISO 8601).
        pid: The job's process id while it runs.
    """

    id: str
    attempt: int | None
    machine_id: str
    container_group_id: str
    phase: str
    start: str
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        """
        The JSON form stored in the file.
        """
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> HeldJob | None:
        """
        Parse a stored job; ``None`` if the record is unusable.
        """
        if not isinstance(data, dict):
            return None
        try:
            attempt = data.get("attempt")
            pid = data.get("pid")
            return cls(
                id=str(data["id"]),
                attempt=int(attempt) if attempt is not None else None,
                machine_id=str(data["machine_id"]),
                container_group_id=str(data["container_group_id"]),
                phase=str(data.get("phase", "running")),
                start=str(data.get("start", "")),
                pid=int(pid) if pid is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


class StateFile:
    """
    One slot's state file.

    The document::

        {"version": 1, "worker_start": "...", "machine_id": "...", "slot": 0,
         "job": {"id": ..., "attempt": ..., "phase": ..., ...} | null,
         "history": [{"id": ..., "attempt": ..., "outcome": ..., "end": ...}, ...]}

    Thread-safe: the slot's threads may call it concurrently.
    """

    def __init__(self, path: Path, *, machine_id: str, slot: int = 0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {
            "version": 1,
            "worker_start": _now(),
            "machine_id": machine_id,
            "slot": slot,
            "job": None,
            "history": [],
        }

    def read_previous(self) -> tuple[HeldJob | None, list[dict[str, Any]]]:
        """
        Read what a previous run of the worker left behind.

        Returns:
            The job it held (if any) and its history. A missing or unreadable
            file gives ``(None, [])``; an unreadable one is logged.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, []
        except OSError as exc:
            logger.warning("cannot read state file %s: %s", self.path, exc)
            return None, []
        try:
            doc = json.loads(text)
        except ValueError as exc:
            logger.warning(
                "state file %s is not JSON (%s); ignoring it", self.path, exc
            )
            return None, []
        if not isinstance(doc, dict):
            return None, []
        history = doc.get("history")
        return (
            HeldJob.from_json(doc.get("job")),
            [h for h in history if isinstance(h, dict)]
            if isinstance(history, list)
            else [],
        )

    def start(self, history: list[dict[str, Any]] | None = None) -> None:
        """
        Write the fresh document for this run, keeping ``history``.
        """
        with self._lock:
            self._doc["history"] = list(history or [])[-HISTORY_LIMIT:]
            self._doc["job"] = None
            self._write()

    def hold(self, job: HeldJob) -> None:
        """
        Record that the slot holds ``job``.
        """
        with self._lock:
            self._doc["job"] = job.to_json()
            self._write()

    def update(self, **changes: Any) -> None:
        """
        Change fields of the held job (e.g. ``phase``, ``pid``).
        """
        with self._lock:
            job = self._doc.get("job")
            if job is None:
                return
            job.update(changes)
            self._write()

    def finish(self, outcome: str, **details: Any) -> None:
        """
        Move the held job into the history with its outcome.

        Args:
            outcome: ``completed``, ``failed``, ``released``, ``canceled``...
            **details: Extra fields, e.g. ``exit_code``.
        """
        with self._lock:
            job = self._doc.get("job")
            if job is None:
                return
            record = {
                "id": job["id"],
                "attempt": job.get("attempt"),
                "start": job.get("start"),
                "end": _now(),
                "outcome": outcome,
                **details,
            }
            history: list[dict[str, Any]] = self._doc["history"]
            history.append(record)
            del history[:-HISTORY_LIMIT]
            self._doc["job"] = None
            self._write()

    @property
    def job(self) -> dict[str, Any] | None:
        """
        A copy of the held job's record, or ``None``.
        """
        with self._lock:
            job = self._doc.get("job")
            return dict(job) if job is not None else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """
        A copy of the finished jobs, oldest first.
        """
        with self._lock:
            return [dict(h) for h in self._doc["history"]]

    def _write(self) -> None:
        try:
            atomic_write_json(self.path, self._doc)
        except OSError as exc:
            # The state file is advisory; a full disk must not kill the job.
            logger.warning("cannot write state file %s: %s", self.path, exc)
