"""
`kelpie up`: server, workers and file storage on one machine, stopped by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.cli._up import _REPUTATION_SETTINGS
from kelpie_sdk.client import Client
from kelpie_sdk.errors import APIConnectionError
from kelpie_sdk.models import Job, JobStatus

from .conftest import EXAMPLES, wait_for

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


def _up_and_banner(root: Path, workers: int) -> tuple[subprocess.Popen[str], str, str]:
    """`kelpie up` on a free port; returns the process, the API URL and key."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "up",
            "--workers",
            str(workers),
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
    banner = _read_banner(proc)
    url = re.search(r"API URL:\s+(\S+)", banner)
    key = re.search(r"API key:\s+(\S+)", banner)
    assert url is not None
    assert key is not None
    return proc, url.group(1), key.group(1)


def _worker_pid_of(root: Path, index: int) -> int:
    """The pid of `kelpie up`'s worker <index>: the parent of its running job."""
    state = json.loads((root / "workers" / str(index) / "state.json").read_text())
    status = Path(f"/proc/{state['job']['pid']}/status").read_text()
    ppid = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
    assert ppid is not None
    return int(ppid.group(1))


def test_readme_submit_example_under_up(tmp_path: Path) -> None:
    """
    The README's `sync={}` jobs on one worker each count from 0 on their own, and
    a job whose worker is SIGKILLed resumes from its own checkpoint elsewhere.
    """
    root = tmp_path / "cluster"
    proc, url, key = _up_and_banner(root, workers=1)
    extra: subprocess.Popen[bytes] | None = None
    try:
        with Client(url, key) as client:

            def submit(name: str, count_to: int, step_s: float) -> str:
                job = client.submit_job(
                    command=sys.executable,
                    arguments=[str(EXAMPLES / "count.py")],
                    environment={
                        "COUNT_TO": str(count_to),
                        "STEP_SECONDS": str(step_s),
                        "RESULT_DIR": str(tmp_path / name),
                    },
                    container_group_id="grp",
                    sync={},
                    heartbeat_interval=1,
                )
                return job.id

            def finished(job_id: str) -> Job | None:
                job = client.get_job(job_id)
                return job if job.status.finished else None

            # Three jobs, one worker: each counts from 0 itself.
            ids = [submit(f"r{i}", 5, 0.05) for i in range(3)]
            for job_id in ids:
                done = wait_for(lambda j=job_id: finished(j), timeout=90)
                assert JobStatus.COMPLETED == done.status
                assert "local-0" == done.machine_id
            for i in range(3):
                result = json.loads((tmp_path / f"r{i}" / "result.json").read_text())
                assert {"count": 5, "starts": [0]} == result
            for job_id in ids:
                ckpt = root / "storage" / "kelpie-checkpoints" / job_id / "steps"
                assert ckpt.is_dir()

            # A second node, then a long job whose worker vanishes mid-way.
            home = tmp_path / "extra"
            home.mkdir()
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("KELPIE_", "SALAD_"))
            }
            env.update(
                KELPIE_API_URL=url,
                KELPIE_API_KEY=key,
                SALAD_CONTAINER_GROUP_ID="grp",
                SALAD_MACHINE_ID="extra",
                KELPIE_STORAGE_URL=f"file://{root / 'storage'}",
                KELPIE_STATE_FILE=str(home / "state.json"),
                KELPIE_LONG_POLL_S="5",
            )
            with (home / "worker.log").open("wb") as log:
                extra = subprocess.Popen(
                    [sys.executable, "-m", "kelpie_sdk.worker"],
                    env=env,
                    cwd=home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            long_id = submit("long", 40, 0.15)

            def progressed() -> Job | None:
                job = client.get_job(long_id)
                step = int((job.progress or {}).get("step") or 0)
                return job if step >= 6 else None

            holder = wait_for(progressed, timeout=60).machine_id
            if holder == "extra":
                extra.send_signal(signal.SIGKILL)
                extra.wait(timeout=10)
            else:
                os.kill(_worker_pid_of(root, 0), signal.SIGKILL)
            done = wait_for(lambda: finished(long_id), timeout=120)
            assert (JobStatus.COMPLETED, 2) == (done.status, done.attempt)
            result = json.loads((tmp_path / "long" / "result.json").read_text())
            assert 40 == result["count"]
            assert 2 == len(result["starts"])
            assert 0 == result["starts"][0]
            assert result["starts"][1] >= 6
    finally:
        if extra is not None and extra.poll() is None:
            extra.kill()
            extra.wait()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def test_a_quarantined_worker_comes_back_as_a_new_machine(
    tmp_path: Path, stopper: list[subprocess.Popen[str]], monkeypatch: Any
) -> None:
    """The server quarantines a machine (one failure here); `kelpie up` replaces
    its worker, which exited 5, by one with a new machine id."""
    from kelpie_sdk.server import ReputationPolicy

    assert _REPUTATION_SETTINGS == frozenset(ReputationPolicy.ENV.values())
    monkeypatch.setenv("KELPIE_QUARANTINE_FAILURES", "1")
    monkeypatch.setenv("KELPIE_QUARANTINE_JOBS", "1")
    monkeypatch.setenv("KELPIE_QUARANTINE_RATE", "0")
    proc = _start_up(tmp_path / "cluster", "--workers", "1")
    stopper.append(proc)
    url, key = _url_and_key(_read_banner(proc))
    with Client(url, key) as client:
        job = client.submit_job(
            command=sys.executable,
            arguments=["-c", "raise SystemExit(1)"],
            container_group_id="grp",
            max_failures=2,
            sync={},
        )
        failed = wait_for(
            lambda: (j := client.get_job(job.id)).status is JobStatus.FAILED and j,
            timeout=90,
        )
        machines = {m.machine_id: m for m in client.machines().machines}
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert 2 == failed.num_failures
    assert "was quarantined by the server" in out
    assert "as machine local-0-1" in out
    assert machines["local-0"].quarantined_until is not None
    assert 1 == machines["local-0-1"].failures
