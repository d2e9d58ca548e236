"""
Running a job's command: no shell, its own process group, output streamed.

The child is started with ``start_new_session=True`` so that it leads a new
process group; signals go to the whole group, so a shell wrapper's children stop
too (the original signalled only the PID, W-10). Its stdout and stderr are read
line by line by two threads and written to the worker's own stdout and stderr,
each line prefixed with ``[<job id>] ``; the last lines of stderr are kept for
the failure report. An ``on_line`` hook also gets every line (the log shipper,
``_logship.py``), and must not block.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["DEFAULT_TAIL_LINES", "JobProcess", "SpawnError", "describe_exit"]

logger = logging.getLogger(__name__)

#: How many lines of stderr a failure report carries.
DEFAULT_TAIL_LINES = 40
#: The most characters of one stderr line kept in the tail.
_MAX_LINE = 2000

_write_lock = threading.Lock()

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[[int, int], int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Resolved once in the parent, so the child only makes one C call.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """
    In the child, before exec: get SIGKILL if the worker dies.

    A worker that is killed (node loss, OOM, SIGKILL) must not leave its job
    running unsupervised, writing to the same checkpoint location as the next
    attempt. (Linux ties this to the thread that started the child; the slot's
    thread lives as long as the job.)
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SpawnError(Exception):
    """
    The command could not be started (not found, not executable...).
    """


def describe_exit(returncode: int) -> str:
    """
    Say in words how a process ended.

    Args:
        returncode: ``Popen.returncode``: the exit code, or ``-N`` for signal N.

    Returns:
        For example ``"exit code 3"`` or ``"signal SIGKILL"``.
    """
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal {name}"
    return f"exit code {returncode}"


class JobProcess:
    """
    One run of a job's command.

    Args:
        argv: The command and its arguments (no shell).
        env: The complete environment of the child.
        label: The prefix of every streamed line (the job id).
        cwd: The working directory; the worker's own when ``None``.
        tail_lines: How many lines of stderr to keep.
        stdout: Where the child's stdout goes; ``sys.stdout`` when ``None``.
        stderr: Where the child's stderr goes; ``sys.stderr`` when ``None``.
        on_line: Called with ``("stdout" | "stderr", line)`` for every line,
            from the reading threads; must return at once.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        label: str,
        cwd: Path | None = None,
        tail_lines: int = DEFAULT_TAIL_LINES,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        on_line: Callable[[str, str], None] | None = None,
    ) -> None:
        if not argv or not argv[0]:
            raise SpawnError("the job has no command")
        self.argv = list(argv)
        self.env = dict(env)
        self.label = label
        self.cwd = cwd
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._out = stdout
        self._err = stderr
        self._on_line = on_line
        self._proc: subprocess.Popen[bytes] | None = None
        self._readers: list[threading.Thread] = []
        self._terminated_by_us = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """
        The child's process id once started.
        """
        return None if self._proc is None else self._proc.pid

    @property
    def terminated_by_us(self) -> bool:
        """
        Whether ``terminate()`` was called.
        """
        return self._terminated_by_us

    def start(self) -> None:
        """
        Start the child in its own process group.

        Raises:
            SpawnError: The command does not exist or cannot be executed.
        """
        try:
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError as exc:
            raise SpawnError(
                f"command not found: {self.argv[0]!r} ({exc.strerror})"
            ) from exc
        except PermissionError as exc:
            raise SpawnError(
                f"command not executable: {self.argv[0]!r} ({exc.strerror})"
            ) from exc
        except OSError as exc:
            raise SpawnError(f"cannot start {self.argv[0]!r}: {exc}") from exc
        if self._proc.stdout is None or self._proc.stderr is None:  # pragma: no cover
            raise SpawnError("no pipes to the child")
        self._readers = [
            threading.Thread(
                target=self._pump,
                args=(self._proc.stdout, False),
                name=f"stdout-{self.label}",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(self._proc.stderr, True),
                name=f"stderr-{self.label}",
                daemon=True,
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: IO[bytes], is_err: bool) -> None:
        prefix = f"[{self.label}] "
        name = "stderr" if is_err else "stdout"
        on_line = self._on_line
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if is_err:
                    self._tail.append(line[:_MAX_LINE])
                target = (
                    (self._err or sys.stderr) if is_err else (self._out or sys.stdout)
                )
                with _write_lock:
                    try:
                        target.write(prefix + line + "\n")
                        target.flush()
                    except (OSError, ValueError):
                        pass
                if on_line is not None:
                    # A failing hook must not stop the pump (or the job with it).
                    try:
                        on_line(name, line)
                    except Exception:
                        logger.exception("job %s: the output hook failed", self.label)
        finally:
            stream.close()

    def poll(self) -> int | None:
        """
        The return code if the child has exited, else ``None``.
        """
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """
        Wait for the child to exit, then for its output to drain.

        Leftover processes in the child's group are killed once the child itself
        has exited, so nothing the job started outlives it.

        Args:
            timeout: Seconds to wait; forever when ``None``.

        Returns:
            ``Popen.returncode``: the exit code, or ``-N`` if killed by signal N.

        Raises:
            subprocess.TimeoutExpired: The child is still running.
        """
        if self._proc is None:
            raise RuntimeError("the process was never started")
        code = self._proc.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)
        for reader in self._readers:
            reader.join(timeout=5.0)
        return code

    def terminate(self, grace: float) -> int | None:
        """
        Stop the child: SIGTERM to its group, SIGKILL after ``grace`` seconds.

        Args:
            grace: Seconds between SIGTERM and SIGKILL.

        Returns:
            The return code, or ``None`` if the child was never started.
        """
        with self._lock:
            self._terminated_by_us = True
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            logger.info(
                "job %s: sending SIGTERM to process group %s",
                self.label,
                self._proc.pid,
            )
            self._signal_group(signal.SIGTERM)
            try:
                return self.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "job %s: still running %.1f s after SIGTERM; sending SIGKILL",
                    self.label,
                    grace,
                )
                self._signal_group(signal.SIGKILL)
        return self.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def stderr_tail(self, max_chars: int = 4000) -> str:
        """
        The last lines the child wrote to stderr, at most ``max_chars``.
        """
        text = "\n".join(self._tail)
        return text[-max_chars:]
