"""
`kelpie up`: server, workers and file storage on one machine, stopped by Ctrl-C.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
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
            proc.send_signal(signal.SIGINT)
            assert 0 == proc.wait(timeout=60)
            with pytest.raises(APIConnectionError):
                client.with_options(max_retries=0).get_job(job.id)
        assert (root / "admin-key").read_text().strip() == key.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
