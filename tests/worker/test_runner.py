"""
The job runner: no shell, own process group, streamed output, SIGTERM/SIGKILL.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kelpie_sdk.worker._runner import JobProcess, SpawnError, describe_exit

PY = sys.executable


def _run(
    code: str, **kwargs: object
) -> tuple[int, JobProcess, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    proc = JobProcess(
        [PY, "-c", code],
        dict(os.environ, **kwargs.pop("env", {})),  # type: ignore[arg-type]
        label="job-1",
        stdout=out,
        stderr=err,
        **kwargs,  # type: ignore[arg-type]
    )
    proc.start()
    return proc.wait(timeout=30), proc, out, err


def test_output_is_streamed_with_the_job_prefix() -> None:
    """Each line of stdout and stderr is forwarded, prefixed with the job id."""
    code, _, out, err = _run(
        "import sys; print('hello'); print('oops', file=sys.stderr); print('bye')"
    )
    assert 0 == code
    assert "[job-1] hello\n[job-1] bye\n" == out.getvalue()
    assert "[job-1] oops\n" == err.getvalue()


def test_every_line_also_reaches_the_output_hook() -> None:
    """on_line gets each line with its stream, and a failing hook stops nothing."""
    seen: list[tuple[str, str]] = []

    def hook(stream: str, line: str) -> None:
        seen.append((stream, line))
        if line == "boom":
            raise RuntimeError("a broken hook")

    code, _, out, _ = _run(
        "import sys; print('a'); print('boom'); print('e', file=sys.stderr); "
        "print('z')",
        on_line=hook,
    )
    assert 0 == code
    assert "[job-1] a\n[job-1] boom\n[job-1] z\n" == out.getvalue()
    assert [("stdout", "a"), ("stdout", "boom"), ("stdout", "z")] == [
        x for x in seen if x[0] == "stdout"
    ]
    assert [("stderr", "e")] == [x for x in seen if x[0] == "stderr"]


def test_exit_code_and_stderr_tail() -> None:
    """A failing command gives its exit code and its last stderr lines."""
    code, proc, _, _ = _run(
        "import sys\nfor i in range(100): print(f'line {i}', file=sys.stderr)\n"
        "sys.exit(3)",
        tail_lines=5,
    )
    assert 3 == code
    assert "\n".join(f"line {i}" for i in range(95, 100)) == proc.stderr_tail()


def test_no_shell_is_involved() -> None:
    """Arguments are passed verbatim: shell syntax is not interpreted."""
    out = io.StringIO()
    proc = JobProcess(
        [PY, "-c", "import sys; print(sys.argv[1])", "$HOME && echo x"],
        dict(os.environ),
        label="j",
        stdout=out,
        stderr=io.StringIO(),
    )
    proc.start()
    assert 0 == proc.wait(timeout=30)
    assert "[j] $HOME && echo x\n" == out.getvalue()


def test_environment_and_cwd_are_used(tmp_path: Path) -> None:
    """The child sees exactly the environment and directory it was given."""
    code, _, out, _ = _run(
        "import os; print(os.environ['KELPIE_JOB_ID'], os.getcwd())",
        env={"KELPIE_JOB_ID": "abc"},
        cwd=tmp_path,
    )
    assert 0 == code
    assert f"[job-1] abc {tmp_path}\n" == out.getvalue()


def test_missing_command_is_a_spawn_error() -> None:
    """A command that does not exist raises SpawnError with a clear message."""
    proc = JobProcess(["/no/such/command"], {}, label="j")
    with pytest.raises(SpawnError, match="command not found: '/no/such/command'"):
        proc.start()


def test_non_executable_command_is_a_spawn_error(tmp_path: Path) -> None:
    """A file without the execute bit cannot be started."""
    script = tmp_path / "x.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnError, match="not executable"):
        JobProcess([str(script)], {}, label="j").start()


def test_empty_command_is_a_spawn_error() -> None:
    """An empty command string is rejected before anything runs."""
    with pytest.raises(SpawnError, match="no command"):
        JobProcess([""], {}, label="j")


def test_terminate_sends_sigterm_to_the_group() -> None:
    """terminate() stops a cooperative child with SIGTERM."""
    proc = JobProcess(
        [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        dict(os.environ),
        label="j",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    proc.start()
    started = time.monotonic()
    code = proc.terminate(grace=10)
    assert -signal.SIGTERM == code
    assert time.monotonic() - started < 5
    assert proc.terminated_by_us


def test_terminate_escalates_to_sigkill() -> None:
    """A child that ignores SIGTERM is killed after the grace period."""
    ready = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    proc = JobProcess(
        [PY, "-c", ready + "print('ready', flush=True); time.sleep(60)"],
        dict(os.environ),
        label="j",
        stdout=(out := io.StringIO()),
        stderr=io.StringIO(),
    )
    proc.start()
    deadline = time.monotonic() + 10
    while "ready" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    assert -signal.SIGKILL == proc.terminate(grace=0.3)
    assert 0.3 <= time.monotonic() - started < 5


def test_grandchildren_are_stopped_too(tmp_path: Path) -> None:
    """Signals reach the whole group, so a wrapper's children stop as well (W-10)."""
    pidfile = tmp_path / "pid"
    child = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
        "time.sleep(60)"
    )
    wrapper = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    )
    proc = JobProcess(
        [PY, "-c", wrapper],
        dict(os.environ),
        label="j",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    proc.start()
    deadline = time.monotonic() + 10
    while (
        not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    grandchild = int(pidfile.read_text())
    proc.terminate(grace=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)


def test_terminate_before_start_is_harmless() -> None:
    """Cancelling before the child exists only records the request."""
    proc = JobProcess(["true"], {}, label="j")
    assert proc.terminate(grace=1) is None
    assert proc.terminated_by_us


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exit code 0"),
        (3, "exit code 3"),
        (-9, "signal SIGKILL"),
        (-15, "signal SIGTERM"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    """Return codes read as words."""
    assert text == describe_exit(code)
