"""
Lost compute with and without the server's placement policy: a discrete-event
simulation of a fleet whose interruption rates differ (no server needed).

    .venv/bin/python benchmarks/placement_sim.py [--seeds 10] [--json out.json]

The model:

- **Fleet.** ``--machines`` machines in three equal tiers whose mean time
  between interruptions is 48 h, 8 h and 1.5 h. Each machine's interruptions
  are a Poisson process drawn in advance from the seed, so both runs see the
  same fleet: the same machines go down at the same instants, whatever they
  run. An interrupted machine comes back, with the same id, after 15 minutes.
- **Jobs.** ``--jobs`` jobs, all submitted at once (many more than machines,
  so that several are always pending). Compute per job is log-normal (median
  2 h, cut to 15 min..12 h); a third checkpoint every 15 min, a third every
  60 min, a third never. Every start (first or resumed) costs 3 minutes of
  set-up (download, restore).
- **Interruption.** The job goes back to the queue at its place (its
  submission order) and keeps the compute up to its last checkpoint; the rest,
  and the set-up, is *lost compute*.
- **Claims.** Idle machines claim in the order they became idle. Without the
  policy every claim takes the head of the queue (FIFO). With it, a machine is
  *flaky* once it has at least 3 interruptions and they are at least a quarter
  of its claims (the server's defaults); a flaky machine takes, among the
  first 8 pending jobs, the one started the fewest times (the head on a tie);
  every other machine takes the head. The counters are the ones the server
  keeps: claims and interruptions per machine.

Prints, per policy, the mean over the seeds of: lost compute (hours, and as a
share of the useful compute), interruptions of jobs, and the makespan.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOUR = 3600.0
#: Mean time between interruptions of each tier, in hours.
TIERS_MTBI_H = (48.0, 8.0, 1.5)
DOWNTIME_S = 15 * 60.0
SETUP_S = 3 * 60.0
CHECKPOINT_EVERY_S = (15 * 60.0, 60 * 60.0, math.inf)
FLAKY_INTERRUPTIONS = 3
FLAKY_RATE = 0.25
WINDOW = 8


@dataclass
class Job:
    seq: int
    remaining: float
    checkpoint_every: float
    attempts: int = 0
    interruptions: int = 0


@dataclass
class Machine:
    index: int
    claims: int = 0
    interruptions: int = 0
    up: bool = True
    job: Job | None = None
    started: float = 0.0
    token: int = 0
    outages: list[float] = field(default_factory=list)

    @property
    def flaky(self) -> bool:
        return (
            self.interruptions >= FLAKY_INTERRUPTIONS
            and self.interruptions >= FLAKY_RATE * self.claims
        )


def _fleet(rng: random.Random, machines: int, horizon: float) -> list[Machine]:
    fleet = []
    for i in range(machines):
        mtbi = TIERS_MTBI_H[i * len(TIERS_MTBI_H) // machines] * HOUR
        m = Machine(index=i)
        t = 0.0
        while t < horizon:
            t += rng.expovariate(1.0 / mtbi)
            m.outages.append(t)
            t += DOWNTIME_S
        fleet.append(m)
    return fleet


def _jobs(rng: random.Random, count: int) -> list[Job]:
    jobs = []
    for seq in range(count):
        compute = min(
            max(rng.lognormvariate(math.log(2 * HOUR), 0.8), 0.25 * HOUR), 12 * HOUR
        )
        jobs.append(
            Job(
                seq=seq, remaining=compute, checkpoint_every=CHECKPOINT_EVERY_S[seq % 3]
            )
        )
    rng.shuffle(jobs)
    for seq, job in enumerate(jobs):
        job.seq = seq
    return jobs


def simulate(seed: int, *, policy: bool, machines: int, jobs: int) -> dict[str, float]:
    """
    One run; the same seed gives the same fleet and jobs with or without the
    policy.
    """
    rng = random.Random(seed)
    queue = _jobs(rng, jobs)
    useful = sum(j.remaining for j in queue)
    horizon = 50 * useful / machines + 1000 * HOUR
    fleet = _fleet(rng, machines, horizon)
    pending: list[Job] = sorted(queue, key=lambda j: j.seq)
    events: list[
        tuple[float, int, int, int, int]
    ] = []  # time, order, kind, machine, token
    order = 0

    def push(t: float, kind: int, m: int, token: int = 0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, m, token))

    DONE, DOWN, UP = 0, 1, 2
    for m in fleet:
        for t in m.outages:
            push(t, DOWN, m.index)
            push(t + DOWNTIME_S, UP, m.index)
    idle: list[int] = [m.index for m in fleet]
    lost = 0.0
    job_interruptions = 0
    finished = 0
    now = 0.0

    def pick(m: Machine) -> Job:
        if policy and m.flaky:
            window = pending[:WINDOW]
            job = min(window, key=lambda j: (j.attempts, j.seq))
        else:
            job = pending[0]
        pending.remove(job)
        return job

    def dispatch() -> None:
        while idle and pending:
            m = fleet[idle.pop(0)]
            job = pick(m)
            m.claims += 1
            job.attempts += 1
            m.job, m.started = job, now
            m.token += 1
            push(now + SETUP_S + job.remaining, DONE, m.index, m.token)

    dispatch()
    while events and finished < len(queue):
        now, _, kind, index, token = heapq.heappop(events)
        m = fleet[index]
        if kind == DONE:
            if m.job is None or token != m.token:
                continue
            m.job = None
            finished += 1
            idle.append(index)
        elif kind == DOWN:
            m.up = False
            if index in idle:
                idle.remove(index)
            job = m.job
            if job is not None:
                m.interruptions += 1
                job.interruptions += 1
                job_interruptions += 1
                ran = now - m.started
                progress = max(0.0, ran - SETUP_S)
                kept = (
                    0.0
                    if math.isinf(job.checkpoint_every)
                    else math.floor(progress / job.checkpoint_every)
                    * job.checkpoint_every
                )
                lost += ran - kept
                job.remaining -= kept
                m.job = None
                m.token += 1
                # Back to the queue at its place.
                at = next(
                    (i for i, j in enumerate(pending) if j.seq > job.seq), len(pending)
                )
                pending.insert(at, job)
        else:
            m.up = True
            idle.append(index)
        dispatch()
    return {
        "lost_hours": lost / HOUR,
        "lost_share": lost / useful,
        "interruptions": float(job_interruptions),
        "makespan_hours": now / HOUR,
        "finished": float(finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--machines", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "seeds": args.seeds,
        "machines": args.machines,
        "jobs": args.jobs,
    }
    print(
        f"placement simulation: {args.machines} machines (MTBI "
        f"{'/'.join(f'{h:g}' for h in TIERS_MTBI_H)} h), {args.jobs} jobs, "
        f"{args.seeds} seeds"
    )
    per_seed: dict[str, list[dict[str, float]]] = {}
    for name, on in (("fifo", False), ("policy", True)):
        runs = [
            simulate(s, policy=on, machines=args.machines, jobs=args.jobs)
            for s in range(args.seeds)
        ]
        per_seed[name] = runs
        summary = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        results[name] = summary
        print(
            f"  {name:<7} lost {summary['lost_hours']:8.1f} h "
            f"({100 * summary['lost_share']:4.1f}% of the useful compute), "
            f"{summary['interruptions']:6.1f} interruptions, "
            f"makespan {summary['makespan_hours']:6.1f} h"
        )
    # Paired by seed: the same fleet and jobs, with and without the policy.
    changes = [
        p["lost_hours"] / f["lost_hours"] - 1
        for f, p in zip(per_seed["fifo"], per_seed["policy"], strict=True)
    ]
    better = sum(c < 0 for c in changes)
    results["lost_change"] = statistics.mean(changes)
    results["lost_change_stdev"] = (
        statistics.stdev(changes) if len(changes) > 1 else 0.0
    )
    results["seeds_better"] = better
    print(
        f"  lost compute with the policy: {100 * results['lost_change']:+.1f}% "
        f"(per seed: sd {100 * results['lost_change_stdev']:.1f} points; "
        f"lower in {better} of {len(changes)} seeds)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
