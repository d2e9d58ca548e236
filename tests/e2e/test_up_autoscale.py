"""
`kelpie up --autoscale`: workers start when jobs arrive and stop when idle.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus

from .conftest import wait_for
from .test_up import _read_banner

pytestmark = pytest.mark.slow


def _processes(root: Path) -> int:
    """Live worker processes of this cluster (their environment names its root)."""
    alive = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if b"kelpie_sdk.worker" in cmdline and str(root).encode() in environ:
            alive += state != "Z"
    return alive


def test_up_autoscale_starts_workers_with_work_and_stops_them_idle(
    tmp_path: Path,
) -> None:
    """No worker runs while idle; jobs start workers (up to --workers), idle stops them."""
    root = tmp_path / "cluster"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "up",
            "--autoscale",
            "--workers",
            "2",
            "--idle-threshold",
            "1",
            "--autoscale-interval",
            "0.3",
            "--autoscale-window",
            "1",
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
    log = root / "autoscaler.log"
    try:
        banner = _read_banner(proc)
        assert "autoscaled, 0 to 2" in banner
        url = re.search(r"API URL:\s+(\S+)", banner)
        key = re.search(r"API key:\s+(\S+)", banner)
        assert url is not None
        assert key is not None
        wait_for(lambda: "reason='stopped, idle'" in log.read_text(), timeout=30)
        assert 0 == _processes(root)  # no work, no workers
        with Client(url.group(1), key.group(1)) as client:
            jobs = [
                client.submit_job(
                    command=sys.executable,
                    arguments=["-c", "import time; time.sleep(1)"],
                    container_group_id="grp",
                    sync={},
                    heartbeat_interval=1,
                )
                for _ in range(3)
            ]
            wait_for(lambda: _processes(root) == 2, timeout=60)
            for job in jobs:
                done = wait_for(
                    lambda j=job: (x := client.get_job(j.id)).status.finished and x,
                    timeout=90,
                )
                assert JobStatus.COMPLETED == done.status
        text = log.read_text()
        assert "pending=3" in text
        assert "actions=start,set_replicas" in text
        assert "target=2" in text  # capped at --workers
        wait_for(lambda: "actions=stop" in log.read_text(), timeout=60)
        wait_for(lambda: _processes(root) == 0, timeout=60)
        proc.send_signal(signal.SIGINT)
        assert 0 == proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_autoscale_rejects_inconsistent_limits(tmp_path: Path) -> None:
    """--min-workers above --workers is a usage error, before anything starts."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "up",
            "--autoscale",
            "--workers",
            "1",
            "--min-workers",
            "2",
            "--storage",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 2 == result.returncode
    assert "--min-workers <= --workers" in result.stdout
    assert not (tmp_path / "c" / "kelpie.db").exists()
