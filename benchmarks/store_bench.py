"""
CPU cost of the store's claim and completion, in-process (no HTTP).

    .venv/bin/python benchmarks/store_bench.py [--jobs 3000] [--empty 2000] [--runs 3]

Per run, on a fresh SQLite file: ``--jobs`` jobs claimed and completed one by
one by one machine, then ``--empty`` claims of the empty queue by the same
machine. The figures are in operations per second of the process's CPU time
(``time.process_time``), which the load from other processes disturbs less
than wall time. Run it on two versions of the code, in turns, to measure what
a change to the claim or completion costs (docs/benchmarks.md, "Cost of the
machine records").
"""

from __future__ import annotations

import argparse
import tempfile
import time

GROUP = "bench"


def bench_store(jobs: int, empty: int) -> tuple[float, float]:
    """Claim+complete jobs/s and empty claims/s, both per second of CPU."""
    from kelpie_sdk.models import JobSubmission, SyncSpec, WorkerReport
    from kelpie_sdk.server import ADMIN_ID, Principal, open_store

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/db.sqlite")
        admin = Principal(ADMIN_ID, "", "")
        sub = JobSubmission(command="true", container_group_id=GROUP, sync=SyncSpec())
        for start in range(0, jobs, 1000):
            store.insert_jobs(ADMIN_ID, [sub] * min(1000, jobs - start))
        report = WorkerReport(machine_id="m", container_group_id=GROUP)

        t0 = time.process_time()
        done = 0
        while (job := store.claim(admin, machine_id="m", group=GROUP)) is not None:
            assert store.complete(admin, job.id, report) == "ok"
            done += 1
        claim_complete = time.process_time() - t0
        assert done == jobs, done

        t0 = time.process_time()
        for _ in range(empty):
            assert store.claim(admin, machine_id="m", group=GROUP) is None
        empty_claims = time.process_time() - t0
        store.engine.dispose()
    return jobs / claim_complete, empty / empty_claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--empty", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    print(
        f"store benchmark (SQLite, in-process): {args.jobs} jobs, "
        f"{args.empty} empty claims"
    )
    for run in range(1, args.runs + 1):
        pairs, empties = bench_store(args.jobs, args.empty)
        print(
            f"  run {run}: claim+complete {pairs:>8,.0f} jobs/s of CPU, "
            f"empty claim {empties:>8,.0f} /s of CPU"
        )


if __name__ == "__main__":
    main()
