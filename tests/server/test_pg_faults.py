"""
PostgreSQL going away under load: the server answers 503 with Retry-After
(never a 500 or a hang), clients ride it out, and no job is lost or handed
out twice.
"""

from __future__ import annotations

import pathlib
import subprocess
import threading
import time
import uuid

import pytest
import requests

from kelpie_sdk.client import Client
from kelpie_sdk.testing import run_server

from ..pg import fresh_database
from .fleet import Tally, run_fleet
from .helpers import sync_job

JOBS = 400


def _cluster(action: str) -> None:
    version = sorted(p.name for p in pathlib.Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _pg_up() -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_stopping_postgresql_under_load_loses_nothing() -> None:
    """
    Four claiming clients work through 400 jobs; PostgreSQL is stopped for
    about 3 s in the middle. While it is down every API call answers 503 with
    Retry-After within seconds (health stays 200, readiness 503); afterwards
    every job is completed exactly once, and a job was only claimed again
    after its lease lapsed.
    """
    group = str(uuid.uuid4())
    with fresh_database() as url, run_server(database_url=url) as server:
        with Client(server.url, server.admin_key) as admin:
            jobs = admin.submit_jobs([sync_job(group, heartbeat_interval=1)] * JOBS)
        ids = {j.id for j in jobs}
        outage: dict[str, object] = {}
        tally_ref: list[Tally] = []

        def break_database() -> None:
            # Wait until a quarter of the jobs are done, then stop PostgreSQL.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if len(tally_ref) and len(tally_ref[0].completed) >= JOBS // 4:
                    break
                time.sleep(0.1)
            try:
                _cluster("stop")
                probes = []
                for path in ("/work", f"/jobs/{next(iter(ids))}", "/readyz"):
                    started = time.monotonic()
                    answer = requests.get(
                        server.url + path,
                        params={"machine_id": "p", "container_group_id": group},
                        headers={"X-Kelpie-Key": server.admin_key},
                        timeout=30,
                    )
                    probes.append(
                        (
                            path,
                            answer.status_code,
                            answer.headers.get("Retry-After"),
                            time.monotonic() - started,
                        )
                    )
                healthz = requests.get(server.url + "/healthz", timeout=30)
                outage["probes"] = probes
                outage["healthz"] = healthz.status_code
                time.sleep(3)
            finally:
                _cluster("start")

        breaker = threading.Thread(target=break_database)
        breaker.start()
        tally = run_fleet(
            [server.url],
            server.admin_key,
            group,
            clients=4,
            jobs=JOBS,
            deadline_s=120,
            started=tally_ref.append,
        )
        breaker.join(timeout=120)
        assert _pg_up()

        probes = outage["probes"]
        assert isinstance(probes, list)
        for path, status, retry_after, took in probes:
            assert 503 == status, path
            assert str(retry_after).isdigit(), path
            assert took < 10, path
        assert 200 == outage["healthz"]
        assert tally.errors["503"] > 0  # the fleet did meet the outage
        assert "500" not in tally.errors

        with Client(server.url, server.admin_key) as admin:
            final = {j.id: j for j in admin.list_jobs(container_group_id=group)}
        assert ids == set(final)
        assert {"completed"} == {j.status.value for j in final.values()}
        assert [] == [j for j, n in tally.completed.items() if n != 1]
        assert ids == set(tally.completed)
        # A job was handed out again only after its lease lapsed (counted as
        # an interruption), never while another machine held it.
        assert [] == [
            j.id for j in final.values() if j.attempt != 1 + j.num_interruptions
        ]
