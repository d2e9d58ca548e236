"""
The API server before and after a change, in turns, in one run.

    .venv/bin/python benchmarks/ab_server.py --before 1756e61 [--rounds 3] \
        [--jobs 4000] [--clients 3] [--seconds 3] [--json out.json]

Checks out ``--before`` (any git ref) into a temporary worktree and runs
``benchmarks/server_bench.py`` (this checkout's copy, so both sides get the same
load) alternately against that code and this checkout's, ``--rounds`` times
each: before, after, before, after, ... The code under test is chosen with
``PYTHONPATH``, for the server process and the in-process store ceiling alike.

Prints every run, and for each figure the median of the after/before ratios of
the pairs (a machine shared with other work drifts; a pair's two runs are
minutes apart). A ratio of 0.95 means 5 % slower after the change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIGURES = {
    "db_jobs_per_s": "db ceiling (claim+complete on the store, jobs/s)",
    "noop_requests_per_s": "no-op HTTP (req/s)",
    "claim_complete_jobs_per_s": "claim+complete over HTTP (jobs/s)",
    "heartbeats_per_s": "heartbeats over HTTP (/s)",
}


def _run(code: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "server_bench.py"),
            "--jobs",
            str(args.jobs),
            "--clients",
            str(args.clients),
            "--seconds",
            str(args.seconds),
            "--json",
            str(out),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git ref of the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "worktree",
                "add",
                "-q",
                "--detach",
                str(before),
                args.before,
            ],
            check=True,
        )
        try:
            runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for i in range(args.rounds):
                b = _run(before, args, Path(tmp) / f"b{i}.json")
                a = _run(REPO, args, Path(tmp) / f"a{i}.json")
                runs.append((b, a))
                for side, r in (("before", b), ("after", a)):
                    cells = "  ".join(f"{r[k]:>8.0f}" for k in FIGURES)
                    print(f"round {i + 1} {side:<6} {cells}", flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                check=False,
            )

    print(f"\nafter/before, median of {args.rounds} pairs (before = {args.before}):")
    summary = {}
    for key, name in FIGURES.items():
        ratios = [a[key] / b[key] for b, a in runs]
        summary[key] = {"median_ratio": statistics.median(ratios), "ratios": ratios}
        shown = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"  {name:<50} {statistics.median(ratios):.3f}  ({shown})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"before": args.before, "runs": runs, "summary": summary}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
