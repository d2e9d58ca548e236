"""
The worker through API outages and cancels that arrive before the command runs.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.errors import KelpieError
from kelpie_sdk.models import JobStatus
from kelpie_sdk.storage import Storage, TransferResult
from kelpie_sdk.testing import ServerHandle
from kelpie_sdk.worker import Outcome, Worker, WorkerConfig

from .conftest import GROUP, StartWorker, wait_for

pytestmark = pytest.mark.slow

PY = sys.executable


class _Server:
    """`python -m kelpie_sdk.server` on a fixed port, restartable."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_urlsafe(32)
        self.db = f"sqlite:///{tmp / 'outage.db'}"
        self.log = (tmp / "server.log").open("ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, KELPIE_ADMIN_KEY=self.key)
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "kelpie_sdk.server",
                "--port",
                str(self.port),
                "--database",
                self.db,
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        with Client(self.url, self.key, max_retries=0) as client:

            def up() -> bool:
                try:
                    client.me()
                except KelpieError:
                    return False
                return True

            wait_for(up, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[_Server]:
    """A server subprocess that a test can kill and start again."""
    server = _Server(tmp_path)
    server.start()
    yield server
    server.stop()
    server.log.close()


def test_job_survives_an_api_outage(
    restartable: _Server, start_worker: StartWorker, tmp_path: Path
) -> None:
    """The server goes away mid-job and comes back: the job runs on and completes."""
    marker = tmp_path / "running"
    worker = start_worker(
        KELPIE_API_URL=restartable.url, KELPIE_API_KEY=restartable.key
    )
    script = f"import time; open({str(marker)!r}, 'w').close(); time.sleep(14)"
    with Client(restartable.url, restartable.key) as client:
        job = client.submit_job(
            command=PY,
            arguments=["-c", script],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=8,
        )
        wait_for(marker.exists)
        restartable.stop()
        # The heartbeat at 8 s fails, and its retries until the server is back;
        # the lease (16 s from the last heartbeat) still holds then.
        time.sleep(9)
        restartable.start()
        done = wait_for(lambda: (j := client.get_job(job.id)).status.finished and j)
    assert (JobStatus.COMPLETED, 1, 0) == (done.status, done.attempt, done.num_failures)
    assert "heartbeat failed" in worker.log()


class _GatedStorage(Storage):
    """File storage whose downloads wait for a gate to open."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def download_prefix(self, *args: Any, **kwargs: Any) -> TransferResult:
        self.entered.set()
        self.gate.wait(30)
        return super().download_prefix(*args, **kwargs)


def test_cancel_during_download_never_runs_the_command(
    server: ServerHandle, client: Client, tmp_path: Path
) -> None:
    """A cancel that arrives while inputs download stops the job before it starts (W-2)."""
    root = tmp_path / "store"
    (root / "b" / "in").mkdir(parents=True)
    (root / "b" / "in" / "x").write_text("x")
    storage = _GatedStorage(f"file://{root}")
    config = WorkerConfig.from_env(
        {},
        api_url=server.url,
        api_key=server.admin_key,
        machine_id="m1",
        container_group_id=GROUP,
        state_file=tmp_path / "state.json",
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        long_poll_s=1.0,
        kill_grace_s=2.0,
    )
    worker = Worker(config, storage_factory=lambda: storage)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    marker = tmp_path / "ran"
    try:
        job = client.submit_job(
            command=PY,
            arguments=["-c", f"open({str(marker)!r}, 'w').close()"],
            container_group_id=GROUP,
            input_bucket="b",
            input_prefix="in/",
            checkpoint_bucket="b",
            checkpoint_prefix="ck/",
            output_bucket="b",
            output_prefix="out/",
            heartbeat_interval=1,
        )
        assert storage.entered.wait(30)
        client.cancel(job.id)
        wait_for(lambda: worker._slots[0].state.history, timeout=10)
        assert Outcome.CANCELED.value == worker._slots[0].state.history[-1]["outcome"]
        storage.gate.set()
        follow = client.submit_job(
            command=PY,
            arguments=["-c", "pass"],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=1,
        )
        done = wait_for(lambda: (j := client.get_job(follow.id)).status.finished and j)
        assert JobStatus.COMPLETED == done.status
        assert not marker.exists()
        assert JobStatus.CANCELED == client.get_job(job.id).status
    finally:
        storage.gate.set()
        worker.stop()
        runner.join(30)
