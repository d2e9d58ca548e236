"""
Does the PostgreSQL server get slower as jobs finish? claim+complete phases on
one database, back to back, each against the first.

    .venv/bin/python benchmarks/pg_plan_drift.py [--phases 1,1,1,2] \
        [--jobs 3000] [--clients 4] [--heartbeats]

Each phase queues ``--jobs`` jobs and runs ``--clients`` claim+complete client
processes over HTTP against one server process (``1``) or two (``2``), as in
``replica_bench.py``, on one fresh database on the PostgreSQL server at
``--pg``; the finished jobs stay. ``--heartbeats`` adds a heartbeat phase (1,000
running jobs, 4 s) after the first. Per phase it prints jobs/s, the CPU per
job of the server processes, of PostgreSQL's processes and of the clients
(ratios against the first phase), and the index entries PostgreSQL read per
job (``pg_stat_user_indexes.idx_tup_read``) for each index of ``jobs``: a
cached plan that walks finished jobs shows as entries per job that grow from
phase to phase.

Nothing runs ``ANALYZE`` in between, so the statistics stay as stale as on a
new queue (autovacuum's first pass comes a minute or more later).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from replica_bench import _database, _heartbeats, _server, _throughput


def _index_reads(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes"
            " WHERE relname = 'jobs'"
        ).fetchall()
    return {name: int(read) for name, read in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="1,1,1,2")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--heartbeats", action="store_true")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    phases = [int(p) for p in args.phases.split(",")]
    first: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(_database("postgresql", args.pg))
        a = stack.enter_context(_server(url))
        b = stack.enter_context(_server(url)) if 2 in phases else a
        for i, replicas in enumerate(phases, 1):
            before = _index_reads(url)
            rate, cpu = _throughput(
                [a] if replicas == 1 else [a, b], args.jobs, args.clients
            )
            after = _index_reads(url)
            first = first or cpu
            print(
                f"phase {i}: {replicas} replica(s), {rate:.0f} jobs/s; CPU ms per"
                " job: "
                + ", ".join(
                    f"{k} {v:.2f} ({v / first[k]:.2f}x)" if first[k] else f"{k} {v:.2f}"
                    for k, v in cpu.items()
                ),
                flush=True,
            )
            reads = {
                name: (after[name] - before.get(name, 0)) / args.jobs
                for name in after
                if after[name] > before.get(name, 0)
            }
            print(
                "  index entries read per job: "
                + ", ".join(
                    f"{name} {n:.1f}"
                    for name, n in sorted(reads.items(), key=lambda kv: -kv[1])
                ),
                flush=True,
            )
            if args.heartbeats and i == 1:
                beats = _heartbeats([a], args.clients, 4.0)
                print(f"heartbeats: {beats:.0f}/s (1,000 running jobs, 4 s)")


if __name__ == "__main__":
    main()
