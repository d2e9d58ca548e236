"""
`kelpie up`: server, workers and file storage on one machine, stopped by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _start_up(root: Path, workers: int) -> tuple[subprocess.Popen[str], str, str]:
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
    proc, url, key = _start_up(root, workers=1)
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
            proc.send_signal(signal.SIGINT)
            assert 0 == proc.wait(timeout=60)
            with pytest.raises(APIConnectionError):
                client.with_options(max_retries=0).get_job(job.id)
        assert (root / "admin-key").read_text().strip() == key.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_shows_a_job_surviving_its_worker(tmp_path: Path) -> None:
    """`kelpie demo` kills the job's worker and the job completes on the other."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "demo",
            "--steps",
            "12",
            "--storage",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    assert "Killing local-" in proc.stdout
    assert "Completed after 2 attempts" in proc.stdout
    result = re.search(r"result in storage: (\{.*\})", proc.stdout)
    assert result is not None
    assert '"count": 12' in result.group(1)
