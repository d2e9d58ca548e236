"""
Throughput of the API server on SQLite, over HTTP, beside two ceilings.

    .venv/bin/python benchmarks/server_bench.py [--jobs 6000] [--clients 3] \
        [--json out.json]

Measures, in one run, on this machine:

1. ``db``: the claim statement and the completion, called directly on the
   store (no HTTP): the database ceiling, in claim+complete jobs/s.
2. ``noop``: ``GET /health`` of the same server (no auth, no database): the
   HTTP ceiling, in requests/s.
3. ``claim+complete``: ``GET /work`` then ``POST /jobs/{id}/completed`` over
   HTTP, in jobs/s (2 requests per job).
4. ``heartbeat``: ``POST /jobs/{id}/heartbeat`` over HTTP for running jobs,
   in heartbeats/s.

The server runs as its own process (``python -m kelpie_sdk.server``, one
uvicorn worker); the load comes from ``--clients`` processes with keep-alive
connections (``http.client``), on the same 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ADMIN_KEY = "bench-admin-key-" + "b" * 24  # the server wants 32+ characters
GROUP = "bench-group"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux; 0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Conn:
    """A keep-alive JSON connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.headers = {"X-Kelpie-Key": ADMIN_KEY, "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None


def _submit(port: int, n: int, **extra: Any) -> None:
    conn = Conn(port)
    for start in range(0, n, 1000):
        size = min(1000, n - start)
        job = {"command": "true", "container_group_id": GROUP, "sync": {}, **extra}
        status, _ = conn.call("POST", "/jobs/batch", [job] * size)
        assert status == 202, status


def _claim_complete_loop(
    port: int, machine: str, ready: Any, go: Any, out: Any
) -> None:
    conn = Conn(port)
    ready.release()
    go.wait()
    report = {"machine_id": machine, "container_group_id": GROUP}
    done = 0
    path = f"/work?machine_id={machine}&container_group_id={GROUP}"
    while True:
        _, jobs = conn.call("GET", path)
        if not jobs:
            break
        status, _ = conn.call("POST", f"/jobs/{jobs[0]['id']}/completed", report)
        assert status == 200, status
        done += 1
    out.put(done)


def _heartbeat_loop(
    port: int,
    jobs: list[tuple[str, str]],
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    conn = Conn(port)
    ready.release()
    go.wait()
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        job_id, machine = jobs[n % len(jobs)]
        status, body = conn.call(
            "POST",
            f"/jobs/{job_id}/heartbeat",
            {"machine_id": machine, "container_group_id": GROUP},
        )
        assert status == 200, status
        assert body == {"status": "running"}, body
        n += 1
    out.put(n)


def _noop_loop(port: int, seconds: float, ready: Any, go: Any, out: Any) -> None:
    conn = Conn(port)
    ready.release()
    go.wait()
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        conn.call("GET", "/health")
        n += 1
    out.put(n)


def _run_clients(target: Any, args_for: list[tuple[Any, ...]]) -> tuple[int, float]:
    # The clock starts once every client process is up and connected.
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    procs = [ctx.Process(target=target, args=(*a, ready, go, out)) for a in args_for]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire(timeout=60)
    start = time.perf_counter()
    go.set()
    total = sum(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return total, time.perf_counter() - start


def bench_db(n: int) -> float:
    """Claim + complete directly on the store (no HTTP)."""
    from kelpie_sdk.models import JobSubmission, SyncSpec, WorkerReport
    from kelpie_sdk.server import ADMIN_ID, Principal, open_store

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/db.sqlite")
        admin = Principal(ADMIN_ID, "", "")
        sub = JobSubmission(command="true", container_group_id=GROUP, sync=SyncSpec())
        for start in range(0, n, 1000):
            store.insert_jobs(ADMIN_ID, [sub] * min(1000, n - start))
        report = WorkerReport(machine_id="m", container_group_id=GROUP)
        t0 = time.perf_counter()
        done = 0
        while (job := store.claim(admin, machine_id="m", group=GROUP)) is not None:
            assert store.complete(admin, job.id, report) == "ok"
            done += 1
        elapsed = time.perf_counter() - t0
        store.engine.dispose()
    assert done == n
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6000)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results here"
    )
    args = parser.parse_args()

    db_rate = bench_db(args.jobs)

    port = _free_port()
    tmp = tempfile.TemporaryDirectory()
    env = {**os.environ, "KELPIE_ADMIN_KEY": ADMIN_KEY}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk.server",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{tmp.name}/server.db",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

        clients = args.clients
        noop, t = _run_clients(_noop_loop, [(port, args.seconds)] * clients)
        noop_rate = noop / t

        _submit(port, args.jobs)
        done, t = _run_clients(
            _claim_complete_loop, [(port, f"m{i}") for i in range(clients)]
        )
        assert done == args.jobs, done
        http_rate = done / t

        # Heartbeats: claim 1000 long-interval jobs, then beat them round-robin.
        _submit(port, 1000, heartbeat_interval=3600)
        conn = Conn(port)
        running = []
        for i in range(1000):
            machine = f"hb{i % clients}"
            _, jobs = conn.call(
                "GET", f"/work?machine_id={machine}&container_group_id={GROUP}"
            )
            running.append((jobs[0]["id"], machine))
        shares = [running[i::clients] for i in range(clients)]
        beats, t = _run_clients(
            _heartbeat_loop, [(port, share, args.seconds) for share in shares]
        )
        hb_rate = beats / t
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()

    rows = [
        ("db ceiling: claim+complete on the store, no HTTP", db_rate, "jobs/s"),
        ("http ceiling: GET /health (no-op)", noop_rate, "req/s"),
        ("claim+complete over HTTP", http_rate, "jobs/s"),
        ("heartbeats over HTTP", hb_rate, "beats/s"),
    ]
    print(f"server benchmark: {args.jobs} jobs, {clients} client processes, SQLite")
    for name, rate, unit in rows:
        print(f"  {name:<52} {rate:>9.0f} {unit}")
    print(f"  claim+complete / db ceiling          = {http_rate / db_rate:.3f}")
    print(f"  claim+complete requests / no-op      = {2 * http_rate / noop_rate:.3f}")
    print(f"  heartbeats / no-op                   = {hb_rate / noop_rate:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "server",
                    "args": {
                        "jobs": args.jobs,
                        "clients": clients,
                        "seconds": args.seconds,
                    },
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "db_jobs_per_s": db_rate,
                    "noop_requests_per_s": noop_rate,
                    "claim_complete_jobs_per_s": http_rate,
                    "heartbeats_per_s": hb_rate,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
