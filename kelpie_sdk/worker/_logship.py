"""
Shipping a job's output to the server, without ever blocking the job.

The threads that read the child's stdout and stderr call :meth:`LogShipper.add`
for each line: it stamps the time and appends the line to a bounded buffer
under a lock, nothing more. A shipper thread sends what the buffer holds about
once a second (``POST /jobs/{id}/logs``, in batches of at most
``MAX_BATCH_LINES``). When the server is slow or unreachable the buffer fills;
past ``max_lines`` or ``max_bytes`` the oldest lines are dropped and counted.
Every line of an attempt has a number (dropped ones too), so the server sees
the gap and shows how many lines went missing; a batch sent again after a lost
answer is not stored twice.

Against a server without the endpoint (404 or 405) shipping stops at once,
as it does when the server says this attempt no longer holds the job (409).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from kelpie_sdk.client import Client
from kelpie_sdk.errors import APIStatusError, KelpieError
from kelpie_sdk.models import JSONValue

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_LINES", "LogShipper"]

logger = logging.getLogger("kelpie_sdk.worker")

#: Lines buffered at most before the oldest are dropped.
DEFAULT_MAX_LINES = 100_000
#: Characters buffered at most before the oldest lines are dropped (16 MiB).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Seconds between two sends.
SHIP_INTERVAL_S = 1.0
#: The most lines one request carries.
MAX_BATCH_LINES = 5000
#: The most characters one request carries (about).
MAX_BATCH_CHARS = 2 * 1024 * 1024
#: Longer lines are cut to this many characters (the server keeps as many).
MAX_LINE_CHARS = 16 * 1024
#: Seconds between retries after a failed send (doubling up to 30).
_RETRY_S = 1.0
#: How long the last lines may take to reach the server when the job ends.
FLUSH_TIMEOUT_S = 5.0
#: Connect and read timeouts of one send.
_SEND_TIMEOUT = (5.0, 15.0)
#: Statuses that end shipping: no endpoint (404, 405), or not the holder (409).
_STOP = (404, 405, 409)

_Entry = tuple[str, float, str]


class LogShipper:
    """
    The output of one attempt of one job, on its way to the server.

    Args:
        make_client: Builds the client the shipper thread uses.
        job_id: The job.
        machine_id: This machine.
        attempt: The claim's attempt.
        container_group_id: The worker's container group.
        max_lines: Lines buffered at most.
        max_bytes: Characters buffered at most.
        interval: Seconds between two sends.
    """

    def __init__(
        self,
        *,
        make_client: Callable[[], Client],
        job_id: str,
        machine_id: str,
        attempt: int,
        container_group_id: str = "",
        max_lines: int = DEFAULT_MAX_LINES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        interval: float = SHIP_INTERVAL_S,
    ) -> None:
        self._make_client = make_client
        self.job_id = job_id
        self.machine_id = machine_id
        self.attempt = attempt
        self.container_group_id = container_group_id
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.interval = interval
        self._lock = threading.Lock()
        self._buffer: collections.deque[_Entry] = collections.deque()
        self._chars = 0
        #: The number of the buffer's first line among all the attempt's lines.
        self._first = 0
        self._dropped = 0
        self._shipped = 0
        self._closed = False
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"logs-{job_id}", daemon=True
        )

    @property
    def dropped(self) -> int:
        """Lines dropped because the buffer was full."""
        with self._lock:
            return self._dropped

    @property
    def shipped(self) -> int:
        """Lines the server accepted."""
        with self._lock:
            return self._shipped

    @property
    def buffered(self) -> int:
        """Lines waiting to be sent."""
        with self._lock:
            return len(self._buffer)

    def start(self) -> None:
        """Start the shipper thread."""
        self._thread.start()

    def add(self, stream: str, line: str) -> None:
        """
        Queue one line of ``stdout`` or ``stderr``; never blocks on the network.

        Called by the threads that read the child's output.
        """
        now = time.time()
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS]
        with self._lock:
            if self._closed:
                return
            self._buffer.append((stream, now, line))
            self._chars += len(line)
            if len(self._buffer) > self.max_lines or self._chars > self.max_bytes:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        # Under the lock.
        buffer = self._buffer
        while buffer and (len(buffer) > self.max_lines or self._chars > self.max_bytes):
            _, _, old = buffer.popleft()
            self._chars -= len(old)
            self._first += 1
            self._dropped += 1

    def stop(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """
        Send what is left (waiting at most ``timeout`` seconds), then stop.

        Call once the child's output is drained. Lines still unsent after the
        timeout are dropped. Calling it again does nothing.
        """
        with self._lock:
            if self._closed and self._done.is_set():
                return
            self._closed = True
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self._done.set()  # a send still in flight gives up after it
        if self.dropped:
            logger.warning(
                "job %s: %d output line(s) could not be sent to the server "
                "(the server was slow or unreachable; the oldest were dropped)",
                self.job_id,
                self.dropped,
            )

    # -- the shipper thread ------------------------------------------------------

    def _batch(self) -> tuple[int, list[_Entry]]:
        with self._lock:
            first = self._first
            batch: list[_Entry] = []
            chars = 0
            for entry in self._buffer:
                if len(batch) >= MAX_BATCH_LINES or (
                    batch and chars + len(entry[2]) > MAX_BATCH_CHARS
                ):
                    break
                batch.append(entry)
                chars += len(entry[2])
            return first, batch

    def _sent(self, first: int, count: int) -> None:
        with self._lock:
            # Lines dropped meanwhile moved _first past some of the batch.
            already = self._first - first
            # ... and those reached the server after all.
            self._dropped -= min(already, count)
            for _ in range(max(0, count - already)):
                _, _, line = self._buffer.popleft()
                self._chars -= len(line)
            self._first = max(self._first, first + count)
            self._shipped += count

    def _run(self) -> None:
        client = self._make_client()
        try:
            self._loop(client)
        except Exception:
            logger.exception("job %s: the log shipper crashed", self.job_id)
        finally:
            client.close()
            with self._lock:
                self._closed = True
                self._buffer.clear()
                self._chars = 0

    def _loop(self, client: Client) -> None:
        delay = _RETRY_S
        while True:
            stopping = self._stopped.is_set()
            first, batch = self._batch()
            if not batch:
                if stopping:
                    return
                self._wake.wait(self.interval)
                self._wake.clear()
                continue
            try:
                client.ship_logs(
                    self.job_id,
                    machine_id=self.machine_id,
                    attempt=self.attempt,
                    offset=first,
                    container_group_id=self.container_group_id,
                    lines=[_wire(entry) for entry in batch],
                    timeout=_SEND_TIMEOUT,
                    max_retries=0,
                )
            except KelpieError as exc:
                if isinstance(exc, APIStatusError) and exc.status_code in _STOP:
                    logger.debug("job %s: log shipping stopped: %s", self.job_id, exc)
                    return
                if not self._retry_later(exc, delay):
                    return
                delay = min(delay * 2, 30.0)
                continue
            delay = _RETRY_S
            self._sent(first, len(batch))
            if len(batch) < MAX_BATCH_LINES and not stopping:
                self._wake.wait(self.interval)
                self._wake.clear()

    def _retry_later(self, exc: Exception, delay: float) -> bool:
        logger.debug("job %s: log batch not sent: %s", self.job_id, exc)
        if self._stopped.is_set():
            return False  # the job ended and the server is unreachable: give up
        self._stopped.wait(delay)
        return not self._done.is_set()


def _wire(entry: _Entry) -> dict[str, JSONValue]:
    return {"stream": entry[0], "time": round(entry[1], 3), "line": entry[2]}
