"""
The API server on SQLite and PostgreSQL, with one and two replicas, over HTTP.

    .venv/bin/python benchmarks/replica_bench.py [--jobs 4000] [--clients 4]
        [--pending 1000,100000,1000000] [--backends sqlite,postgresql]
        [--rounds 3]

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
   alternating between two; ``--rounds`` times each, in turn (the figure is
   the median of the rounds' p50s, and the p99 of all the claims, so that one
   busy second of a shared machine does not make the figure). On PostgreSQL
   twice: ``fresh``, right after the bulk insert (while a sampler records
   whether autovacuum works on ``jobs`` and how many checkpoints start), and
   ``settled``, after ``VACUUM (ANALYZE) jobs`` and ``CHECKPOINT``: the state
   of a queue that grew by submissions; then the claim statement's own
   execution time inside PostgreSQL (``EXPLAIN ANALYZE``, rolled back).

Every server is ``python -m kelpie_sdk.server`` on a free port of 127.0.0.1;
servers, clients and PostgreSQL share the machine's cores; the claim+complete
line says where their CPU went per job. Ratios are printed
against the baselines of the same run: SQLite with one replica, and the
1,000-pending latency.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
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
    _cpu_seconds,
    _free_port,
    _heartbeat_loop,
    _run_clients,
    _submit,
)

ADMIN_ID = "00000000-0000-0000-0000-000000000000"
LATENCY_CLAIMS = 300
#: The server process on each port (for its CPU time).
PIDS: dict[int, int] = {}


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
        PIDS[port] = proc.pid
        yield port
    finally:
        PIDS.pop(port, None)
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


def _postgres_cpu() -> float:
    """CPU seconds of every process named ``postgres`` on this machine."""
    total = 0.0
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if name == "postgres":
                total += _cpu_seconds(int(entry.name))
    return total


def _throughput(
    ports: list[int], jobs: int, clients: int
) -> tuple[float, dict[str, float]]:
    """
    claim+complete jobs/s, and where the CPU went per job (ms): the server
    processes, PostgreSQL's processes, the client processes.
    """
    _submit(ports[0], jobs)
    servers0 = sum(_cpu_seconds(PIDS[p]) for p in ports)
    pg0, mine0 = _postgres_cpu(), os.times()
    done, elapsed = _run_clients(
        _claim_complete_loop,
        [(ports[i % len(ports)], f"m{i}") for i in range(clients)],
    )
    assert done == jobs, done
    servers = sum(_cpu_seconds(PIDS[p]) for p in ports) - servers0
    pg, mine = _postgres_cpu() - pg0, os.times()
    clients_cpu = (
        mine.children_user
        + mine.children_system
        - mine0.children_user
        - mine0.children_system
    )
    split = {"servers": servers, "postgres": pg, "clients": clients_cpu}
    return done / elapsed, {k: v / done * 1000 for k, v in split.items()}


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


def _claim_times(ports: list[int]) -> list[float]:
    """Seconds per claim of LATENCY_CLAIMS jobs, each completed (untimed)."""
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
    return took


def _latency(a: int, b: int, rounds: int) -> tuple[Any, Any]:
    """
    Claim latency on one replica and alternating between two, ``rounds``
    times in turn: per replica count, the median of the rounds' p50s and the
    p99 of all the claims, in ms, and each round's p50.
    """
    times: dict[int, list[list[float]]] = {1: [], 2: []}
    for _ in range(rounds):
        times[1].append(_claim_times([a]))
        times[2].append(_claim_times([a, b]))
    out = []
    for n in (1, 2):
        p50s = [statistics.median(t) * 1000 for t in times[n]]
        pooled = sorted(x for t in times[n] for x in t)
        p99 = pooled[min(len(pooled) - 1, int(len(pooled) * 0.99))] * 1000
        out.append((statistics.median(p50s), p99, p50s))
    return out[0], out[1]


class _Background:
    """
    What PostgreSQL does in the background while a latency phase runs: the
    share of 50 ms samples in which an autovacuum worker was working on the
    ``jobs`` table, and the checkpoints that started meanwhile.
    """

    def __init__(self, url: str) -> None:
        import psycopg

        self._conn = psycopg.connect(url, autocommit=True)
        self._stop = threading.Event()
        self._samples = self._busy = 0
        self._checkpoints0 = self._checkpoints()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _checkpoints(self) -> int:
        # PostgreSQL 17 moved the counters to their own view.
        if self._conn.info.server_version >= 170000:
            query = "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
        else:
            query = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        row = self._conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            row = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'autovacuum worker'"
                " AND query LIKE '%jobs%'"
            ).fetchone()
            self._samples += 1
            self._busy += bool(row and row[0])

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        checkpoints = self._checkpoints() - self._checkpoints0
        self._conn.close()
        share = self._busy / max(1, self._samples)
        return (
            f"autovacuum on jobs {share:.0%} of the time, {checkpoints} checkpoint(s)"
        )


def _settle(url: str) -> None:
    """
    Bring PostgreSQL to the state a queue that grew by submissions is in:
    the bulk insert vacuumed (hint bits and visibility map set) and flushed.
    """
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) jobs")
        conn.execute("CHECKPOINT")


def _statement_ms(url: str, times: int = 100) -> float:
    """
    The claim statement's own execution time in PostgreSQL (``EXPLAIN
    ANALYZE``, each run rolled back), median of ``times``, in ms: what the
    queue's length can change, without HTTP and the server around it.
    """
    import psycopg

    from kelpie_sdk.server._pg import PgHotPath
    from kelpie_sdk.server._store import ReputationPolicy

    params = {
        "machine_id": "lat",
        "group": GROUP,
        "user_id": ADMIN_ID,
        "now": int(time.time() * 1000),
        **ReputationPolicy().params(),
    }
    took = []
    with psycopg.connect(url) as conn:
        for _ in range(times):
            with conn.transaction(force_rollback=True):
                plan = "\n".join(
                    row[0]
                    for row in conn.execute(
                        "EXPLAIN (ANALYZE) " + PgHotPath.CLAIM, params
                    )
                )
            found = re.search(r"Execution Time: ([\d.]+) ms", plan)
            assert found is not None, plan
            took.append(float(found[1]))
    return statistics.median(took)


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "latency": {},
        "settled": {},
        "background": {},
        "statement": {},
    }
    with _database(backend, args.pg) as url, _server(url) as a:
        out["jobs/s", 1], out["cpu", 1] = _throughput([a], args.jobs, args.clients)
        out["beats/s", 1] = _heartbeats([a], args.clients, args.seconds)
        with _server(url) as b:
            out["jobs/s", 2], out["cpu", 2] = _throughput(
                [a, b], args.jobs, args.clients
            )
            out["beats/s", 2] = _heartbeats([a, b], args.clients, args.seconds)
            total = 0
            for pending in args.pending:
                # Leave the claims spare, so the queue length stays put.
                spare = 4 * LATENCY_CLAIMS * args.rounds
                _fill(backend, url, pending - total + spare)
                total = pending
                # Right after the bulk insert (as the queue stands when a
                # million jobs arrive at once), then settled (PostgreSQL).
                watch = _Background(url) if backend == "postgresql" else None
                out["latency"][pending] = _latency(a, b, args.rounds)
                if watch is not None:
                    out["background"][pending] = watch.stop()
                    _settle(url)
                    out["settled"][pending] = _latency(a, b, args.rounds)
                    out["statement"][pending] = _statement_ms(url)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pending", default="1000,100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="latency rounds of 300 claims per queue length and replica count",
    )
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
                f"  {backend:<10} {n} replica(s): CPU ms per job: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu", n].items())
            )
        print(
            f"  {backend:<10} 2 / 1 replicas: claim+complete "
            f"{r['jobs/s', 2] / r['jobs/s', 1]:.2f}x, heartbeats "
            f"{r['beats/s', 2] / r['beats/s', 1]:.2f}x"
        )
        for key, label in (("latency", "fresh"), ("settled", "settled")):
            if not r[key]:
                continue
            first = r[key][args.pending[0]]
            for pending, lat in r[key].items():
                for n, (p50, p99, rounds) in zip((1, 2), lat, strict=True):
                    print(
                        f"  {backend:<10} claim latency ({label}), {pending:>9,} "
                        f"pending, {n} replica(s): p50 {p50:6.2f} ms, p99 "
                        f"{p99:6.2f} ms (p50 {p50 / first[n - 1][0]:.2f}x of "
                        f"{args.pending[0]:,}; rounds' p50s "
                        + ", ".join(f"{r:.2f}" for r in rounds)
                        + ")"
                    )
        for pending, ms in r["statement"].items():
            print(
                f"  {backend:<10} the claim statement alone (EXPLAIN ANALYZE, "
                f"median of 100), {pending:>9,} pending: {ms:.3f} ms"
            )
        for pending, seen in r["background"].items():
            print(f"  {backend:<10} during the fresh {pending:,}-pending phase: {seen}")


if __name__ == "__main__":
    main()
