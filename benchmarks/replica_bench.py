"""
The API server on SQLite and PostgreSQL, with one and two replicas, over HTTP.

    .venv/bin/python benchmarks/replica_bench.py [--jobs 4000] [--clients 4]
        [--pending 1000,100000,1000000] [--backends sqlite,postgresql]

For each backend, on one fresh database (a SQLite file in a temporary
directory; a new database on the PostgreSQL server at ``--pg``):

1. ``claim+complete``: ``GET /work`` then ``POST /jobs/{id}/completed``, from
   ``--clients`` processes with keep-alive connections, spread round-robin over
   the replicas, in jobs/s; first with one server process, then two.
2. ``heartbeats``: ``POST /jobs/{id}/heartbeat`` for 1,000 running jobs,
   round-robin, in heartbeats/s; one and two replicas.
3. ``claim latency``: one client claims (timed) and completes (not timed) 300
   jobs in turn while the queue holds ``--pending`` jobs (bulk-inserted with
   SQL, the ladder grows in place), p50 and p99 in ms; on one replica, and
   alternating between two.

Every server is ``python -m kelpie_sdk.server`` on a free port of 127.0.0.1;
servers, clients and PostgreSQL share the machine's cores. Ratios are printed
against the baselines of the same run: SQLite with one replica, and the
1,000-pending latency.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from server_bench import (
    ADMIN_KEY,
    GROUP,
    Conn,
    _claim_complete_loop,
    _heartbeat_loop,
    _run_clients,
    _submit,
)

ADMIN_ID = "00000000-0000-0000-0000-000000000000"
LATENCY_CLAIMS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(url: str) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk.server",
            "--port",
            str(port),
            "--database",
            url,
        ],
        env={**os.environ, "KELPIE_ADMIN_KEY": ADMIN_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def _database(backend: str, pg: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    import psycopg

    name = f"kelpie_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield pg.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _throughput(ports: list[int], jobs: int, clients: int) -> float:
    _submit(ports[0], jobs)
    done, elapsed = _run_clients(
        _claim_complete_loop,
        [(ports[i % len(ports)], f"m{i}") for i in range(clients)],
    )
    assert done == jobs, done
    return done / elapsed


def _heartbeats(ports: list[int], clients: int, seconds: float) -> float:
    group = f"hb-{uuid.uuid4().hex[:8]}"
    conn = Conn(ports[0])
    job = {"command": "true", "container_group_id": group, "sync": {}}
    status, _ = conn.call(
        "POST", "/jobs/batch", [{**job, "heartbeat_interval": 3600}] * 1000
    )
    assert status == 202, status
    running = []
    for i in range(1000):
        machine = f"hb{i % clients}"
        _, got = conn.call(
            "GET", f"/work?machine_id={machine}&container_group_id={group}"
        )
        running.append((got[0]["id"], machine, group))
    shares = [running[i::clients] for i in range(clients)]
    beats, elapsed = _run_clients(
        _heartbeat_loop_group,
        [(ports[i % len(ports)], share, seconds) for i, share in enumerate(shares)],
    )
    return beats / elapsed


def _heartbeat_loop_group(
    port: int, jobs: list[tuple[str, str, str]], seconds: float, *rest: Any
) -> None:
    # The heartbeat loop of server_bench, for a queue other than GROUP.
    import server_bench

    server_bench.GROUP = jobs[0][2]
    _heartbeat_loop(port, [(j, m) for j, m, _ in jobs], seconds, *rest)


def _fill(backend: str, url: str, count: int) -> None:
    """Add ``count`` pending jobs to GROUP with one SQL statement."""
    now = int(time.time() * 1000)
    if backend == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=60)
        conn.execute(
            "INSERT INTO jobs (id, user_id, status, created, command,"
            " container_group_id, sync)"
            " WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n"
            " WHERE x < ?) SELECT lower(hex(randomblob(16))), ?, 'pending', ?,"
            " 'true', ?, '{}' FROM n",
            (count, ADMIN_ID, now, GROUP),
        )
        conn.commit()
        conn.execute("ANALYZE")
        conn.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO jobs (id, user_id, status, created, command,"
            " container_group_id, sync) SELECT gen_random_uuid()::text, %s,"
            " 'pending', %s, 'true', %s, '{}' FROM generate_series(1, %s)",
            (ADMIN_ID, now, GROUP, count),
        )
        conn.execute("ANALYZE jobs")


def _latency(ports: list[int]) -> tuple[float, float]:
    conns = [Conn(p) for p in ports]
    report = {"machine_id": "lat", "container_group_id": GROUP}
    path = f"/work?machine_id=lat&container_group_id={GROUP}"
    took = []
    for i in range(LATENCY_CLAIMS):
        conn = conns[i % len(conns)]
        t0 = time.perf_counter()
        _, got = conn.call("GET", path)
        took.append(time.perf_counter() - t0)
        status, _ = conn.call("POST", f"/jobs/{got[0]['id']}/completed", report)
        assert status == 200, status
    took.sort()
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    return statistics.median(took) * 1000, p99 * 1000


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": {}}
    with _database(backend, args.pg) as url, _server(url) as a:
        out["jobs/s", 1] = _throughput([a], args.jobs, args.clients)
        out["beats/s", 1] = _heartbeats([a], args.clients, args.seconds)
        with _server(url) as b:
            out["jobs/s", 2] = _throughput([a, b], args.jobs, args.clients)
            out["beats/s", 2] = _heartbeats([a, b], args.clients, args.seconds)
            total = 0
            for pending in args.pending:
                # Leave LATENCY_CLAIMS spare, so the queue length stays put.
                _fill(backend, url, pending - total + 2 * LATENCY_CLAIMS)
                total = pending
                out["latency"][pending] = (_latency([a]), _latency([a, b]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pending", default="1000,100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    args.pending = [int(p) for p in args.pending.split(",")]
    results = {b: bench_backend(b, args) for b in args.backends.split(",")}

    print(f"replica benchmark: {args.jobs} jobs, {args.clients} client processes")
    base = next(iter(results.values()))
    for backend, r in results.items():
        for n in (1, 2):
            jobs, beats = r["jobs/s", n], r["beats/s", n]
            print(
                f"  {backend:<10} {n} replica(s): claim+complete "
                f"{jobs:>6.0f} jobs/s ({jobs / base['jobs/s', 1]:.2f}x), "
                f"heartbeats {beats:>6.0f}/s ({beats / base['beats/s', 1]:.2f}x)"
            )
        print(
            f"  {backend:<10} 2 / 1 replicas: claim+complete "
            f"{r['jobs/s', 2] / r['jobs/s', 1]:.2f}x, heartbeats "
            f"{r['beats/s', 2] / r['beats/s', 1]:.2f}x"
        )
        first = r["latency"][args.pending[0]]
        for pending, lat in r["latency"].items():
            for n, (p50, p99) in zip((1, 2), lat, strict=True):
                print(
                    f"  {backend:<10} claim latency, {pending:>9,} pending, {n} "
                    f"replica(s): p50 {p50:6.2f} ms, p99 {p99:6.2f} ms "
                    f"(p50 {p50 / first[n - 1][0]:.2f}x of {args.pending[0]:,})"
                )


if __name__ == "__main__":
    main()
