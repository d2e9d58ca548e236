"""
Chaos runs at the size CI uses, over several seeds: goodput and lost work.

    .venv/bin/python benchmarks/chaos_bench.py [--seeds 7,12] [--jobs 50]
        [--workers 4] [--faults 20] [--json PATH]

Each seed is one ``kelpie chaos`` run (a local cluster: the API server on
SQLite, the workers, file storage) that kills workers (also mid-save and
mid-upload), restarts the server and makes storage requests fail or stall.
Goodput is already a ratio (useful compute over all compute, in steps); lost
work per interruption is in steps, against the checkpoint interval (``--every``
of ``kelpie chaos``, 3 by default).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

_LINES = {
    "jobs": re.compile(r"^Jobs:\s+(\d+)/(\d+) completed"),
    "faults": re.compile(r"^Faults injected:\s+(.*)$"),
    "interruptions": re.compile(r"^Interruptions survived: (\d+)"),
    "lost": re.compile(
        r"^Lost work per interruption \(steps\): p50 (\d+), p90 (\d+), max (\d+)"
    ),
    "goodput": re.compile(r"^Goodput:\s+([\d.]+)%"),
    "wall": re.compile(r"^Wall time:\s+([\d.]+) s"),
}


def run(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``kelpie chaos`` run; its summary figures."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "chaos",
            "--jobs",
            str(args.jobs),
            "--workers",
            str(args.workers),
            "--faults",
            str(args.faults),
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    out: dict[str, Any] = {"seed": seed, "exit": proc.returncode}
    for line in proc.stdout.splitlines():
        for name, pattern in _LINES.items():
            match = pattern.match(line.strip())
            if match:
                out[name] = match.groups()
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="7,12")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [run(int(s), args) for s in args.seeds.split(",")]
    print("| seed | jobs | interruptions | lost steps p50/p90/max | goodput | wall s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        jobs = "/".join(r.get("jobs", ("?", "?")))
        lost = "/".join(r.get("lost", ("?", "?", "?")))
        print(
            f"| {r['seed']} | {jobs} | {r.get('interruptions', ('?',))[0]} | {lost} "
            f"| {r.get('goodput', ('?',))[0]} % | {r.get('wall', ('?',))[0]} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
