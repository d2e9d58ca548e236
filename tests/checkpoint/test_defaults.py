"""
Correct by default: SIGTERM saves inside a worker's job, and a short run keeps its result.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from kelpie_sdk import checkpoint
from kelpie_sdk.checkpoint import Checkpointer, _signals

# A job in the recipe's shape, with the default policy (every 300 s): it would
# never save on its own within the test.
JOB = """
import sys, time
from kelpie_sdk import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], **eval(sys.argv[2]))
state = {"done": 0}
print("ready", flush=True)
for step in range(100_000):
    time.sleep(0.01)
    state["done"] = step + 1
    if ckpt.should_save(step + 1):
        ckpt.save(state, step=step + 1)
print("the loop ended", flush=True)
"""


def _start_job(
    tmp_path: Path, job_id: str | None, kwargs: str = "{}"
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KELPIE_")}
    if job_id is not None:
        env["KELPIE_JOB_ID"] = job_id
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.Popen(
        [sys.executable, str(script), f"file://{tmp_path}/ck", kwargs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert "ready\n" == proc.stdout.readline(), proc.communicate(timeout=30)
    return proc


def _sigterm(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_worker_job_saves_on_sigterm(tmp_path: Path) -> None:
    """Under the worker, SIGTERM saves the current step, then ends the process."""
    proc = _start_job(tmp_path, "job-1")
    code, err = _sigterm(proc)
    assert -signal.SIGTERM == code, err
    ckpt = Checkpointer(f"file://{tmp_path}/ck")
    step = ckpt.latest_step()
    assert step is not None, err
    assert {"done": step} == ckpt.load()
    ckpt.close()


@pytest.mark.parametrize(
    ("job_id", "kwargs"), [(None, "{}"), ("job-1", "{'preemption': False}")]
)
def test_sigterm_kills_at_once_without_preemption(
    tmp_path: Path, job_id: str | None, kwargs: str
) -> None:
    """Outside the worker (or with preemption=False) SIGTERM still kills at once."""
    proc = _start_job(tmp_path, job_id, kwargs)
    code, err = _sigterm(proc)
    assert -signal.SIGTERM == code, err
    assert Checkpointer(f"file://{tmp_path}/ck").latest_step() is None


def test_preemption_true_outside_the_worker(tmp_path: Path) -> None:
    """preemption=True turns the deferring handler on without KELPIE_JOB_ID."""
    proc = _start_job(tmp_path, None, "{'preemption': True}")
    code, err = _sigterm(proc)
    assert -signal.SIGTERM == code, err
    assert Checkpointer(f"file://{tmp_path}/ck").latest_step() is not None


def test_forked_child_still_dies_on_sigterm(tmp_path: Path) -> None:
    """A forked child (a data-loader worker) is not kept alive by the handler."""
    script = """
        import os, signal, sys, time
        from kelpie_sdk import checkpoint
        ckpt = checkpoint.Checkpointer(sys.argv[1])
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited")
        """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KELPIE_")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), f"file://{tmp_path}/ck"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "KELPIE_JOB_ID": "job-1"},
        check=False,
    )
    assert f"{int(signal.SIGTERM)}\n" == result.stdout, result.stderr


@pytest.fixture
def in_worker_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """KELPIE_JOB_ID set; SIGTERM's handler and the flag restored afterwards."""
    monkeypatch.setenv("KELPIE_JOB_ID", "job-1")
    previous = signal.getsignal(signal.SIGTERM)
    _signals._reset_preempted()
    yield
    signal.signal(signal.SIGTERM, previous)
    _signals._reset_preempted()


@pytest.fixture
def memory_url() -> str:
    """A fresh memory:// URL."""
    import uuid

    return f"memory://defaults-{uuid.uuid4().hex[:12]}"


@pytest.mark.usefixtures("in_worker_job")
def test_previous_python_handler_is_chained(memory_url: str) -> None:
    """A handler installed before the Checkpointer still runs, after the flag is set."""
    calls: list[bool] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(checkpoint.preempted())

    signal.signal(signal.SIGTERM, previous)
    ckpt = Checkpointer(memory_url)
    assert not ckpt.should_save(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert [True] == calls
    assert ckpt.should_save(1)
    # The previous handler decides what SIGTERM does: nothing is deferred.
    assert not _signals.termination_pending()
    ckpt.close()


@pytest.mark.usefixtures("in_worker_job")
def test_ignored_sigterm_stays_ignored(memory_url: str) -> None:
    """With SIGTERM ignored, the flag is set and nothing else happens."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ckpt = Checkpointer(memory_url)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoint.preempted()
    assert not _signals.termination_pending()
    ckpt.close()


@pytest.mark.usefixtures("in_worker_job")
def test_explicit_handler_replaces_the_deferring_one(memory_url: str) -> None:
    """install_preemption_handler() means "I exit myself": nothing is deferred."""
    ckpt = Checkpointer(memory_url)
    checkpoint.install_preemption_handler()
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoint.preempted()
    assert not _signals.termination_pending()
    ckpt.close()


@pytest.mark.usefixtures("in_worker_job")
def test_created_off_the_main_thread(
    memory_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Off the main thread no handler can be installed: a warning says what to do."""
    before = signal.getsignal(signal.SIGTERM)
    made: list[Checkpointer] = []
    with caplog.at_level(logging.WARNING, logger="kelpie_sdk.checkpoint"):
        thread = threading.Thread(target=lambda: made.append(Checkpointer(memory_url)))
        thread.start()
        thread.join()
    assert before == signal.getsignal(signal.SIGTERM)
    assert "install_preemption_handler() from the main thread" in caplog.text
    made[0].close()


def _loop(ckpt: Checkpointer, total: int, work: Callable[[int], Any]) -> Any:
    start = ckpt.latest_step()
    state = ckpt.load() if start is not None else {"done": 0}
    for step in range(start or 0, total):
        state["done"] = work(step)
        if ckpt.should_save(step + 1):
            ckpt.save(state, step=step + 1)
    ckpt.finish(state, step=total)
    return state


def test_finish_keeps_the_result_of_a_short_run(memory_url: str) -> None:
    """A run shorter than the save interval still leaves its final state."""
    ckpt = Checkpointer(memory_url)
    _loop(ckpt, 5, lambda step: step + 1)
    assert [5] == Checkpointer(memory_url).steps()
    assert {"done": 5} == Checkpointer(memory_url).load()


def test_finish_after_a_save_of_the_last_step(memory_url: str) -> None:
    """finish() saves nothing when the policy already saved that step."""
    _loop(Checkpointer(memory_url, every_steps=1), 3, lambda step: step + 1)
    assert [1, 2, 3] == Checkpointer(memory_url).steps()


def test_finish_of_a_finished_run(memory_url: str) -> None:
    """A run restarted after it finished does nothing and raises nothing."""
    _loop(Checkpointer(memory_url), 4, lambda step: step + 1)

    def fail(step: int) -> int:
        raise AssertionError(f"step {step} ran again")

    ckpt = Checkpointer(memory_url)
    assert {"done": 4} == _loop(ckpt, 4, fail)
    assert [4] == Checkpointer(memory_url).steps()
    with pytest.raises(checkpoint.CheckpointError, match="closed"):
        ckpt.save({}, step=9)
