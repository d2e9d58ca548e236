"""
Preemption signals: a flag that the training loop polls, never a save in a handler.

Two ways to turn it on:

- `install_preemption_handler()`: the signals only set the flag; the program saves
  and exits by itself.
- A `Checkpointer` inside a job run by ``kelpie worker`` (or with
  ``preemption=True``) installs a *deferring* SIGTERM handler: the flag is set, the
  next ``save()`` is made blocking, and once it is committed the process ends as
  SIGTERM would have ended it. A Python handler that was already installed is still
  called; a forked child (a data-loader worker) keeps dying on SIGTERM as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

log = logging.getLogger("kelpie_sdk.checkpoint")

_flag = threading.Event()
# Signals that arrived while their default action (termination) was deferred.
_pending: set[int] = set()


def _handler(signum: int, frame: FrameType | None) -> None:
    # Only set a flag: saving inside a signal handler could run in the middle of
    # an update to the very state being saved.
    _flag.set()


def _die(signum: int) -> None:
    """End the process by ``signum``'s default action."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # Not reached for a terminating signal; off the main thread the disposition
    # cannot be changed, so exit with the status a shell gives to such a death.
    os._exit(128 + signum)


class _DeferringHandler:
    """
    Set the preemption flag and postpone the default action until the next save.

    Args:
        previous: The handler that was installed before (called after the flag is
            set when it is a Python callable; SIG_IGN keeps the signal ignored).
        pid: The process that installed it; a forked child gets the previous
            behaviour, so it does not outlive its parent.
    """

    def __init__(
        self, previous: Callable[[int, FrameType | None], Any] | int, pid: int
    ):
        self.previous = previous
        self.pid = pid

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self.pid:
            _flag.set()
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:
            if os.getpid() == self.pid:
                _pending.add(signum)
            else:
                _die(signum)


def install_preemption_handler(
    signals: Iterable[signal.Signals | int] = (signal.SIGTERM,),
) -> None:
    """
    Make the given signals set the preemption flag instead of killing the process.

    The handler never saves anything itself: the training loop sees the flag through
    `preempted()` or `Checkpointer.should_save()` and saves at its next safe point,
    then should exit. Nothing happens on import; this must be called explicitly, from
    the main thread (a Python rule for signal handlers). It replaces the handler a
    `Checkpointer` installs in a job run by ``kelpie worker``, so the process is no
    longer ended after the next save: exit yourself.

    Args:
        signals: The signals to catch; SIGTERM by default.

    Raises:
        ValueError: When called from a thread other than the main thread.
    """
    for sig in signals:
        signal.signal(sig, _handler)
        _pending.discard(int(sig))


def install_deferring_handler(sig: int = signal.SIGTERM) -> bool:
    """
    Install the Checkpointer's SIGTERM handler, unless one is installed already.

    Returns:
        Whether a preemption handler is now in place. False off the main thread,
        where Python cannot install signal handlers, and when the current handler
        was installed by C code (it cannot be chained); both are logged.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning(
            "SIGTERM will not trigger a checkpoint: the Checkpointer was created "
            "outside the main thread; call checkpoint.install_preemption_handler() "
            "from the main thread"
        )
        return False
    current = signal.getsignal(sig)
    if current is _handler or isinstance(current, _DeferringHandler):
        return True
    if current is None:
        log.warning(
            "SIGTERM will not trigger a checkpoint: its handler was not installed "
            "from Python and cannot be chained; call "
            "checkpoint.install_preemption_handler() to replace it"
        )
        return False
    signal.signal(sig, _DeferringHandler(current, os.getpid()))
    return True


def termination_pending() -> bool:
    """
    Return whether a deferred signal waits for the next save to end the process.
    """
    return bool(_pending)


def terminate() -> None:
    """
    End the process by the deferred signal (after the preemption save committed).
    """
    if _pending:
        _die(min(_pending))


def preempted() -> bool:
    """
    Return whether a preemption signal has arrived since the handler was installed.

    Returns:
        True once one of the signals given to `install_preemption_handler()` (or
        SIGTERM, with the handler a `Checkpointer` installs) arrived.
    """
    return _flag.is_set()


def _reset_preempted() -> None:
    """
    Clear the preemption flag and any deferred signal (for tests).
    """
    _flag.clear()
    _pending.clear()
