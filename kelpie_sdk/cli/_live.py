"""
The live jobs table of ``kelpie jobs wait`` and ``kelpie jobs list --watch``.

In a terminal the table is redrawn in place (rich ``Live``, which also ticks
the durations between polls). Anywhere else (a pipe, a file, CI) nothing is
redrawn: a plain line is printed for each job whose status, attempt or
progress changed.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kelpie_sdk.models import Job, JobStatus, format_progress, progress_fraction

__all__ = [
    "JobsView",
    "format_duration",
    "job_duration",
    "live_table",
    "plain_line",
]

#: The length of a short job id (any unique prefix is accepted by the CLI).
SHORT_ID = 8
_GAP = 3
_STATUS_STYLES = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "canceled": "magenta",
    "failed": "red",
}
#: The narrowest progress column: a 10-character bar and `100%`.
_MIN_PROGRESS = 15


def format_duration(seconds: float) -> str:
    """
    A short duration: ``42s``, ``3m05s``, ``2h03m``, ``1d04h``.
    """
    total = max(int(seconds), 0)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def job_duration(job: Job, now: dt.datetime) -> float | None:
    """
    Seconds since the job (last) started: until it ended, or until ``now``
    while it runs; ``None`` before it ever started.
    """
    if job.started is None:
        return None
    ends = [t for t in (job.completed, job.failed, job.canceled) if t is not None]
    end = max(ends) if job.finished and ends else now
    return max((end - job.started).total_seconds(), 0.0)


def _fraction(job: Job) -> float | None:
    if job.status is JobStatus.COMPLETED:
        return 1.0
    return progress_fraction(job.progress)


def _bar(fraction: float, width: int) -> Text:
    filled = int(fraction * width)
    bar = Text("█" * filled, style="green" if fraction >= 1 else "cyan")
    bar.append("░" * (width - filled), style="grey50")
    return bar


def _progress_cell(job: Job, width: int) -> Text:
    fraction = _fraction(job)
    detail = format_progress(job.progress)
    if fraction is None:
        return Text(detail)
    bar_width = min(20, max(10, width // 3))
    cell = _bar(fraction, bar_width)
    if not detail or (job.status is JobStatus.COMPLETED and not job.progress):
        detail = f"{fraction * 100:.0f}%"
    cell.append(" " + detail)
    return cell


def _duration_text(job: Job, now: dt.datetime) -> str:
    seconds = job_duration(job, now)
    return "" if seconds is None else format_duration(seconds)


def live_table(
    jobs: Sequence[Job],
    *,
    width: int,
    now: dt.datetime,
    title: str | None = None,
) -> Table:
    """
    The live table: ID, Status, Attempt, Progress (a bar from the job's
    progress record) and Duration, fitted to ``width`` columns.

    Ids are shown whole when there is room for a useful progress column,
    else by their first 8 characters (which the CLI accepts).
    """
    durations = [_duration_text(j, now) for j in jobs]
    attempts = [str(j.attempt) if j.attempt else "" for j in jobs]
    widths = {
        "Status": max([6, *(len(j.status.value) for j in jobs)]),
        "Attempt": max([7, *(len(a) for a in attempts)]),
        "Duration": max([8, *(len(d) for d in durations)]),
    }
    fixed = sum(widths.values()) + _GAP * 4
    id_width = max([2, *(len(j.id) for j in jobs)])
    if width - fixed - id_width - _GAP < _MIN_PROGRESS + 10:
        id_width = min(id_width, SHORT_ID)
    progress_width = max(width - fixed - id_width - _GAP, _MIN_PROGRESS)
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True
    )
    table.add_column("ID", no_wrap=True, min_width=id_width)
    table.add_column("Status", no_wrap=True, min_width=widths["Status"])
    table.add_column(
        "Attempt", no_wrap=True, justify="right", min_width=widths["Attempt"]
    )
    table.add_column(
        "Progress", no_wrap=True, overflow="ellipsis", max_width=progress_width
    )
    table.add_column(
        "Duration", no_wrap=True, justify="right", min_width=widths["Duration"]
    )
    for job, attempt, duration in zip(jobs, attempts, durations, strict=True):
        table.add_row(
            Text(job.id[:id_width]),
            Text(job.status.value, style=_STATUS_STYLES[job.status.value]),
            Text(attempt),
            _progress_cell(job, progress_width),
            Text(duration),
        )
    return table


def _change_key(job: Job) -> tuple[str, int | None, str]:
    return (job.status.value, job.attempt, format_progress(job.progress))


def plain_line(job: Job, now: dt.datetime) -> str:
    """
    One job as a line, e.g. ``<id> running attempt 2 42% step 420/1000 1m05s``.
    """
    parts = [job.id, job.status.value]
    if job.attempt:  # 0 (never claimed) reads better as nothing
        parts.append(f"attempt {job.attempt}")
    detail = format_progress(job.progress)
    if detail:
        parts.append(detail)
    duration = _duration_text(job, now)
    if duration:
        parts.append(duration)
    return " ".join(parts)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class JobsView:
    """
    Shows a changing list of jobs: a table redrawn in place on a terminal,
    else a plain line per job change.

    Use it as a context manager and call ``update(jobs)`` after each poll;
    leaving it leaves the last table on screen.

    Args:
        console: Where to draw.
        title: The table's title.
        now: The clock (for durations).
    """

    def __init__(
        self,
        console: Console,
        *,
        title: str | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.console = console
        self.title = title
        self._now = now
        self._jobs: list[Job] = []
        self._printed: dict[str, tuple[str, int | None, str]] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None

    @property
    def redraws(self) -> bool:
        """
        Whether the table is redrawn in place (the console is a terminal).
        """
        return self.console.is_terminal

    def render(self) -> RenderableType:
        """
        The table for the latest jobs.
        """
        with self._lock:
            jobs = list(self._jobs)
        if not jobs:
            return Text("No jobs.")
        return live_table(
            jobs, width=self.console.width, now=self._now(), title=self.title
        )

    def __enter__(self) -> Self:
        if self.redraws:
            self._live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=2,
                auto_refresh=True,
            )
            self._live.start()
        return self

    def update(self, jobs: Sequence[Job]) -> None:
        """
        Show these jobs (redraw, or print a line for each changed job).
        """
        with self._lock:
            self._jobs = list(jobs)
        if self._live is not None:
            self._live.refresh()
            return
        now = self._now()
        for job in jobs:
            key = _change_key(job)
            if self._printed.get(job.id) != key:
                self._printed[job.id] = key
                self.console.out(plain_line(job, now), highlight=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
