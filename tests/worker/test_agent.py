"""
Agent helpers: safe wiping, report delivery, recognising a job's process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kelpie_sdk.errors import (
    APIConnectionError,
    APIStatusError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    ServerError,
)
from kelpie_sdk.worker._agent import _deliver, _is_dangerous, _pid_belongs_to_job, _wipe


def test_dangerous_directories_are_recognised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/, home, the working directory and its parents are never wiped."""
    monkeypatch.chdir(tmp_path)
    assert _is_dangerous(Path("/"))
    assert _is_dangerous(Path.home())
    assert _is_dangerous(tmp_path)
    assert _is_dangerous(tmp_path.parent)
    assert not _is_dangerous(tmp_path / "input")


def test_wipe_empties_and_creates(tmp_path: Path) -> None:
    """A wiped directory exists and is empty, whatever was in it."""
    target = tmp_path / "dir"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "f").write_text("x")
    (target / "g").write_text("y")
    (target / "link").symlink_to(tmp_path)
    _wipe(target)
    assert [] == list(target.iterdir())
    assert tmp_path.exists()
    _wipe(tmp_path / "new")
    assert (tmp_path / "new").is_dir()


def test_wipe_refuses_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pointing a job directory at the working directory leaves it alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")
    _wipe(tmp_path)
    assert (tmp_path / "keep").exists()


def _calls(*outcomes: BaseException | None) -> tuple[Callable[[], None], list[int]]:
    made: list[int] = []

    def call() -> None:
        made.append(1)
        outcome = outcomes[len(made) - 1]
        if outcome is not None:
            raise outcome

    return call, made


def _status(cls: type[APIStatusError], code: int) -> APIStatusError:
    return cls("x", status_code=code)


def test_deliver_retries_transient_errors() -> None:
    """Server errors and lost connections are retried with backoff."""
    call, made = _calls(_status(ServerError, 503), APIConnectionError("down"), None)
    sleeps: list[float] = []
    assert _deliver(call, what="report", attempts=5, sleep=sleeps.append)
    assert (3, [1.0, 2.0]) == (len(made), sleeps)


@pytest.mark.parametrize(
    "error",
    [
        _status(ConflictError, 409),
        _status(NotFoundError, 404),
        _status(BadRequestError, 400),
    ],
    ids=["conflict", "not-found", "bad-request"],
)
def test_deliver_gives_up_at_once_on_refusals(error: Exception) -> None:
    """A 409 (someone else holds the job) or other 4xx is not retried and not raised."""
    call, made = _calls(error)
    assert not _deliver(call, what="report", attempts=5, sleep=lambda s: None)
    assert 1 == len(made)


def test_deliver_never_raises_after_its_attempts() -> None:
    """An outage longer than the attempts is logged, not raised (W-9)."""
    call, made = _calls(*[APIConnectionError("down")] * 3)
    assert not _deliver(call, what="report", attempts=3, sleep=lambda s: None)
    assert 3 == len(made)


def test_job_process_is_recognised_by_its_environment() -> None:
    """Only a process whose environment names the job counts as the job's."""
    env = dict(os.environ, KELPIE_JOB_ID="job-42")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], env=env
    )
    try:
        deadline = time.monotonic() + 5
        while not _pid_belongs_to_job(proc.pid, "job-42"):
            assert time.monotonic() < deadline, "the job's process was not recognised"
            time.sleep(0.01)
        assert not _pid_belongs_to_job(proc.pid, "job-4")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not _pid_belongs_to_job(proc.pid, "job-42")
