"""
Submit a job to a Kelpie API server and wait until it finishes.

The server and key come from the environment::

    export KELPIE_API_URL=http://127.0.0.1:8787
    export KELPIE_API_KEY=<your key>
    python examples/submit_and_wait.py --container-group-id <group> \\
        --timeout 3600 -- python train.py --epochs 3

A worker serving that container group must be running to pick the job up.
The script exits 0 if the job completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from kelpie_sdk import Client, JobStatus, KelpieError, WaitTimeoutError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--container-group-id", required=True)
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the program to run after --")

    try:
        with Client() as client:  # KELPIE_API_URL, KELPIE_API_KEY
            job = client.submit_job(
                command=command[0],
                arguments=command[1:],
                container_group_id=args.container_group_id,
                sync={},  # no managed storage: the job does its own I/O
            )
            print(f"submitted {job.id}")
            try:
                [job] = client.wait(
                    job, timeout=args.timeout, poll_interval=args.poll_interval
                )
            except WaitTimeoutError:
                print(f"{job.id} is still unfinished; canceling it")
                client.cancel(job.id)
                return 1
    except KelpieError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(f"{job.id} {job.status.value} after {job.num_failures} failure(s)")
    return 0 if job.status is JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
