"""
What shipping job logs costs, each figure beside a baseline from the same run.

    .venv/bin/python benchmarks/logs_bench.py [--runs 3] [--seconds 3] \
        [--jobs 3000] [--json out.json]

1. ``job``: a job that computes and prints 10,000 lines/s (100 lines every
   ~10 ms of CPU work, 80 characters each), run by a worker with log shipping
   on and by one with it off (``KELPIE_SHIP_LOGS=false``), alternately,
   ``--runs`` times each. The figure is the job's own wall time, on over off
   (medians), and the CPU time the worker and the server use meanwhile.
2. ``claim+complete``: the server's claim+complete throughput over HTTP (as in
   ``server_bench.py``), without and with 50 running jobs shipping 100 lines
   each per second (5,000 lines/s, one batch per job per second, as workers
   send them) from another process, alternately, ``--runs`` times each. The
   figure is with over without (medians). As throughput on a shared machine
   is noisy, the server's CPU time is also measured (``/proc``): the share of
   its core that shipping takes is what a saturated server loses.

The server runs as its own process (SQLite); everything is on 127.0.0.1 and
shares this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from server_bench import (
    ADMIN_KEY,
    GROUP,
    Conn,
    _claim_complete_loop,
    _cpu_seconds,
    _free_port,
    _run_clients,
    _submit,
)

PY = sys.executable

#: The job: CPU work with 100 printed lines per ~10 ms tick (its own
#: calibration, before its clock starts).
JOB = r"""
import os, sys, time

def calibrate():
    # Loop iterations for about 8 ms of work here (printing 100 lines takes
    # most of the rest of a 10 ms tick).
    spin = 10_000
    while True:
        t0 = time.perf_counter()
        acc = 0
        for i in range(spin):
            acc += i * i
        took = time.perf_counter() - t0
        if took > 0.02:
            return max(1, int(spin * 0.008 / took))
        spin *= 2

def main(ticks, spin):
    out = sys.stdout
    pad = "x" * 70
    n = 0
    for tick in range(ticks):
        acc = 0
        for i in range(spin):
            acc += i * i
        for _ in range(100):
            out.write(f"{n:08d} {pad}\n")
            n += 1
        out.flush()

spin = calibrate()
t0 = time.perf_counter()
main(int(sys.argv[1]), spin)
elapsed = time.perf_counter() - t0
with open(os.environ["BENCH_RESULT"], "w") as f:
    f.write(f"{elapsed:.6f}")
"""


@contextmanager
def _server(tmp: Path) -> Iterator[tuple[int, str, int]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "kelpie_sdk.server",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{tmp}/server.db",
        ],
        env={**os.environ, "KELPIE_ADMIN_KEY": ADMIN_KEY},
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
        yield port, f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def _worker(url: str, home: Path, group: str, ship: bool) -> Iterator[int]:
    home.mkdir(parents=True, exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KELPIE_", "SALAD_"))
    }
    env.update(
        KELPIE_API_URL=url,
        KELPIE_API_KEY=ADMIN_KEY,
        SALAD_CONTAINER_GROUP_ID=group,
        SALAD_MACHINE_ID=f"bench-{home.name}",
        KELPIE_STATE_FILE=str(home / "state.json"),
        INPUT_DIR=str(home / "in"),
        OUTPUT_DIR=str(home / "out"),
        CHECKPOINT_DIR=str(home / "ck"),
        KELPIE_LOG_LEVEL="warning",
        KELPIE_SHIP_LOGS="true" if ship else "false",
    )
    with (home / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            [PY, "-m", "kelpie_sdk.worker"], env=env, stdout=log, stderr=log, cwd=home
        )
    try:
        time.sleep(2.0)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_job(runs: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """The printing job's wall time with shipping on and off."""
    from kelpie_sdk.client import Client

    ticks = int(seconds * 100)
    times: dict[bool, list[float]] = {True: [], False: []}
    lines: dict[bool, int] = {True: 0, False: 0}
    rates: dict[bool, list[float]] = {True: [], False: []}
    #: CPU seconds of the worker and the server per second of the job.
    cpu: dict[bool, list[float]] = {True: [], False: []}
    with (
        _server(tmp) as (_, url, server_pid),
        Client(url, ADMIN_KEY) as client,
        _worker(url, tmp / "on", "g-on", ship=True) as on_pid,
        _worker(url, tmp / "off", "g-off", ship=False) as off_pid,
    ):
        for run in range(runs * 2):
            ship = run % 2 == 1
            result = tmp / f"result-{run}"
            pids = (on_pid if ship else off_pid, server_pid)
            cpu0 = sum(_cpu_seconds(p) for p in pids)
            job = client.submit_job(
                command=PY,
                arguments=["-c", JOB, str(ticks)],
                environment={"BENCH_RESULT": str(result)},
                container_group_id="g-on" if ship else "g-off",
                sync={},
                heartbeat_interval=30,
            )
            client.wait(job, timeout=300, poll_interval=0.2)
            times[ship].append(float(result.read_text()))
            cpu[ship].append(
                (sum(_cpu_seconds(p) for p in pids) - cpu0) / times[ship][-1]
            )
            rates[ship].append(ticks * 100 / times[ship][-1])
            lines[ship] = sum(1 for _ in client.logs(job.id))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {
        "lines_per_s_off": statistics.median(rates[False]),
        "job_seconds_on": times[True],
        "job_seconds_off": times[False],
        "lines_stored_per_job_on": lines[True],
        "ratio": on / off,
        "worker_and_server_cpu_on": statistics.median(cpu[True]),
        "worker_and_server_cpu_off": statistics.median(cpu[False]),
    }


def _ship_loop(
    port: int, jobs: list[tuple[str, str]], lines: int, stop: Any, out: Any
) -> None:
    conn = Conn(port)
    pad = "y" * 70
    offsets = dict.fromkeys((j for j, _ in jobs), 0)
    sent = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        for job_id, machine in jobs:
            batch = [
                {"stream": "stdout", "time": time.time(), "line": f"{i:08d} {pad}"}
                for i in range(offsets[job_id], offsets[job_id] + lines)
            ]
            status, _ = conn.call(
                "POST",
                f"/jobs/{job_id}/logs",
                {
                    "machine_id": machine,
                    "attempt": 1,
                    "offset": offsets[job_id],
                    "lines": batch,
                },
            )
            assert status == 200, status
            offsets[job_id] += lines
            sent += lines
        stop.wait(max(0.0, 1.0 - (time.perf_counter() - t0)))
    out.put(sent)


def _claim_complete(port: int, jobs: int, clients: int) -> float:
    _submit(port, jobs)
    done, t = _run_clients(
        _claim_complete_loop, [(port, f"m{i}") for i in range(clients)]
    )
    assert done == jobs, done
    return done / t


def bench_server(jobs: int, clients: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """claim+complete jobs/s without and with 50 jobs shipping logs, alternately."""
    without: list[float] = []
    with_logs: list[float] = []
    shipped_rates: list[float] = []
    with _server(tmp) as (port, _, pid):
        conn = Conn(port)
        _submit(port, 50, heartbeat_interval=3600)
        running = []
        for i in range(50):
            machine = f"ship{i}"
            _, got = conn.call(
                "GET", f"/work?machine_id={machine}&container_group_id={GROUP}"
            )
            running.append((got[0]["id"], machine))
        ctx = multiprocessing.get_context("spawn")
        # CPU cost on the server, which contention from other processes does
        # not change much: per claim+complete job, and per second of shipping.
        cpu0 = _cpu_seconds(pid)
        _claim_complete(port, jobs, clients)
        cpu_per_job = (_cpu_seconds(pid) - cpu0) / jobs
        stop, out = ctx.Event(), ctx.Queue()
        shipper = ctx.Process(target=_ship_loop, args=(port, running, 100, stop, out))
        shipper.start()
        time.sleep(1.5)
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        time.sleep(10.0)
        ship_cpu, ship_s = _cpu_seconds(pid) - cpu0, time.perf_counter() - t0
        stop.set()
        shipped_alone = out.get(timeout=60)
        shipper.join()
        for _ in range(rounds):
            without.append(_claim_complete(port, jobs, clients))
            stop, out = ctx.Event(), ctx.Queue()
            shipper = ctx.Process(
                target=_ship_loop, args=(port, running, 100, stop, out)
            )
            shipper.start()
            time.sleep(1.5)
            started = time.perf_counter()
            with_logs.append(_claim_complete(port, jobs, clients))
            stop.set()
            shipped_rates.append(
                out.get(timeout=60) / (time.perf_counter() - started + 1.5)
            )
            shipper.join()
    ship_fraction = ship_cpu / ship_s
    return {
        "server_cpu_ms_per_claim_complete": cpu_per_job * 1000,
        "server_cpu_fraction_shipping": ship_fraction,
        "server_cpu_us_per_line": ship_cpu
        / (shipped_alone * ship_s / (ship_s + 1.5))
        * 1e6,
        "ratio_from_cpu": 1 - ship_fraction,
        "claim_complete_without": without,
        "claim_complete_with_logs": with_logs,
        "lines_shipped_per_s": statistics.median(shipped_rates),
        "ratio": statistics.median(with_logs) / statistics.median(without),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        job = bench_job(args.runs, args.seconds, Path(a))
        server = bench_server(args.jobs, args.clients, args.runs, Path(b))
    print("logs benchmark (SQLite, all on 127.0.0.1)")
    print(
        f"  job printing 10,000 lines/s, wall time shipping on / off "
        f"(median of {args.runs}):  {job['ratio']:.3f}"
    )
    print(f"    the job printed {job['lines_per_s_off']:.0f} lines/s without shipping")
    print(
        "    on:  " + ", ".join(f"{t:.2f}" for t in job["job_seconds_on"]) + " s;"
        " off: " + ", ".join(f"{t:.2f}" for t in job["job_seconds_off"]) + " s"
    )
    print(
        "    worker + server CPU per second of the job: "
        f"{job['worker_and_server_cpu_on']:.3f} s with shipping, "
        f"{job['worker_and_server_cpu_off']:.3f} s without"
    )
    print(
        f"  claim+complete with 50 jobs shipping logs / without (medians of "
        f"{args.runs}): "
        f"{server['ratio']:.3f}"
    )
    print(
        "    without: "
        + ", ".join(f"{r:.0f}" for r in server["claim_complete_without"])
        + " jobs/s; with: "
        + ", ".join(f"{r:.0f}" for r in server["claim_complete_with_logs"])
        + f" jobs/s, while {server['lines_shipped_per_s']:.0f} lines/s were shipped"
    )
    print(
        f"  from CPU time: shipping took {server['server_cpu_fraction_shipping']:.3f} "
        f"of the server's core ({server['server_cpu_us_per_line']:.1f} us per line); "
        f"a claim+complete {server['server_cpu_ms_per_claim_complete']:.2f} ms: "
        f"a saturated server keeps {server['ratio_from_cpu']:.3f} of its throughput"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "logs",
                    "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                    "python": platform.python_version(),
                    "job": job,
                    "server": server,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
