"""
Two server processes on one PostgreSQL database; one is killed with SIGKILL
while 32 clients claim and complete 10,000 jobs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import requests

from kelpie_sdk.client import Client

from ..pg import fresh_database
from .fleet import Tally, run_fleet
from .helpers import sync_job

JOBS = 10_000
CLIENTS = 32
KEY = "fleet-admin-key-" + "k" * 24  # the server wants 32+ characters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server_process(url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "server",
            "--port",
            str(port),
            "--database",
            url,
            "--log-level",
            "error",
        ],
        env={**os.environ, "KELPIE_ADMIN_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, "the server process exited at start"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killing_one_of_two_replicas_loses_nothing() -> None:
    """
    32 clients, spread over two server processes on one database, work
    through 10,000 jobs; one process is SIGKILLed after a fifth of them. Its
    clients move to the other; every job is completed exactly once, none is
    lost, and no job is handed out while another machine holds its lease.
    """
    group = str(uuid.uuid4())
    with ExitStack() as stack:
        url = stack.enter_context(fresh_database())
        a_url, a_proc = stack.enter_context(_server_process(url))
        b_url, _ = stack.enter_context(_server_process(url))
        with Client(a_url, KEY) as admin:
            ids = {
                j.id
                for j in admin.submit_jobs(
                    [sync_job(group, heartbeat_interval=1)] * JOBS
                )
            }
        tally_ref: list[Tally] = []
        killed_at: list[int] = []

        def kill_a() -> None:
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline:
                if tally_ref and len(tally_ref[0].completed) >= JOBS // 5:
                    killed_at.append(len(tally_ref[0].completed))
                    a_proc.send_signal(signal.SIGKILL)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a)
        killer.start()
        tally = run_fleet(
            [a_url, b_url],
            KEY,
            group,
            clients=CLIENTS,
            jobs=JOBS,
            deadline_s=240,
            started=tally_ref.append,
        )
        killer.join(timeout=30)
        assert killed_at, "server A was never killed"
        assert a_proc.wait(timeout=10) == -signal.SIGKILL

        with Client(b_url, KEY) as admin:
            final = {
                j.id: j
                for j in admin.list_jobs(container_group_id=group, page_size=1000)
            }
    assert ids == set(final)
    assert [] == [j.id for j in final.values() if j.status.value != "completed"]
    assert ids == set(tally.completed)
    assert [] == [j for j, n in tally.completed.items() if n != 1]
    # Every repeated hand-out of a job followed a lapsed lease.
    assert [] == [j.id for j in final.values() if j.attempt != 1 + j.num_interruptions]
    claims_per_attempt = {(job_id, attempt) for job_id, _, attempt in tally.claims}
    assert len(claims_per_attempt) == len(tally.claims)  # no attempt twice
    assert "500" not in tally.errors
    # Clients of the killed replica did lose their connections and move over.
    assert any(not kind.isdigit() for kind in tally.errors), tally.errors
