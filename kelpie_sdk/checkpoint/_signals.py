"""
Opt-in preemption notice: a signal handler that only sets a flag.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType

_flag = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    # Only set a flag: saving inside a signal handler could run in the middle of
    # an update to the very state being saved.
    _flag.set()


def install_preemption_handler(
    signals: Iterable[signal.Signals | int] = (signal.SIGTERM,),
) -> None:
    """
    Make the given signals set the preemption flag instead of killing the process.

    The handler never saves anything itself: the training loop sees the flag through
    `preempted()` or `Checkpointer.should_save()` and saves at its next safe point,
    then should exit. Nothing happens on import; this must be called explicitly, from
    the main thread (a Python rule for signal handlers).

    Args:
        signals: The signals to catch; SIGTERM by default.

    Raises:
        ValueError: When called from a thread other than the main thread.
    """
    for sig in signals:
        signal.signal(sig, _handler)


def preempted() -> bool:
    """
    Return whether a preemption signal has arrived since the handler was installed.

    Returns:
        True once one of the signals given to `install_preemption_handler()` arrived.
    """
    return _flag.is_set()


def _reset_preempted() -> None:
    """
    Clear the preemption flag (for tests).
    """
    _flag.clear()
