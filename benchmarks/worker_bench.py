"""
Worker benchmarks, each beside a baseline measured in the same run.

1. Submit -> running on an idle worker: long-poll (this worker's default)
   against the original's behaviour, plain polling every 10 s
   (``KELPIE_LONG_POLL_S=0``, ``HEARTBEAT_INTERVAL_S=10``). "Running" is the
   server's ``started`` time (the claim), and also the moment the job's own
   process starts.
2. Per-job overhead of a no-op job, claim -> completed, against spawning the
   same no-op process directly.

Run::

    .venv/bin/python benchmarks/worker_bench.py \
        [--samples 15] [--poll-samples 8] [--jobs 50] [--json out.json]

The server runs in this process (``kelpie_sdk.testing.run_server``, SQLite),
the workers as subprocesses, all on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kelpie_sdk.client import Client
from kelpie_sdk.models import Job, JobSubmission, SyncSpec
from kelpie_sdk.testing import run_server

PY = sys.executable


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def worker(url: str, key: str, home: Path, group: str, **env: str) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    full = {
        k: v for k, v in os.environ.items() if not k.startswith(("KELPIE_", "SALAD_"))
    }
    full.update(
        KELPIE_API_URL=url,
        KELPIE_API_KEY=key,
        SALAD_CONTAINER_GROUP_ID=group,
        SALAD_MACHINE_ID=f"bench-{home.name}",
        KELPIE_STATE_FILE=str(home / "state.json"),
        INPUT_DIR=str(home / "in"),
        OUTPUT_DIR=str(home / "out"),
        CHECKPOINT_DIR=str(home / "ck"),
        KELPIE_LOG_LEVEL="warning",
        **env,
    )
    with (home / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            [PY, "-m", "kelpie_sdk.worker"], env=full, stdout=log, stderr=log, cwd=home
        )
    try:
        time.sleep(2.0)  # imports done, first (empty) claim in flight
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_finished(client: Client, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job.status.finished:
            return job
        time.sleep(0.02)
    raise TimeoutError(job_id)


def latency(
    client: Client, home: Path, group: str, samples: int, idle_max: float
) -> tuple[list[float], list[float]]:
    """Submit one job at a time after a random idle pause; return claim and
    process-start latencies in ms."""
    marks = home / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    claim, spawn = [], []
    for i in range(samples):
        time.sleep(random.uniform(0.2, idle_max))
        mark = marks / f"{i}"
        submitted = time.time()
        job = client.submit_job(
            command=PY,
            arguments=[
                "-S",
                "-c",
                f"import time; open({str(mark)!r}, 'w').write(repr(time.time()))",
            ],
            container_group_id=group,
            sync={},
        )
        done = wait_finished(client, job.id)
        assert done.started is not None
        claim.append((done.started.timestamp() - submitted) * 1000)
        spawn.append((float(mark.read_text()) - submitted) * 1000)
    return claim, spawn


def overhead(client: Client, group: str, jobs: int) -> tuple[float, float, float]:
    """Per-job wall time of N queued no-op jobs on one worker, against a direct
    spawn of the same process; all in ms."""
    direct = []
    for _ in range(jobs):
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        direct.append((time.perf_counter() - t0) * 1000)
    submissions = [
        JobSubmission(command="/bin/true", container_group_id=group, sync=SyncSpec())
        for _ in range(jobs)
    ]
    t0 = time.perf_counter()
    queued = client.submit_jobs(submissions)
    finished = [wait_finished(client, j.id, timeout=300) for j in queued]
    total = (time.perf_counter() - t0) * 1000
    per_job = [
        (j.completed.timestamp() - j.started.timestamp()) * 1000
        for j in finished
        if j.completed is not None and j.started is not None
    ]
    return statistics.median(direct), statistics.median(per_job), total / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--poll-samples", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results here"
    )
    args = parser.parse_args()
    random.seed(1)
    with tempfile.TemporaryDirectory() as tmp, run_server() as server:
        root = Path(tmp)
        client = Client(server.url, server.admin_key)
        # Separate queues: a long-poll abandoned by the first worker's shutdown
        # must not claim a job of the second phase.
        lp, poll = root / "lp", root / "poll"
        with worker(server.url, server.admin_key, lp, "lp", KELPIE_LONG_POLL_S="20"):
            lp_claim, lp_spawn = latency(client, lp, "lp", args.samples, 2.0)
            direct, per_job, wall = overhead(client, "lp", args.jobs)
        with worker(
            server.url,
            server.admin_key,
            poll,
            "poll",
            KELPIE_LONG_POLL_S="0",
            HEARTBEAT_INTERVAL_S="10",
        ):
            poll_claim, poll_spawn = latency(
                client, poll, "poll", args.poll_samples, 10.0
            )
        client.close()

    def row(name: str, values: list[float]) -> str:
        return (
            f"| {name} | {len(values)} | {statistics.median(values):.0f} | "
            f"{pct(values, 0.9):.0f} | {max(values):.0f} |"
        )

    print("## Submit -> running on an idle worker (ms)")
    print("| mode | n | p50 | p90 | max |")
    print("|---|---|---|---|---|")
    print(row("long-poll: claimed (server `started`)", lp_claim))
    print(row("long-poll: job process started", lp_spawn))
    print(row("baseline, 10 s polling: claimed", poll_claim))
    print(row("baseline, 10 s polling: job process started", poll_spawn))
    ratio = statistics.median(poll_claim) / statistics.median(lp_claim)
    print(f"\np50 claim latency: polling / long-poll = {ratio:.0f}x")
    print("\n## No-op job overhead (ms)")
    print(f"| direct spawn of /bin/true, p50 | {direct:.1f} |")
    print(
        "| worker: claim -> completed per job, p50 (server timestamps) | "
        f"{per_job:.1f} |"
    )
    print(f"| worker: wall time per job, {args.jobs} queued jobs | {wall:.1f} |")
    print(f"\nper-job claim->completed / direct spawn = {per_job / direct:.1f}x")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "worker",
                    "args": {
                        "samples": args.samples,
                        "poll_samples": args.poll_samples,
                        "jobs": args.jobs,
                    },
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "latency_ms": {
                        "long_poll_claimed": lp_claim,
                        "long_poll_process_started": lp_spawn,
                        "polling_claimed": poll_claim,
                        "polling_process_started": poll_spawn,
                    },
                    "noop_job_ms": {
                        "direct_spawn_p50": direct,
                        "claim_to_completed_p50": per_job,
                        "wall_per_job": wall,
                    },
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
