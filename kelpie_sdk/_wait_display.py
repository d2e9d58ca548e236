"""
The progress display of ``Client.wait(..., progress=True)``.

No ``rich`` here (the CLI owns it): in a terminal the display is one line on
stderr, rewritten in place; in Jupyter it is an HTML block updated in place
(through IPython, imported only when it is already loaded); anywhere else it
prints a plain line whenever the line changes.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Sequence
from html import escape
from typing import Any, Protocol, TextIO

from kelpie_sdk.models import Job, JobStatus, format_progress, progress_fraction

__all__ = ["WaitDisplay", "open_display", "overall_fraction", "summary_line"]

#: Characters of the text progress bar.
BAR_WIDTH = 20


class WaitDisplay(Protocol):
    """
    Shows the jobs being waited for.
    """

    def update(self, jobs: Sequence[Job]) -> None:
        """
        Show the jobs' latest state.
        """

    def close(self) -> None:
        """
        Leave the last state on screen and end the display.
        """


def overall_fraction(jobs: Sequence[Job]) -> float:
    """
    How far the jobs are together, from 0 to 1: a finished job counts whole,
    a running one by its progress record, anything else as 0.
    """
    if not jobs:
        return 1.0
    total = 0.0
    for job in jobs:
        if job.finished:
            total += 1.0
        elif job.status is JobStatus.RUNNING:
            total += progress_fraction(job.progress) or 0.0
    return total / len(jobs)


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = int(fraction * width)
    return "#" * filled + "-" * (width - filled)


def summary_line(jobs: Sequence[Job]) -> str:
    """
    One line for the jobs: a bar, how many finished, and the first unfinished
    job's state (or the one job's state), e.g.
    ``[#####---------------]  25% 0/1 finished; 3c9f0a1b running attempt 1 25%``
    (a job is named by the first 8 characters of its id).
    """
    fraction = overall_fraction(jobs)
    finished = sum(1 for j in jobs if j.finished)
    line = f"[{_bar(fraction)}] {fraction * 100:3.0f}% {finished}/{len(jobs)} finished"
    current = next((j for j in jobs if not j.finished), None)
    if current is None and len(jobs) == 1:
        current = jobs[0]
    if current is not None:
        line += f"; {current.id[:8]} {current.status.value}"
        if current.attempt is not None and current.attempt > 0:
            line += f" attempt {current.attempt}"
        detail = format_progress(current.progress)
        if detail:
            line += f" {detail}"
    return line


class _TerminalDisplay:
    """
    One line rewritten in place with a carriage return.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._width = 0

    def update(self, jobs: Sequence[Job]) -> None:
        # A line longer than the terminal would wrap, and `\r` would then
        # rewrite only its last row.
        columns = shutil.get_terminal_size().columns - 1
        line = summary_line(jobs)[: max(columns, 20)]
        pad = max(self._width - len(line), 0)
        self._stream.write("\r" + line + " " * pad)
        self._stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self._width:
            self._stream.write("\n")
            self._stream.flush()


class _PlainDisplay:
    """
    A new line whenever the line changes (logs, pipes, CI).
    """

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._last: str | None = None

    def update(self, jobs: Sequence[Job]) -> None:
        line = summary_line(jobs)
        if self._stream is not None and line != self._last:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last = line

    def close(self) -> None:
        return None


def html_table(jobs: Sequence[Job]) -> str:
    """
    The jobs as an HTML table with a ``<progress>`` bar each (escaped).
    """
    rows = []
    for job in jobs:
        fraction = 1.0 if job.status is JobStatus.COMPLETED else None
        if fraction is None:
            fraction = progress_fraction(job.progress)
        bar = (
            ""
            if fraction is None
            else f'<progress value="{fraction:.4f}" max="1"></progress> '
        )
        attempt = "" if job.attempt is None else str(job.attempt)
        rows.append(
            f"<tr><td><code>{escape(job.id)}</code></td>"
            f"<td>{escape(job.status.value)}</td><td>{attempt}</td>"
            f"<td>{bar}{escape(format_progress(job.progress))}</td></tr>"
        )
    fraction = overall_fraction(jobs)
    finished = sum(1 for j in jobs if j.finished)
    return (
        f'<div class="kelpie-wait"><progress value="{fraction:.4f}" max="1">'
        f"</progress> {finished}/{len(jobs)} finished"
        "<table><tr><th>ID</th><th>Status</th><th>Attempt</th><th>Progress</th></tr>"
        + "".join(rows)
        + "</table></div>"
    )


class _NotebookDisplay:
    """
    An HTML block that is replaced in place in a Jupyter notebook.
    """

    def __init__(self) -> None:
        # IPython is optional (and untyped): reached only when a kernel runs.
        ipython_display: Any = importlib.import_module("IPython.display")
        self._html = ipython_display.HTML
        self._handle = ipython_display.display(self._html(""), display_id=True)

    def update(self, jobs: Sequence[Job]) -> None:
        if self._handle is not None:
            self._handle.update(self._html(html_table(jobs)))

    def close(self) -> None:
        return None


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return getattr(shell, "kernel", None) is not None


def open_display(stream: TextIO | None = None) -> WaitDisplay:
    """
    The display that fits where the program runs: HTML in a Jupyter kernel,
    else a line rewritten in place when ``stream`` (default: stderr) is a
    terminal, else a plain line on each change.
    """
    if stream is None:
        if _in_notebook():
            return _NotebookDisplay()
        if sys.stderr is None:  # e.g. pythonw: nowhere to show it
            return _PlainDisplay(None)
        stream = sys.stderr
    if stream.isatty():
        return _TerminalDisplay(stream)
    return _PlainDisplay(stream)
