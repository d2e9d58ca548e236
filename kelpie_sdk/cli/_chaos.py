"""
``kelpie chaos`` and ``kelpie demo``: many jobs on a local cluster whose
machines keep dying, and the checks that every job still finished exactly.

The harness runs the API server as a process of its own (SQLite, a fixed port,
so that it can be killed and restarted), W workers and a storage root behind
the fault-injecting ``chaos://`` filesystem (:mod:`kelpie_sdk.testing_faults`).
It submits N jobs (:mod:`kelpie_sdk.chaos_jobs`), then injects F faults spread
over the run:

- ``kill``: SIGKILL a worker holding a job (with its job: the node is gone);
- ``kill-save``: the same, while the job is in the middle of a checkpoint save;
- ``kill-upload``: the same, while the worker is uploading a job's output;
- ``server``: SIGKILL the API server and start it again on the same database.

A killed worker is replaced by a new one (a new machine). Storage requests also
fail or stall at the rates given. At the end it checks, from the server's
records, the jobs' event logs and the outputs:

- every job completed, exactly once: by one attempt, whose output is the one
  stored, with no attempt running after it;
- every output is bit-identical to an uninterrupted computation;
- no checkpoint was read back corrupt (the jobs check what they load);
- the work lost per interruption is at most one checkpoint interval, plus what
  a job computed while the queue was already running it elsewhere (the time it
  takes the old holder to learn it lost the job);
- every planned fault was injected.

It prints goodput (useful steps over all steps computed), the lost-work
distribution, the faults by kind and the wall time; it exits 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kelpie_sdk.chaos_jobs import EVENTS_ENV, JOB_KINDS
from kelpie_sdk.cli._common import Context, UsageError
from kelpie_sdk.cli._up import (
    _admin_key,
    _Child,
    _clean_env,
    _free_port,
    _server_child,
    _tail,
    _wait_ready,
    _worker_env,
)
from kelpie_sdk.client import Client
from kelpie_sdk.errors import KelpieError
from kelpie_sdk.models import Job

__all__ = ["ChaosConfig", "ChaosReport", "register", "run_chaos"]

_BUCKET = "chaos"
_GROUP = "chaos"
_FAULT_KINDS = ("kill", "kill-save", "kill-upload", "server")
#: How long an armed kill point may wait for a save or upload before the
#: harness falls back to a plain kill.
_ARM_TIMEOUT_S = 8.0
_STATUS_STYLES = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "canceled": "magenta",
    "failed": "red",
}


@attrs.define(kw_only=True)
class ChaosConfig:
    """
    One chaos run's settings (the command's options).
    """

    jobs: int = 50
    workers: int = 4
    faults: int = 20
    seed: int | None = None
    steps: int = 12
    step_s: float = 0.2
    every: int = 3
    work: int = 200
    fail_rate: float = 0.02
    stall_rate: float = 0.02
    stall_s: float = 0.3
    hold_s: float = 4.0
    heartbeat: int = 1
    timeout: float = 600.0
    kinds: tuple[str, ...] = ("sum",)
    sabotage: str = ""
    storage: Path | None = None
    live: bool = False

    def check(self) -> None:
        """
        Raise UsageError for settings that cannot work.
        """
        if self.jobs < 1 or self.workers < 1 or self.faults < 0:
            raise UsageError(
                "--jobs and --workers must be at least 1 and --faults at least 0"
            )
        if self.steps < 1 or self.every < 1 or self.step_s < 0:
            raise UsageError("--steps and --every must be at least 1")
        if not 0 <= self.fail_rate < 0.5 or not 0 <= self.stall_rate < 1:
            raise UsageError(
                "--storage-fail-rate must be in [0, 0.5) and "
                "--storage-stall-rate in [0, 1)"
            )
        if self.heartbeat < 1:
            raise UsageError("--heartbeat must be at least 1 second")
        for name in self.kinds:
            if name != "all" and name not in JOB_KINDS:
                raise UsageError(
                    f"unknown job kind {name!r}; choose from {', '.join(JOB_KINDS)}"
                )
        for name in self.kinds:
            kind = JOB_KINDS.get(name)
            if kind is not None and not kind.available():
                raise UsageError(
                    f"job kind {name!r} cannot run here: it needs "
                    f"{kind.needs or 'extras that are not installed'}; install "
                    "them or choose other --kinds"
                )


@attrs.define
class _Fault:
    kind: str
    at: float
    machine: str = ""
    note: str = ""


@attrs.define
class ChaosReport:
    """
    What a chaos run found.

    Attributes:
        jobs: Jobs submitted.
        kinds: Jobs submitted, by job kind.
        completed: Jobs that completed.
        faults: The faults injected, by kind (storage faults included).
        interruptions: Attempts the queue took back from a lost machine
            (the server's count).
        retried_failures: Attempts that failed and were retried (the
            server's count; storage failures that outlasted the retries).
        lost_steps: Steps lost per interruption (computed again later).
        useful_steps: Steps the jobs needed.
        computed_steps: Steps the jobs computed, in all attempts.
        step_s: The mean time of one step, measured.
        wall_s: The run's wall time.
        failures: The checks that failed, one line each.
        timelines: For each job with a failed check, what each of its attempts
            did and where, one line each (to tell a fault from a defect).
    """

    jobs: int = 0
    kinds: Counter[str] = attrs.Factory(Counter)
    completed: int = 0
    faults: Counter[str] = attrs.Factory(Counter)
    interruptions: int = 0
    retried_failures: int = 0
    lost_steps: list[int] = attrs.Factory(list)
    useful_steps: int = 0
    computed_steps: int = 0
    step_s: float = 0.0
    wall_s: float = 0.0
    failures: list[str] = attrs.Factory(list)
    timelines: list[str] = attrs.Factory(list)

    @property
    def goodput(self) -> float:
        """Useful steps over steps computed."""
        return self.useful_steps / self.computed_steps if self.computed_steps else 0.0

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.failures

    def summary(self) -> str:
        """
        The report as text, one figure a line.
        """
        lost = sorted(self.lost_steps)

        def pct(q: float) -> int:
            return lost[min(len(lost) - 1, math.ceil(q * len(lost)) - 1)] if lost else 0

        process = sum(v for k, v in self.faults.items() if k in _FAULT_KINDS)
        storage = sum(v for k, v in self.faults.items() if k.startswith("storage-"))
        by_kind = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        total_lost = sum(lost)
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items())
        lines = [
            f"Jobs:                  {self.completed}/{self.jobs} completed"
            + (f" ({kinds})" if kinds else ""),
            f"Faults injected:       {process} process faults, {storage} storage "
            f"faults ({by_kind or 'none'})",
            f"Interruptions survived: {self.interruptions} "
            f"(and {self.retried_failures} failed attempts retried)",
            f"Compute lost:          {total_lost} steps "
            f"(~{total_lost * self.step_s:.1f} s of compute)",
            f"Lost work per interruption (steps): p50 {pct(0.5)}, p90 {pct(0.9)}, "
            f"max {lost[-1] if lost else 0}",
            f"Goodput:               {self.goodput:.1%} "
            f"({self.useful_steps} useful of {self.computed_steps} steps computed)",
            f"Wall time:             {self.wall_s:.1f} s",
        ]
        if self.failures:
            lines.append(f"FAILED: {len(self.failures)} check(s) did not hold:")
            lines.extend(f"  - {line}" for line in self.failures)
            if self.timelines:
                lines.append("What the attempts of those jobs did:")
                lines.extend(f"  {line}" for line in self.timelines)
        else:
            lines.append("All checks held.")
        return "\n".join(lines)


# -- the cluster ------------------------------------------------------------------


@attrs.define
class _ChaosCluster:
    root: Path
    config: ChaosConfig
    port: int
    key: str
    server: _Child | None = None
    workers: list[_Child] = attrs.Factory(list)
    machines: list[str] = attrs.Factory(list)
    generation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def storage_url(self) -> str:
        return f"chaos://{self.root / 'storage'}"

    def start_server(self) -> None:
        env = _clean_env()
        env["KELPIE_ADMIN_KEY"] = self.key
        self.server = _server_child(self.root, "127.0.0.1", self.port, env)
        self.server.start()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        return _wait_ready(self.url, self.key, self.server, timeout)

    def restart_server(self) -> bool:
        if self.server is not None:
            self.server.signal(signal.SIGKILL)
            self.server.wait(10)
            self.server.close()
        self.start_server()
        return self.wait_ready()

    def _worker(self, index: int) -> _Child:
        self.generation += 1
        machine = f"chaos-{index}-{self.generation}"
        home = self.root / "workers" / machine
        home.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        env = _worker_env(
            url=self.url,
            key=self.key,
            group=_GROUP,
            machine=machine,
            storage_url=self.storage_url,
            home=home,
            long_poll_s=2,
        )
        env.update(
            HEARTBEAT_INTERVAL_S=str(cfg.heartbeat),
            KELPIE_KILL_GRACE_S="2",
            MAX_RETRIES="10",
            KELPIE_CHAOS_DIR=str(self.control),
            KELPIE_CHAOS_FAIL_RATE=str(cfg.fail_rate),
            KELPIE_CHAOS_STALL_RATE=str(cfg.stall_rate),
            KELPIE_CHAOS_STALL_S=str(cfg.stall_s),
            KELPIE_CHAOS_HOLD_S=str(cfg.hold_s),
        )
        # The worker opens chaos:// URLs, so it registers that filesystem first.
        code = (
            "import sys; from kelpie_sdk import testing_faults; "
            "testing_faults.register(); "
            "from kelpie_sdk.worker._main import main; sys.exit(main())"
        )
        child = _Child(
            machine, [sys.executable, "-c", code], env, home, home / "worker.log"
        )
        child.start()
        return child

    def start_workers(self) -> None:
        for i in range(self.config.workers):
            child = self._worker(i)
            self.workers.append(child)

    def index_of(self, machine: str) -> int | None:
        for i, child in enumerate(self.workers):
            if child.name == machine:
                return i
        return None

    def kill_worker(self, index: int) -> str:
        """SIGKILL a worker and everything it started; start a new machine."""
        child = self.workers[index]
        if child.popen is not None:
            _kill_tree(child.popen.pid)
        child.wait(10)
        child.close()
        self.workers[index] = self._worker(index)
        return child.name

    def replace_dead(self) -> list[str]:
        dead = []
        for i, child in enumerate(self.workers):
            if child.poll() is not None:
                child.close()
                dead.append(child.name)
                self.workers[i] = self._worker(i)
        return dead

    def stop(self) -> None:
        for child in self.workers:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in self.workers:
            if child.wait(max(deadline - time.monotonic(), 0.1)) is None:
                if child.popen is not None:
                    _kill_tree(child.popen.pid)
                child.wait(5)
            child.close()
        if self.server is not None:
            self.server.signal(signal.SIGTERM)
            if self.server.wait(3) is None:
                self.server.signal(signal.SIGKILL)
                self.server.wait(5)
            self.server.close()


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (stopped first, so none escapes)."""
    todo, seen = [pid], []
    while todo:
        current = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGSTOP)
        seen.append(current)
        todo.extend(_children(current))
    for victim in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


# -- the run ------------------------------------------------------------------------


def _plan_faults(count: int, rng: random.Random) -> list[str]:
    """The kinds of ``count`` process faults, in the order they are injected."""
    if count == 0:
        return []
    servers = max(1, count // 10) if count >= 4 else 0
    saves = round(count * 0.25)
    uploads = round(count * 0.2)
    kills = max(count - servers - saves - uploads, 0)
    plan = (
        ["server"] * servers
        + ["kill-save"] * saves
        + ["kill-upload"] * uploads
        + ["kill"] * kills
    )[:count]
    rng.shuffle(plan)
    return plan


@attrs.define
class _JobSpec:
    name: str
    kind: str
    params: dict[str, str]
    expected: str
    events: Path
    result: Path
    job_id: str = ""


class _Run:
    def __init__(self, config: ChaosConfig, root: Path, out: Console) -> None:
        self.config = config
        self.root = root
        self.out = out
        self.rng = random.Random(config.seed)
        self.cluster = _ChaosCluster(
            root=root,
            config=config,
            port=_free_port("127.0.0.1"),
            key=_admin_key(root),
        )
        self.specs: list[_JobSpec] = []
        self.faults: list[_Fault] = []
        self.jobs: dict[str, Job] = {}
        self.armed: tuple[str, float] | None = None
        self.log: list[str] = []
        self.plan: list[str] = []

    # ---------------------------------------------------------------- setup

    def _make_specs(self) -> None:
        cfg = self.config
        (self.root / "events").mkdir(parents=True, exist_ok=True)
        names = (
            list(JOB_KINDS) if "all" in cfg.kinds else list(dict.fromkeys(cfg.kinds))
        )
        kinds: list[str] = []
        for name in names:
            if JOB_KINDS[name].available():
                kinds.append(name)
            else:
                self.out.print(
                    f"Skipping job kind {name!r}: it needs "
                    f"{JOB_KINDS[name].needs or 'extras that are not installed'}.",
                    highlight=False,
                    soft_wrap=True,
                )
        if not kinds:
            raise UsageError(
                f"none of the job kinds {', '.join(names)} can run here "
                "(are their extras installed?)"
            )
        for i in range(cfg.jobs):
            kind = kinds[i % len(kinds)]
            name = f"job-{i:04d}"
            params = {
                "CHAOS_STEPS": str(cfg.steps),
                "CHAOS_EVERY": str(cfg.every),
                "CHAOS_STEP_S": str(cfg.step_s),
                "CHAOS_WORK": str(cfg.work),
                "CHAOS_SEED": f"{cfg.seed}-{i}",
            }
            self.specs.append(
                _JobSpec(
                    name=name,
                    kind=kind,
                    params=params,
                    expected=JOB_KINDS[kind].expected(params),
                    events=self.root / "events" / f"{name}.jsonl",
                    result=self.root
                    / "storage"
                    / _BUCKET
                    / name
                    / "out"
                    / "result.json",
                )
            )

    def _submit(self, client: Client) -> None:
        cfg = self.config
        submissions = []
        for spec in self.specs:
            # Relative, so each worker resolves it in its own working directory:
            # every machine has its own disk, and an attempt that runs on after
            # its job moved (until its machine learns so) must not write into
            # the files of the attempt that took over.
            local = Path("local") / spec.name
            argv = JOB_KINDS[spec.kind].argv(spec.params)
            env = {
                **spec.params,
                EVENTS_ENV: str(spec.events),
                "RESULT_DIR": str(local / "out"),
            }
            if cfg.sabotage:
                env["CHAOS_SABOTAGE"] = cfg.sabotage
            submissions.append(
                {
                    "command": argv[0],
                    "arguments": argv[1:],
                    "environment": env,
                    "container_group_id": _GROUP,
                    "max_failures": 20,
                    "heartbeat_interval": cfg.heartbeat,
                    "sync": {
                        "during": [
                            {
                                "bucket": _BUCKET,
                                "prefix": f"{spec.name}/ckpt/",
                                "local_path": str(local / "ckpt"),
                                "direction": "upload",
                            }
                        ],
                        "after": [
                            {
                                "bucket": _BUCKET,
                                "prefix": f"{spec.name}/out/",
                                "local_path": str(local / "out"),
                                "direction": "upload",
                            }
                        ],
                    },
                }
            )
        for spec, job in zip(self.specs, client.submit_jobs(submissions), strict=True):
            spec.job_id = job.id

    # ---------------------------------------------------------------- faults

    def _note(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:6.1f}s"
        self.log.append(f"{stamp} {text}")
        if not self.config.live:
            self.out.print(f"[{stamp}] {text}", highlight=False, soft_wrap=True)

    def _running_machines(self) -> list[str]:
        return sorted(
            {
                j.machine_id
                for j in self.jobs.values()
                if j.status.value == "running" and j.machine_id
            }
        )

    def _kill_machine(self, machine: str, kind: str, note: str) -> bool:
        index = self.cluster.index_of(machine)
        if index is None:
            return False
        self.cluster.kill_worker(index)
        self.faults.append(_Fault(kind, time.monotonic(), machine, note))
        self._note(f"{kind}: SIGKILL {machine} {note}".rstrip())
        return True

    def _handle_hits(self) -> None:
        for hit in sorted(self.cluster.control.glob("hit-*.json")):
            try:
                data = json.loads(hit.read_text())
            except (OSError, ValueError):
                continue  # being written
            hit.unlink()
            parts = Path(data["path"]).parts
            job = next((p for p in parts if p.startswith("job-")), data["path"])
            if data["kind"] == "save":
                kind, what = (
                    "kill-save",
                    f"while saving a checkpoint of {job}",
                )
            else:
                kind, what = (
                    "kill-upload",
                    f"while uploading the output of {job}",
                )
            if self._kill_machine(data["machine"], kind, what):
                self.armed = None

    def _inject(self, kind: str) -> bool:
        if kind == "server":
            self._note("server: SIGKILL the API server and start it again")
            self.faults.append(_Fault("server", time.monotonic()))
            if not self.cluster.restart_server():
                raise RuntimeError(
                    "the API server did not come back after a restart: "
                    + _tail(self.root / "server.log")
                )
            return True
        if kind in ("kill-save", "kill-upload"):
            (self.cluster.control / f"arm-{kind.removeprefix('kill-')}").touch()
            self.armed = (kind, time.monotonic())
            return True
        machines = self._running_machines()
        if not machines:
            return False
        return self._kill_machine(self.rng.choice(machines), "kill", "")

    def _check_arm(self) -> None:
        if self.armed is None:
            return
        kind, since = self.armed
        if time.monotonic() - since < _ARM_TIMEOUT_S:
            return
        arm = self.cluster.control / f"arm-{kind.removeprefix('kill-')}"
        with contextlib.suppress(FileNotFoundError):
            arm.unlink()
        # No save or upload took it in time (or its machine was gone already).
        self.armed = None
        self._note(f"{kind}: no {kind[5:]} came in time; a plain kill instead")
        if not self._inject("kill"):
            self.plan.insert(0, "kill")

    # ---------------------------------------------------------------- loop

    def _progress(self) -> float:
        total = self.config.steps * len(self.specs)
        done = 0
        for job in self.jobs.values():
            if job.status.value == "completed":
                done += self.config.steps
            else:
                done += int((job.progress or {}).get("step") or 0)
        return done / total if total else 1.0

    def _poll(self, client: Client) -> bool:
        try:
            for job in client.list_jobs(container_group_id=_GROUP, page_size=500):
                self.jobs[job.id] = job
        except KelpieError:
            return False  # the server may be restarting
        return True

    def run(self) -> ChaosReport:
        cfg = self.config
        self.started = time.monotonic()
        self.wall_started = time.time()  # the jobs' events carry wall-clock times
        self.cluster.control.mkdir(parents=True, exist_ok=True)
        (self.root / "storage" / _BUCKET).mkdir(parents=True, exist_ok=True)
        self._make_specs()
        plan = self.plan = _plan_faults(cfg.faults, self.rng)
        # Fault i is due once the jobs are this far along, leaving the last
        # quarter of the run for the tail of jobs.
        due = [0.05 + 0.65 * (i + 1) / (len(plan) + 1) for i in range(len(plan))]
        self.cluster.start_server()
        if not self.cluster.wait_ready():
            raise RuntimeError(
                "the API server did not start: " + _tail(self.root / "server.log")
            )
        self.cluster.start_workers()
        deadline = self.started + cfg.timeout
        timed_out = False
        live: Live | None = None
        with Client(self.cluster.url, self.cluster.key, max_retries=8) as client:
            self._submit(client)
            self._note(
                f"submitted {len(self.specs)} jobs to {cfg.workers} workers; "
                f"{len(plan)} faults planned"
            )
            if cfg.live:
                live = Live(self._render(), console=self.out, refresh_per_second=4)
                live.start()
            try:
                while True:
                    self._handle_hits()
                    self._check_arm()
                    for name in self.cluster.replace_dead():
                        self._note(f"{name} exited; a new worker replaces it")
                    if not self._poll(client):
                        time.sleep(0.2)
                        continue
                    finished = [j for j in self.jobs.values() if j.status.finished]
                    if len(finished) == len(self.specs) and self.armed is None:
                        break
                    if time.monotonic() > deadline:
                        timed_out = True
                        break
                    if (
                        plan
                        and self.armed is None
                        and self._progress() >= due[len(due) - len(plan)]
                        and self._inject(plan[0])
                    ):
                        plan.pop(0)
                    if len(finished) == len(self.specs) and self.armed is not None:
                        # Nothing left to save or upload: give up on the arm.
                        self.armed = (self.armed[0], 0.0)
                    if live is not None:
                        live.update(self._render())
                    time.sleep(0.2)
            finally:
                if live is not None:
                    live.update(self._render())
                    live.stop()
        wall = time.monotonic() - self.started
        self.cluster.stop()
        report = self._verify(plan, timed_out)
        report.wall_s = wall
        return report

    def _render(self) -> Group:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        table.add_column("Job", no_wrap=True)
        table.add_column("Kind", no_wrap=True)
        table.add_column("Status")
        table.add_column("Step", justify="right")
        table.add_column("Attempts", justify="right")
        table.add_column("Interruptions", justify="right")
        table.add_column("Machine", no_wrap=True)
        for spec in self.specs:
            job = self.jobs.get(spec.job_id)
            if job is None:
                continue
            status = job.status.value
            step = (
                self.config.steps
                if status == "completed"
                else int((job.progress or {}).get("step") or 0)
            )
            table.add_row(
                spec.name,
                spec.kind,
                Text(status, style=_STATUS_STYLES[status]),
                f"{step}/{self.config.steps}",
                str(job.attempt or 0),
                str(job.num_interruptions or 0),
                job.machine_id if status == "running" else "",
            )
        counts = Counter(f.kind for f in self.faults)
        line = Text(
            f"faults so far: {sum(counts.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})"
        )
        return Group(table, line, Text("\n".join(self.log[-6:]), style="dim"))

    # ---------------------------------------------------------------- checks

    def _verify(self, left: Sequence[str], timed_out: bool) -> ChaosReport:
        cfg = self.config
        report = ChaosReport(jobs=len(self.specs))
        report.kinds.update(spec.kind for spec in self.specs)
        report.faults.update(f.kind for f in self.faults)
        for kind, count in _storage_faults(self.cluster.control).items():
            report.faults[f"storage-{kind}"] += count
        fail = report.failures.append
        if timed_out:
            fail(f"the run did not finish within --timeout {cfg.timeout:g} s")
        injected = sum(1 for f in self.faults if f.kind in _FAULT_KINDS)
        if left or injected < cfg.faults:
            fail(
                f"only {injected} of {cfg.faults} planned faults were injected "
                "(the jobs finished first: give them more --steps)"
            )
        # A job that kept computing after the queue gave it to another machine
        # may lose what it computed until it learned so: its lease (two
        # heartbeat intervals), the next heartbeat, and the worker's kill grace.
        detection_s = 3 * cfg.heartbeat + 2 + cfg.hold_s
        step_times: list[float] = []
        for spec in self.specs:
            job = self.jobs.get(spec.job_id)
            status = job.status.value if job is not None else "missing"
            if job is None or status != "completed":
                error = f" ({job.last_error})" if job and job.last_error else ""
                fail(f"{spec.name}: ended {status}{error}, not completed")
                continue
            report.completed += 1
            report.interruptions += job.num_interruptions or 0
            report.retried_failures += job.num_failures
            events = _read_events(spec.events)
            final = job.attempt or 0
            failed_before = len(report.failures)
            self._check_job(spec, final, events, report, detection_s, step_times)
            if len(report.failures) > failed_before:
                report.timelines.extend(_timeline(spec.name, events, self.wall_started))
        report.useful_steps = cfg.steps * len(self.specs)
        report.step_s = sum(step_times) / len(step_times) if step_times else 0.0
        return report

    def _check_job(
        self,
        spec: _JobSpec,
        final: int,
        events: list[dict[str, Any]],
        report: ChaosReport,
        detection_s: float,
        step_times: list[float],
    ) -> None:
        cfg = self.config
        fail = report.failures.append
        try:
            stored = json.loads(spec.result.read_text())
        except (OSError, ValueError) as exc:
            fail(f"{spec.name}: no readable output in storage ({exc})")
            stored = {}
        if stored and stored.get("result") != spec.expected:
            fail(
                f"{spec.name}: the output differs from an uninterrupted run "
                f"({_difference(str(stored.get('result')), spec.expected)})"
            )
        if stored and stored.get("attempt") != final:
            fail(
                f"{spec.name}: the stored output is from attempt "
                f"{stored.get('attempt')}, but attempt {final} completed the job"
            )
        for event in events:
            if event["e"] in ("corrupt", "fallback"):
                fail(
                    f"{spec.name}: attempt {event['a']} read back a bad checkpoint "
                    f"({event['e']} at step {event.get('step')})"
                )
        later = sorted({e["a"] for e in events if e["a"] > final})
        if later:
            fail(f"{spec.name}: attempts {later} ran after attempt {final} completed")
        by_attempt: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            by_attempt.setdefault(event["a"], []).append(event)
        starts = sorted(
            (a, next(e for e in evs if e["e"] == "start"))
            for a, evs in by_attempt.items()
            if any(e["e"] == "start" for e in evs)
        )
        for evs in by_attempt.values():
            steps = [e for e in evs if e["e"] == "step"]
            report.computed_steps += len(steps)
            times = [e["t"] for e in steps]
            step_times.extend(b - a for a, b in itertools.pairwise(times))
        if final not in by_attempt or not any(
            e["e"] == "done" for e in by_attempt[final]
        ):
            fail(f"{spec.name}: attempt {final} completed it but logged no 'done'")
        allowed_late = math.ceil(detection_s / max(cfg.step_s, 0.01))
        for pos, (attempt, _start) in enumerate(starts):
            if attempt == final:
                continue
            steps = [e for e in by_attempt[attempt] if e["e"] == "step"]
            nxt = next((s for a, s in starts[pos + 1 :] if a > attempt), None)
            if nxt is None:
                continue
            redone = [e for e in steps if e["step"] > nxt["step"]]
            before = [e for e in redone if e["t"] < nxt["t"]]
            after = len(redone) - len(before)
            report.lost_steps.append(len(redone))
            if len(before) > cfg.every:
                fail(
                    f"{spec.name}: attempt {attempt} lost {len(before)} steps "
                    f"(it reached step {steps[-1]['step']}, attempt {nxt['a']} "
                    f"resumed from step {nxt['step']}); the checkpoint interval "
                    f"is {cfg.every}"
                )
            if after > allowed_late:
                fail(
                    f"{spec.name}: attempt {attempt} went on for {after} steps "
                    f"after attempt {nxt['a']} took over (allowed: {allowed_late})"
                )


def _difference(got: str, expected: str) -> str:
    """Where two results part, briefly: ``at character 40: '12...' != '13...'``."""
    at = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    return (
        f"at character {at}: {got[at : at + 16]!r}... != {expected[at : at + 16]!r}..."
    )


def _timeline(name: str, events: list[dict[str, Any]], start: float) -> list[str]:
    """
    One line per attempt of a job: its machine, and when (seconds into the
    run) it started, saved, stepped and finished.
    """

    def label(event: dict[str, Any]) -> str:
        step = f" {event['step']}" if "step" in event else ""
        return f"{event['e']}{step} @{event['t'] - start:.1f}s"

    lines = []
    for attempt in sorted({e["a"] for e in events}):
        mine = [e for e in events if e["a"] == attempt]
        machines = ", ".join(sorted({str(e.get("m", "")) for e in mine}))
        # Every event but the steps; of those, the first and the last tell enough.
        parts = [label(e) for e in mine if e["e"] != "step"]
        steps = [e for e in mine if e["e"] == "step"]
        if steps:
            first, last = steps[0], steps[-1]
            parts.append(
                f"steps {first['step']}-{last['step']} "
                f"@{first['t'] - start:.1f}-{last['t'] - start:.1f}s"
            )
        lines.append(f"{name} attempt {attempt} on {machines}: " + "; ".join(parts))
    return lines


def _read_events(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))  # a killed writer may leave half a line
    return events


def _storage_faults(control: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for event in _read_events(control / "storage-faults.jsonl"):
        counts[str(event.get("kind"))] += 1
    return counts


def run_chaos(config: ChaosConfig, out: Console) -> ChaosReport:
    """
    Run one chaos run and check it; see the module docstring.

    Args:
        config: The settings.
        out: Where progress and the live table go.

    Returns:
        The report (``report.ok`` says whether every check held).
    """
    config.check()
    with contextlib.ExitStack() as stack:
        if config.storage is None:
            root = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="kelpie-chaos-"))
            )
        else:
            root = config.storage.expanduser().absolute()
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise UsageError(f"--storage {root} is not empty; give an empty dir")
        run = _Run(config, root, out)
        try:
            return run.run()
        finally:
            with contextlib.suppress(Exception):
                run.cluster.stop()


# -- the commands ----------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser, defaults: ChaosConfig) -> None:
    add = parser.add_argument
    add("--jobs", type=int, default=defaults.jobs, help=f"(default: {defaults.jobs})")
    add(
        "--workers",
        type=int,
        default=defaults.workers,
        help=f"(default: {defaults.workers})",
    )
    add(
        "--faults",
        type=int,
        default=defaults.faults,
        help="worker kills and server restarts to inject; storage faults come on "
        f"top (default: {defaults.faults})",
    )
    add("--seed", type=int, default=None, help="for a repeatable fault plan")
    add(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"steps per job (default: {defaults.steps})",
    )
    add(
        "--step-seconds",
        dest="step_s",
        type=float,
        default=defaults.step_s,
        help=f"the time one step takes (default: {defaults.step_s:g})",
    )
    add(
        "--every",
        type=int,
        default=defaults.every,
        help=f"checkpoint every N steps (default: {defaults.every})",
    )
    add(
        "--storage-fail-rate",
        dest="fail_rate",
        type=float,
        default=defaults.fail_rate,
        help="fraction of storage reads and writes that fail "
        f"(default: {defaults.fail_rate:g})",
    )
    add(
        "--storage-stall-rate",
        dest="stall_rate",
        type=float,
        default=defaults.stall_rate,
        help=f"fraction that stall first (default: {defaults.stall_rate:g})",
    )
    add(
        "--heartbeat",
        type=int,
        default=defaults.heartbeat,
        help=f"the jobs' heartbeat interval in seconds (default: {defaults.heartbeat})",
    )
    add(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help=f"give up after this many seconds (default: {defaults.timeout:g})",
    )
    add(
        "--kinds",
        default=",".join(defaults.kinds),
        help=f"job kinds, comma-separated, from: {', '.join(JOB_KINDS)}; 'all' "
        "for every kind whose extras are installed "
        f"(default: {','.join(defaults.kinds)})",
    )
    add(
        "--storage",
        metavar="DIR",
        default=None,
        help="keep the run's files in this empty directory (default: a temporary one)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``chaos`` and ``demo``.
    """
    chaos = subparsers.add_parser(
        "chaos",
        help="run many jobs while workers, the server and storage fail; check them",
        description=(
            "Start a local cluster, run --jobs jobs on --workers workers while "
            "injecting --faults faults (SIGKILL of workers, also in the middle of "
            "a checkpoint save and of an output upload; restarts of the server) "
            "and storage failures and stalls; then check that every job completed "
            "exactly once with the output of an uninterrupted run, that no "
            "checkpoint was read back corrupt and that no interruption lost more "
            "than a checkpoint interval. Exits 1 when a check fails."
        ),
    )
    _add_options(chaos, ChaosConfig())
    chaos.add_argument(
        "--live", action="store_true", help="show a live table instead of a log"
    )
    chaos.add_argument(
        "--sabotage",
        choices=["no-resume", "wrong-result"],
        default="",
        help="break the jobs on purpose, to see the checks fail: ignore the "
        "checkpoint on resume, or write a wrong result after an interruption",
    )
    chaos.set_defaults(handler=_chaos)

    demo = subparsers.add_parser(
        "demo",
        help="watch jobs finish exactly while their machines keep dying",
        description=(
            "A small chaos run with a live table: a local cluster (server, "
            "workers, file storage) runs checkpointing jobs while workers are "
            "killed (also mid-save and mid-upload), the server restarts and "
            "storage fails now and then; every result is checked against an "
            "uninterrupted computation. About a minute on two cores."
        ),
    )
    _add_options(demo, _DEMO)
    demo.set_defaults(handler=_demo)


_DEMO = ChaosConfig(
    kinds=("all",),
    jobs=12,
    workers=3,
    faults=8,
    steps=16,
    step_s=0.25,
    every=4,
    fail_rate=0.01,
    stall_rate=0.02,
    timeout=300,
)


def _config(args: argparse.Namespace, *, live: bool) -> ChaosConfig:
    kinds = tuple(k.strip() for k in str(args.kinds).split(",") if k.strip())
    return ChaosConfig(
        jobs=args.jobs,
        workers=args.workers,
        faults=args.faults,
        seed=args.seed if args.seed is not None else random.randrange(2**31),
        steps=args.steps,
        step_s=args.step_s,
        every=args.every,
        fail_rate=args.fail_rate,
        stall_rate=args.stall_rate,
        heartbeat=args.heartbeat,
        timeout=args.timeout,
        kinds=kinds,
        sabotage=getattr(args, "sabotage", ""),
        storage=Path(args.storage) if args.storage else None,
        live=live,
    )


def _finish(report: ChaosReport, config: ChaosConfig, out: Console) -> int:
    out.out(
        f"\nChaos run (seed {config.seed}): {config.jobs} jobs, {config.workers} "
        f"workers, {config.steps} steps of {config.step_s:g} s each, a checkpoint "
        f"every {config.every} steps."
    )
    out.out(report.summary())
    return 0 if report.ok else 1


def _chaos(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(args, live=bool(args.live))
    report = run_chaos(config, ctx.console)
    return _finish(report, config, ctx.console)


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(args, live=True)
    config.check()
    ctx.console.print(
        f"Starting a local cluster: the API server, {config.workers} workers and "
        f"file storage. {config.jobs} jobs will run while {config.faults} faults "
        "hit them (workers killed, also mid-save and mid-upload; the server "
        "restarted) and storage fails now and then.",
        highlight=False,
    )
    report = run_chaos(config, ctx.console)
    return _finish(report, config, ctx.console)
