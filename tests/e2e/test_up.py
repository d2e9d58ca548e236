"""
`kelpie up`: server, workers and file storage on one machine, stopped by Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.errors import APIConnectionError
from kelpie_sdk.models import JobStatus

from .conftest import wait_for

pytestmark = pytest.mark.slow


def _read_banner(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            return "".join(lines)
    raise AssertionError("no banner from kelpie up:\n" + "".join(lines))


def test_up_runs_jobs_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """The printed URL and key work, jobs complete into the storage, Ctrl-C stops all."""
    root = tmp_path / "cluster"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "up",
            "--workers",
            "2",
            "--port",
            "0",
            "--storage",
            str(root),
            "--container-group-id",
            "grp",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = _read_banner(proc)
        url = re.search(r"API URL:\s+(\S+)", banner)
        key = re.search(r"API key:\s+(\S+)", banner)
        assert url is not None
        assert key is not None
        (root / "storage" / "local" / "in").mkdir(parents=True)
        (root / "storage" / "local" / "in" / "x.txt").write_text("21")
        script = (
            "import os; x = open(os.path.join(os.environ['INPUT_DIR'], 'x.txt')).read(); "
            "open(os.path.join(os.environ['OUTPUT_DIR'], 'y.txt'), 'w')"
            ".write(str(2 * int(x)))"
        )
        with Client(url.group(1), key.group(1)) as client:
            job = client.submit_job(
                command=sys.executable,
                arguments=["-c", script],
                container_group_id="grp",
                input_bucket="local",
                input_prefix="in/",
                checkpoint_bucket="local",
                checkpoint_prefix="ck/",
                output_bucket="local",
                output_prefix="out/",
                heartbeat_interval=1,
            )
            done = wait_for(
                lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
            )
            assert JobStatus.COMPLETED == done.status
            assert "42" == (root / "storage" / "local" / "out" / "y.txt").read_text()
            # The example the banner suggests works as printed.
            [line] = [x for x in banner.splitlines() if "kelpie submit" in x]
            argv = shlex.split(line)[1:]
            env = dict(os.environ, KELPIE_API_URL=url.group(1))
            env["KELPIE_API_KEY"] = key.group(1)
            tried = subprocess.run(
                [sys.executable, "-m", "kelpie_sdk", *argv],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            assert 0 == tried.returncode, tried.stderr
            [example] = [j for j in client.list_jobs() if j.command == "python"]
            assert ("-c", "print(42)") == example.arguments
            proc.send_signal(signal.SIGINT)
            assert 0 == proc.wait(timeout=60)
            with pytest.raises(APIConnectionError):
                client.with_options(max_retries=0).get_job(job.id)
        assert (root / "admin-key").read_text().strip() == key.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start_up(root: Path, *extra: str, port: str = "0") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "up",
            "--port",
            port,
            "--storage",
            str(root),
            "--container-group-id",
            "grp",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _url_and_key(banner: str) -> tuple[str, str]:
    url = re.search(r"API URL:\s+(\S+)", banner)
    key = re.search(r"API key:\s+(\S+)", banner)
    assert url is not None
    assert key is not None
    return url.group(1), key.group(1)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _gone(pid: int) -> bool:
    """Whether a process has exited (a zombie left to an init that never reaps counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[str]]]:
    """Popens (and the pids of their children) killed at the end of a test."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


_SLEEPER = "import time\nwhile True:\n    time.sleep(0.1)\n"


def test_ctrl_c_releases_a_running_job_once(
    tmp_path: Path, stopper: list[subprocess.Popen[str]]
) -> None:
    """On Ctrl-C no stopping worker claims the job another one released."""
    root = tmp_path / "cluster"
    proc = _start_up(root, "--workers", "3")
    stopper.append(proc)
    url, key = _url_and_key(_read_banner(proc))
    with Client(url, key) as client:
        job = client.submit_job(
            command=sys.executable,
            arguments=["-c", _SLEEPER],
            container_group_id="grp",
            heartbeat_interval=1,
            sync={},
        )
        running = wait_for(
            lambda: (j := client.get_job(job.id)).status is JobStatus.RUNNING and j,
            timeout=60,
        )
        assert 1 == running.attempt
        time.sleep(1.0)  # the idle workers are back in their long polls
        proc.send_signal(signal.SIGINT)
        assert 0 == proc.wait(timeout=120)
    # Look at the job with a cluster of no workers on the same database.
    again = _start_up(root, "--workers", "0")
    stopper.append(again)
    url, key = _url_and_key(_read_banner(again))
    with Client(url, key) as client:
        after = client.get_job(job.id)
    again.send_signal(signal.SIGINT)
    assert 0 == again.wait(timeout=60)
    assert (JobStatus.PENDING, 1) == (after.status, after.attempt)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_stops_everything(
    tmp_path: Path, stopper: list[subprocess.Popen[str]], sig: signal.Signals
) -> None:
    """Closing the terminal (SIGHUP) stops the server and the workers like Ctrl-C."""
    proc = _start_up(tmp_path / "cluster", "--workers", "2")
    stopper.append(proc)
    _read_banner(proc)
    children = _children(proc.pid)
    assert 3 == len(children)
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert 0 == proc.returncode, out
        assert "Stopped." in out
        assert all(_gone(pid) for pid in children)
    finally:
        _kill_pids(children)


def test_sigkill_of_up_takes_the_children_down(
    tmp_path: Path, stopper: list[subprocess.Popen[str]]
) -> None:
    """Even when `kelpie up` is killed outright, its server and workers exit."""
    proc = _start_up(tmp_path / "cluster", "--workers", "2")
    stopper.append(proc)
    url, key = _url_and_key(_read_banner(proc))
    children = _children(proc.pid)
    assert 3 == len(children)
    try:
        proc.kill()
        proc.wait()
        wait_for(lambda: all(_gone(pid) for pid in children), timeout=90)
        with (
            Client(url, key, max_retries=0) as client,
            pytest.raises(APIConnectionError),
        ):
            client.me()
    finally:
        _kill_pids(children)


def test_second_up_on_a_taken_port_says_so(
    tmp_path: Path, stopper: list[subprocess.Popen[str]]
) -> None:
    """A second `kelpie up` on the same port and storage fails clearly."""
    root = tmp_path / "cluster"
    first = _start_up(root, "--workers", "0")
    stopper.append(first)
    url, _ = _url_and_key(_read_banner(first))
    port = url.rsplit(":", 1)[1]
    second = _start_up(root, "--workers", "1", port=port)
    stopper.append(second)
    out, _ = second.communicate(timeout=60)
    assert 1 == second.returncode, out
    assert "Kelpie is up." not in out
    assert f"Error: port {port} on 127.0.0.1 is already in use" in out
    assert first.poll() is None
    first.send_signal(signal.SIGINT)
    assert 0 == first.wait(timeout=60)
