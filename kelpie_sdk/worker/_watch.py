"""
Between heartbeats: progress and cancellation within seconds.

Heartbeats come every ``heartbeat_interval`` seconds (30 by default), which is
too slow to show a job's first progress or to stop a canceled job. While a job
is held, :class:`JobWatch` runs two light threads:

- the *progress* thread looks at the job's progress file every
  ``PROGRESS_POLL_S`` and sends a changed record at once
  (``POST /jobs/{id}/progress``, at most one per ``PROGRESS_MIN_GAP_S``); it
  does not extend the lease;
- the *status* thread holds a long poll (``GET /jobs/{id}/status?wait=``)
  that the server answers at once when the job is canceled, finished or
  claimed by another machine.

Both are optional additions to the protocol: against a server that does not
have them (404 or 405) the threads stop and heartbeats carry everything, as in
the original.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kelpie_sdk.client import Client
from kelpie_sdk.errors import APIStatusError, KelpieError
from kelpie_sdk.models import JobStatus, WorkerReport

__all__ = ["JobWatch", "read_progress"]

logger = logging.getLogger("kelpie_sdk.worker")

#: How often the progress file is looked at.
PROGRESS_POLL_S = 0.5
#: The least time between two progress reports.
PROGRESS_MIN_GAP_S = 1.0
#: How long one status long poll may be held by the server.
STATUS_WAIT_S = 25.0
#: Statuses that mean "this server does not have the endpoint".
_UNSUPPORTED = (404, 405)


def read_progress(path: Path) -> dict[str, Any] | None:
    """
    The job's progress record: the JSON object in its progress file.

    Returns:
        ``None`` when the file is missing, unreadable, half-written or holds
        something other than an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class JobWatch:
    """
    The progress and status threads of one held job.

    Args:
        make_client: A new client for each thread.
        job_id: The job.
        machine_id: This machine.
        attempt: The claim's attempt.
        progress_file: The job's ``KELPIE_PROGRESS_FILE``.
        make_report: Builds the report that carries a progress record.
        on_lost: Called (once, from a watch thread) with the reason when the
            server says this worker no longer holds the job.
    """

    def __init__(
        self,
        *,
        make_client: Callable[[], Client],
        job_id: str,
        machine_id: str,
        attempt: int | None,
        progress_file: Path,
        make_report: Callable[[dict[str, Any]], WorkerReport],
        on_lost: Callable[[str], None],
    ) -> None:
        self._make_client = make_client
        self.job_id = job_id
        self.machine_id = machine_id
        self.attempt = attempt
        self.progress_file = progress_file
        self._make_report = make_report
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._lost_once = threading.Lock()
        self._threads = [
            threading.Thread(target=self._guard(self._progress_loop), daemon=True),
            threading.Thread(target=self._guard(self._status_loop), daemon=True),
        ]
        self._threads[0].name = f"progress-{job_id}"
        self._threads[1].name = f"status-{job_id}"

    def start(self) -> None:
        """Start both threads."""
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """
        Stop both threads. The progress thread is joined; the status thread
        ends when its long poll returns (at once if the job just finished).
        """
        self._stop.set()
        if self._threads[0].is_alive():
            self._threads[0].join(timeout=10.0)

    # -- internals -----------------------------------------------------------------

    def _guard(self, loop: Callable[[Client], None]) -> Callable[[], None]:
        def run() -> None:
            client = self._make_client()
            try:
                loop(client)
            except Exception:
                logger.exception("job %s: the %s crashed", self.job_id, loop.__name__)
            finally:
                client.close()

        return run

    def _lost(self, what: str, status: JobStatus) -> None:
        if self._stop.is_set() or not self._lost_once.acquire(blocking=False):
            return
        self._on_lost(f"the server answered the {what} with {status.value!r}")

    def _unsupported(self, exc: KelpieError, what: str) -> bool:
        if isinstance(exc, APIStatusError) and exc.status_code in _UNSUPPORTED:
            logger.debug(
                "job %s: the server has no %s (%s); heartbeats carry it instead",
                self.job_id,
                what,
                exc.status_code,
            )
            return True
        return False

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.progress_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _progress_loop(self, client: Client) -> None:
        sent_sig: tuple[int, int, int] | None = None
        sent_at = float("-inf")
        while not self._stop.wait(PROGRESS_POLL_S):
            sig = self._signature()
            if sig is None or sig == sent_sig:
                continue
            if time.monotonic() - sent_at < PROGRESS_MIN_GAP_S:
                continue  # sent at the next look, once the gap has passed
            record = read_progress(self.progress_file)
            sent_sig = sig  # a half-written file is read again when it changes
            if record is None:
                continue
            try:
                status = client.report_progress(
                    self.job_id, self._make_report(record), max_retries=0
                )
            except KelpieError as exc:
                if self._unsupported(exc, "progress endpoint"):
                    return
                logger.debug("job %s: progress report failed: %s", self.job_id, exc)
                sent_sig = None
                continue
            sent_at = time.monotonic()
            if status is not JobStatus.RUNNING:
                self._lost("progress report", status)
                return

    def _status_loop(self, client: Client) -> None:
        delay = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = client.holder_status(
                    self.job_id,
                    machine_id=self.machine_id,
                    attempt=self.attempt,
                    wait=STATUS_WAIT_S,
                )
            except KelpieError as exc:
                if self._unsupported(exc, "status endpoint"):
                    return
                logger.debug("job %s: status poll failed: %s", self.job_id, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            if status is not JobStatus.RUNNING:
                self._lost("status poll", status)
                return
            if time.monotonic() - started < 1.0:
                # A server that answers at once (no long poll): at most 1/s.
                self._stop.wait(1.0)
