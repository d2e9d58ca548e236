"""
Two ``kelpie server --autoscale salad`` processes on one database: one leads,
the other takes over when it stops.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from kelpie_sdk.client import Client
from tests.salad_fake import FakeSalad, run_fake_salad

GROUP = "44444444-4444-4444-8444-444444444444"
KEY = "salad-test-key"

#: The servers' admin key (at least 32 characters).
ADMIN_KEY = "autoscale-admin-key-" + "a" * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.1)


class _Server:
    def __init__(
        self, tmp: pathlib.Path, name: str, db: pathlib.Path, fake: FakeSalad
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SALAD_", "KELPIE_"))
        }
        env.update(KELPIE_ADMIN_KEY=ADMIN_KEY, SALAD_API_KEY=KEY)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kelpie_sdk",
                "server",
                "--port",
                str(self.port),
                "--database",
                f"sqlite:///{db}",
                "--autoscale",
                "salad",
                "--autoscale-interval",
                "0.3",
                "--autoscale-window",
                "1",
                "--salad-api-url",
                fake.url,
                "--salad-organization",
                "acme",
                "--salad-project",
                "proj",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            requests.get(self.url + "/health", timeout=1)
        except requests.ConnectionError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def decisions(self) -> int:
        return self.log().count(f"autoscale group={GROUP}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.mark.slow
def test_one_server_leads_and_the_other_takes_over(tmp_path: pathlib.Path) -> None:
    with run_fake_salad(KEY) as fake:
        fake.add_group("acme", "proj", "workers", status="stopped", replicas=0)
        db = tmp_path / "k.db"
        first = _Server(tmp_path, "first", db, fake)
        _wait(first.ready)
        second = _Server(tmp_path, "second", db, fake)
        servers = [first, second]
        try:
            _wait(second.ready)
            with Client(first.url, ADMIN_KEY) as client:
                client.create_scaling_rule(
                    container_group_id=GROUP,
                    min_replicas=0,
                    max_replicas=5,
                    idle_threshold_seconds=1,
                    container_group_name="workers",
                )
                jobs = [
                    client.submit_job(command="true", container_group_id=GROUP, sync={})
                    for _ in range(2)
                ]
                _wait(lambda: fake.group("acme", "proj", "workers")["replicas"] == 2)
                _wait(lambda: first.decisions() >= 4)  # several passes of both
                leaders = [s for s in servers if s.decisions()]
                assert [first] == leaders, [s.log() for s in servers]
                assert "this process leads" in first.log()
                first.stop()
            with Client(second.url, ADMIN_KEY) as client:
                for job in jobs:
                    client.cancel(job.id)
            _wait(lambda: fake.group("acme", "proj", "workers")["status"] == "stopped")
            assert second.decisions() > 0
            assert "actions=stop" in second.log()
            assert "running" != fake.group("acme", "proj", "workers")["status"]
        finally:
            for server in servers:
                server.stop()


def test_autoscale_without_a_key_is_refused(tmp_path: pathlib.Path) -> None:
    """The server does not start an autoscaler that cannot work."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SALAD_", "KELPIE_"))
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "server",
            "--port",
            str(_free_port()),
            "--database",
            f"sqlite:///{tmp_path}/k.db",
            "--autoscale",
            "salad",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 != result.returncode
    assert "SALAD_API_KEY" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
