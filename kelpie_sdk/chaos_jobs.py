"""
The jobs that ``kelpie chaos`` and ``kelpie demo`` run, and how to add more.

A *job kind* says how to start a job (its command line), what its result must
be (computed here, in-process, without interruptions) and whether it can run
on this machine (its extras are installed). :data:`JOB_KINDS` holds them by
name; :func:`register_job_kind` adds one.

A chaos job follows three rules, so that the harness can judge it:

- it checkpoints with :mod:`kelpie_sdk.checkpoint` to ``KELPIE_CHECKPOINT_URL``
  and reports its progress with ``checkpoint.report_progress``;
- it records what it does with :class:`EventLog` (``start`` with the step it
  resumed from, each ``step`` it computed, ``saved``, ``done``, and
  ``corrupt`` when a checkpoint it loaded fails its own check);
- it writes its result, with the attempt that wrote it, to
  ``$RESULT_DIR/result.json``, which the worker uploads when the job exits.

``python -m kelpie_sdk.chaos_jobs sum`` runs the built-in pure-Python job:
``CHAOS_STEPS`` steps of a SHA-256 chain seeded by ``CHAOS_SEED``, each
``CHAOS_WORK`` hashes long and at least ``CHAOS_STEP_S`` seconds, with a
checkpoint every ``CHAOS_EVERY`` steps and after the last one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from kelpie_sdk import checkpoint
from kelpie_sdk.testing_faults import register as register_fault_fs

__all__ = [
    "EVENTS_ENV",
    "JOB_KINDS",
    "EventLog",
    "JobKind",
    "register_job_kind",
    "sum_chain",
]

#: The variable that names a job's event log (JSON lines, appended).
EVENTS_ENV = "CHAOS_EVENTS"

_T = TypeVar("_T")


@attrs.frozen(kw_only=True)
class JobKind:
    """
    One kind of chaos job.

    Attributes:
        name: Its name on the command line (``--kinds``).
        argv: The command line that runs one attempt (``argv[0]`` is the
            program), given the job's parameters.
        expected: The exact bytes its ``result`` value must hold, computed
            without interruptions, given the same parameters.
        available: Whether it can run here (its extras are installed).
    """

    name: str
    argv: Callable[[Mapping[str, str]], list[str]]
    expected: Callable[[Mapping[str, str]], str]
    available: Callable[[], bool] = lambda: True


#: Job kinds by name.
JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(kind: JobKind) -> None:
    """
    Add (or replace) a job kind.
    """
    JOB_KINDS[kind.name] = kind


class EventLog:
    """
    Appends one JSON line per event to the file named by ``CHAOS_EVENTS``.

    Each line holds the event, the attempt (``KELPIE_ATTEMPT``), the machine,
    the time and the given fields. Without the variable, nothing is written.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(EVENTS_ENV) or None
        self.attempt = int(os.environ.get("KELPIE_ATTEMPT") or 0)
        self.machine = os.environ.get("SALAD_MACHINE_ID", "")

    def event(self, name: str, **fields: Any) -> None:
        """
        Record one event (one ``write`` on an append-only file).
        """
        if self.path is None:
            return
        record = {
            "e": name,
            "a": self.attempt,
            "m": self.machine,
            "t": time.time(),
            **fields,
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)


# -- the built-in job: a SHA-256 chain ------------------------------------------


def _seed_value(seed: str) -> bytes:
    return hashlib.sha256(f"kelpie-chaos:{seed}".encode()).digest()


def _advance(value: bytes, step: int, work: int) -> bytes:
    for _ in range(max(work, 1)):
        value = hashlib.sha256(value + step.to_bytes(8, "big")).digest()
    return value


def sum_chain(seed: str, steps: int, work: int) -> str:
    """
    The built-in job's result, computed in one go: the hex chain value.
    """
    value = _seed_value(seed)
    for step in range(steps):
        value = _advance(value, step, work)
    return value.hex()


def _state_digest(step: int, value: str) -> str:
    return hashlib.sha256(f"{step}:{value}".encode()).hexdigest()


def _retry(fn: Callable[[], _T], tries: int = 10) -> _T:
    """Retry a checkpoint call through storage errors (the store may be flaky)."""
    for attempt in range(tries):
        try:
            return fn()
        except checkpoint.CheckpointStorageError:
            if attempt == tries - 1:
                raise
            time.sleep(min(0.1 * 2**attempt, 1.0))
    raise AssertionError("unreachable")  # pragma: no cover


def _save(ckpt: checkpoint.Checkpointer, state: dict[str, Any], step: int) -> None:
    def save() -> None:
        # Already committed (by this job's previous holder): the same state.
        with contextlib.suppress(checkpoint.CheckpointConflictError):
            ckpt.save(state, step=step, blocking=True)

    _retry(save)


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def run_sum_job() -> int:
    """
    Run one attempt of the built-in job; return its exit code.
    """
    register_fault_fs()
    log = EventLog()
    total = _int_env("CHAOS_STEPS", 12)
    every = _int_env("CHAOS_EVERY", 3)
    work = _int_env("CHAOS_WORK", 200)
    pause = float(os.environ.get("CHAOS_STEP_S") or 0.2)
    seed = os.environ.get("CHAOS_SEED", "0")
    sabotage = os.environ.get("CHAOS_SABOTAGE", "")
    out_dir = Path(os.environ.get("RESULT_DIR") or os.environ["OUTPUT_DIR"])

    ckpt = checkpoint.Checkpointer(every_steps=every, keep_last=2)
    latest = _retry(ckpt.latest_step)
    value = _seed_value(seed)
    start = 0
    if latest is not None and sabotage != "no-resume":
        state = _retry(ckpt.load)
        loaded = ckpt.loaded_step
        if (
            not isinstance(state, dict)
            or state.get("step") != loaded
            or state.get("digest") != _state_digest(loaded or 0, state.get("value", ""))
        ):
            log.event("corrupt", step=loaded, latest=latest)
            sys.stderr.write(f"checkpoint step {loaded} fails its own check\n")
            return 3
        if loaded != latest:
            log.event("fallback", step=loaded, latest=latest)
        value = bytes.fromhex(state["value"])
        start = int(state["step"])
    log.event("start", step=start)
    for step in range(start, total):
        deadline = time.monotonic() + pause
        value = _advance(value, step, work)
        time.sleep(max(deadline - time.monotonic(), 0.0))
        log.event("step", step=step + 1)
        if (step + 1) % every == 0 or step + 1 == total:
            hexed = value.hex()
            state = {
                "step": step + 1,
                "value": hexed,
                "digest": _state_digest(step + 1, hexed),
            }
            _save(ckpt, state, step + 1)
            log.event("saved", step=step + 1)
        checkpoint.report_progress(step + 1, total)
    ckpt.close()
    result = value.hex()
    if sabotage == "wrong-result" and log.attempt > 1:
        result = hashlib.sha256(value).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(json.dumps({"result": result, "attempt": log.attempt}))
    tmp.replace(out_dir / "result.json")
    log.event("done")
    return 0


def _sum_argv(params: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "kelpie_sdk.chaos_jobs", "sum"]


def _sum_expected(params: Mapping[str, str]) -> str:
    return sum_chain(
        params.get("CHAOS_SEED", "0"),
        int(params.get("CHAOS_STEPS") or 12),
        int(params.get("CHAOS_WORK") or 200),
    )


register_job_kind(JobKind(name="sum", argv=_sum_argv, expected=_sum_expected))

_MAINS: dict[str, Callable[[], int]] = {"sum": run_sum_job}


def main(argv: Sequence[str] | None = None) -> int:
    """
    ``python -m kelpie_sdk.chaos_jobs KIND``: run one attempt of a built-in job.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in _MAINS:
        sys.stderr.write(
            f"usage: python -m kelpie_sdk.chaos_jobs {{{','.join(_MAINS)}}}\n"
        )
        return 2
    return _MAINS[args[0]]()


if __name__ == "__main__":
    sys.exit(main())
