"""
End-to-end fixtures: the real server in-process, workers as subprocesses,
storage on local files or on moto's S3 server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.storage import Storage
from kelpie_sdk.testing import ServerHandle, run_server

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "jobs"
GROUP = "e2e-group"


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


@attrs.define
class WorkerProc:
    """A worker subprocess and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    home: Path
    env: dict[str, str]

    @property
    def state_file(self) -> Path:
        return Path(self.env["KELPIE_STATE_FILE"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node vanishes."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self) -> None:
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)


StartWorker = Callable[..., WorkerProc]


@attrs.frozen
class StorageSetup:
    """Where jobs' files live for one test."""

    kind: str
    url: str
    bucket: str
    storage: Storage


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    """A fresh API server (SQLite in a temporary directory) on 127.0.0.1."""
    with run_server() as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    """A client authenticated as the server's admin."""
    with Client(server.url, server.admin_key) as c:
        yield c


@pytest.fixture
def file_storage(tmp_path: Path) -> Iterator[StorageSetup]:
    """Local file storage with one bucket."""
    root = tmp_path / "store"
    (root / "bkt").mkdir(parents=True)
    storage = Storage(f"file://{root}")
    yield StorageSetup("file", f"file://{root}", "bkt", storage)
    storage.close()


@pytest.fixture
def s3_storage(s3_bucket: str) -> Iterator[StorageSetup]:
    """Moto's S3 server with a fresh bucket."""
    storage = Storage("s3://")
    yield StorageSetup("s3", "s3://", s3_bucket, storage)
    storage.close()


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest) -> StorageSetup:
    """Each storage kind in turn."""
    fixture = "file_storage" if request.param == "file" else "s3_storage"
    setup: StorageSetup = request.getfixturevalue(fixture)
    return setup


@pytest.fixture
def start_worker(
    server: ServerHandle, tmp_path: Path
) -> Iterator[Callable[..., WorkerProc]]:
    """Start ``python -m kelpie_sdk.worker`` subprocesses; all are killed at the end."""
    procs: list[WorkerProc] = []

    def start(
        name: str = "w1",
        *,
        storage_url: str | None = None,
        home: Path | None = None,
        unset: tuple[str, ...] = (),
        **env: str,
    ) -> WorkerProc:
        home = home or tmp_path / name
        home.mkdir(parents=True, exist_ok=True)
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KELPIE_", "SALAD_"))
        }
        full_env.update(
            PYTHONUNBUFFERED="1",
            KELPIE_API_URL=server.url,
            KELPIE_API_KEY=server.admin_key,
            SALAD_CONTAINER_GROUP_ID=GROUP,
            SALAD_MACHINE_ID=f"machine-{name}",
            KELPIE_STATE_FILE=str(home / "state.json"),
            INPUT_DIR=str(home / "input"),
            OUTPUT_DIR=str(home / "output"),
            CHECKPOINT_DIR=str(home / "checkpoint"),
            KELPIE_LONG_POLL_S="5",
            KELPIE_KILL_GRACE_S="3",
            KELPIE_LOG_LEVEL="debug",
        )
        if storage_url is not None:
            full_env["KELPIE_STORAGE_URL"] = storage_url
        full_env.update(env)
        for name in unset:
            full_env.pop(name, None)
        log_path = home / f"worker-{len(procs)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "kelpie_sdk.worker"],
                env=full_env,
                cwd=home,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = WorkerProc(name, popen, log_path, home, full_env)
        procs.append(proc)
        return proc

    yield start
    # A graceful stop (which also lets coverage write its data), then SIGKILL.
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(timeout=10)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """On failure, attach the workers' logs to the report."""
    if call.when != "call" or call.excinfo is None:
        return
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp is None:
        return
    for log in sorted(Path(tmp).glob("*/worker-*.log")):
        item.add_report_section(
            "call", f"log {log.parent.name}/{log.name}", log.read_text()
        )
