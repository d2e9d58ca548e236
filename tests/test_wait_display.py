"""
Tests for ``Client.wait(on_update=..., progress=True)`` and its display.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from kelpie_sdk import Client
from kelpie_sdk._wait_display import (
    html_table,
    open_display,
    overall_fraction,
    summary_line,
)
from kelpie_sdk.models import Job
from tests.fault_server import (  # noqa: F401 (fixtures)
    FaultServer,
    Reply,
    fault_server_fixture,
)
from tests.test_client import Sleeps, job_json


def make(server: FaultServer) -> Client:
    return Client(server.url, "k", environ={}, sleep=Sleeps())


def job(job_id: str = "0f3c9a1b-0000", status: str = "running", **extra: Any) -> Job:
    return Job.from_json(job_json(job_id, status, **extra))


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_on_update_is_called_on_each_change(fault_server: FaultServer) -> None:
    """The callback sees the first poll and every change, not unchanged polls."""
    fault_server.play(
        Reply(body=job_json("a", "pending")),
        Reply(body=job_json("a", "pending")),
        Reply(body=job_json("a", "running", attempt=1, progress={"step": 1})),
        Reply(body=job_json("a", "completed", attempt=1)),
    )
    seen: list[list[tuple[str, str]]] = []
    jobs = make(fault_server).wait(
        "a", on_update=lambda js: seen.append([(j.id, j.status.value) for j in js])
    )
    assert "completed" == jobs[0].status.value
    assert [[("a", "pending")], [("a", "running")], [("a", "completed")]] == seen


def test_on_update_gets_every_job_in_order(fault_server: FaultServer) -> None:
    """Finished jobs stay in the list passed to the callback, in the order given."""
    fault_server.play(
        Reply(body=job_json("a", "running")),
        Reply(body=job_json("b", "completed")),
        Reply(body=job_json("a", "completed")),
    )
    seen: list[list[str]] = []
    make(fault_server).wait(
        ["a", "b"],
        on_update=lambda js: seen.append([f"{j.id}:{j.status.value}" for j in js]),
    )
    assert [["a:running", "b:completed"], ["a:completed", "b:completed"]] == seen


def test_on_update_exception_ends_the_wait(fault_server: FaultServer) -> None:
    """An exception raised by the callback propagates."""
    fault_server.play(Reply(body=job_json("a", "running")))

    def stop(jobs: list[Job]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(fault_server).wait("a", on_update=stop)


def test_progress_prints_plain_lines_when_not_a_terminal(
    fault_server: FaultServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True off a terminal prints one line on stderr per change."""
    fault_server.play(
        Reply(
            body=job_json("a", "running", attempt=1, progress={"step": 1, "total": 4})
        ),
        Reply(
            body=job_json("a", "running", attempt=1, progress={"step": 1, "total": 4})
        ),
        Reply(
            body=job_json("a", "running", attempt=1, progress={"step": 2, "total": 4})
        ),
        Reply(
            body=job_json("a", "completed", attempt=1, progress={"step": 4, "total": 4})
        ),
    )
    make(fault_server).wait("a", progress=True)
    captured = capsys.readouterr()
    assert "" == captured.out
    assert [
        "[#####---------------]  25% 0/1 finished; a running attempt 1 25% step 1/4",
        "[##########----------]  50% 0/1 finished; a running attempt 1 50% step 2/4",
        "[####################] 100% 1/1 finished; a completed attempt 1 100% step 4/4",
    ] == captured.err.splitlines()


def test_terminal_display_rewrites_one_line() -> None:
    """In a terminal the line is rewritten with a carriage return, padded over."""
    stream = Tty()
    display = open_display(stream)
    display.update([job("abcdefgh-long-id", progress={"percent": 50})])
    display.update([job("abcdefgh-long-id", "completed")])
    display.close()
    text = stream.getvalue()
    first, second = text.split("\r")[1:]
    assert first.startswith("[##########----------]  50% 0/1 finished; abcdefgh ")
    assert second.startswith("[####################] 100% 1/1 finished; abcdefgh ")
    assert second.endswith("\n")
    assert len(second.rstrip("\n")) >= len(first)


def test_overall_fraction_counts_finished_and_running() -> None:
    """Finished jobs count whole, running ones by progress, pending ones as 0."""
    jobs = [
        job("a", "completed"),
        job("b", "running", progress={"fraction": 0.5}),
        job("c", "pending"),
        job("d", "failed"),
    ]
    assert 0.625 == overall_fraction(jobs)
    assert summary_line(jobs).startswith("[############--------]  62% 2/4 finished; b ")


def test_html_table_escapes_and_shows_bars() -> None:
    """The notebook HTML escapes ids and messages and has a progress element."""
    html = html_table([job("<a>", progress={"percent": 40, "message": "<b>x</b>"})])
    assert "<a>" not in html
    assert "&lt;a&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    assert '<progress value="0.4000" max="1"></progress> 40% &lt;b&gt;' in html


def test_job_repr_is_short() -> None:
    """A job's repr names id, status, attempt, progress and group."""
    text = repr(job("j-1", attempt=2, progress={"step": 420, "total": 1000}))
    assert (
        "Job(id='j-1', status='running', attempt=2, "
        "progress='42% step 420/1000', "
        "container_group_id='11111111-2222-3333-4444-555555555555')"
    ) == text
    assert "Job(id='j-2', status='pending', container_group_id=" in repr(
        job("j-2", "pending")
    )


def test_job_repr_html_is_escaped() -> None:
    """_repr_html_ escapes what the user wrote and shows a progress bar."""
    html = job(
        "j<1>", arguments=["<script>"], progress={"fraction": 0.25}, attempt=1
    )._repr_html_()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "<code>j&lt;1&gt;</code>" in html
    assert '<progress value="0.2500" max="1"></progress> 25%' in html


@pytest.fixture
def notebook(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CapturingDisplayPublisher]:
    """An IPython shell that looks like a Jupyter kernel and keeps what it displays."""
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    publisher = CapturingDisplayPublisher()
    shell.display_pub = publisher
    shell.kernel = object()  # what a Jupyter kernel's shell has
    try:
        yield publisher
    finally:
        InteractiveShell.clear_instance()


def test_progress_in_a_notebook_updates_one_html_display(
    fault_server: FaultServer,
    notebook: CapturingDisplayPublisher,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In Jupyter, progress=True shows HTML once and then updates it in place."""
    fault_server.play(
        Reply(body=job_json("a", "running", attempt=1, progress={"percent": 30})),
        Reply(body=job_json("a", "completed", attempt=1, progress={"percent": 100})),
    )
    make(fault_server).wait("a", progress=True)
    outputs = notebook.outputs
    assert 3 == len(outputs)
    ids = {o["transient"]["display_id"] for o in outputs}
    assert 1 == len(ids)
    assert [False, True, True] == [o["update"] for o in outputs]
    assert (
        '<progress value="0.3000" max="1"></progress> 0/1 finished'
        in (outputs[1]["data"]["text/html"])
    )
    assert "<td>completed</td>" in outputs[2]["data"]["text/html"]
    assert "" == capsys.readouterr().err  # no terminal line in a notebook


def test_progress_without_stderr_shows_nothing(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no stderr at all (pythonw), progress=True still waits, silently."""
    monkeypatch.setattr("sys.stderr", None)
    fault_server.play(Reply(body=job_json("a", "completed")))
    assert ["a"] == [j.id for j in make(fault_server).wait("a", progress=True)]
