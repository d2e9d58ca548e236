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

``python -m kelpie_sdk.chaos_jobs KIND`` runs one attempt of a built-in kind.
Each has ``CHAOS_STEPS`` steps, each at least ``CHAOS_STEP_S`` seconds, with a
checkpoint every ``CHAOS_EVERY`` steps and after the last one; ``CHAOS_SEED``
seeds it:

- ``sum`` (pure Python): a SHA-256 chain, each step ``CHAOS_WORK`` hashes long;
- ``monte_carlo`` (needs numpy): the Monte Carlo example
  (``examples/monte_carlo/monte_carlo.py``), one batch of ``20 * CHAOS_WORK``
  paths a step; its result is the example's ``result.json`` text;
- ``pytorch`` (needs torch): the PyTorch example
  (``examples/pytorch_training/train.py``), one optimizer step a step, over two
  or three epochs; its result is the example's ``result.json`` text, which
  holds a hash of the final weights.

The two example kinds run the example scripts' own functions, step by step, in
the same loop as ``sum``. The wheel carries a copy of both scripts
(``kelpie_sdk/_examples/``); from a checkout they are read from ``examples/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import attrs

from kelpie_sdk import checkpoint
from kelpie_sdk.testing_faults import append_json_line
from kelpie_sdk.testing_faults import register as register_fault_fs

__all__ = [
    "EVENTS_ENV",
    "JOB_KINDS",
    "EventLog",
    "JobKind",
    "example_path",
    "register_job_kind",
    "state_digest",
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
        needs: What it needs that may be missing, for the message when it
            cannot run (``"torch (pip install torch)"``).
    """

    name: str
    argv: Callable[[Mapping[str, str]], list[str]]
    expected: Callable[[Mapping[str, str]], str]
    available: Callable[[], bool] = lambda: True
    needs: str = ""


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
        append_json_line(self.path, record)


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


def _feed(digest: Any, obj: Any) -> None:
    """Feed ``obj`` to ``digest`` unambiguously: its types, order and bytes."""
    if isinstance(obj, dict):
        digest.update(b"{%d" % len(obj))
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, list | tuple):
        digest.update(b"[%d" % len(obj))
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, bool | int | float | str | bytes):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif hasattr(obj, "detach"):  # a torch tensor
        _feed(digest, obj.detach().cpu().contiguous().numpy())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # a numpy array
        digest.update(f"array:{obj.dtype}:{obj.shape}:".encode())
        digest.update(obj.tobytes())
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} in a chaos job's state")


def state_digest(step: int, state: Any) -> str:
    """
    The digest a chaos job stores next to its state, and checks on loading.
    """
    digest = hashlib.sha256()
    _feed(digest, {"step": step, "state": state})
    return digest.hexdigest()


class _Task(Protocol):
    """One chaos job's computation, one step at a time."""

    @property
    def total(self) -> int:
        """The steps the job has to compute."""

    @property
    def step(self) -> int:
        """The steps computed so far."""

    def advance(self) -> None:
        """Compute the next step."""

    def state(self) -> Any:
        """Everything the next step depends on (the checkpoint's state)."""

    def restore(self, state: Any) -> None:
        """Continue from a state that ``state()`` returned."""

    def result(self) -> str:
        """The job's result, once every step is done."""


def _run_job(make: Callable[[Mapping[str, str]], _Task]) -> int:
    """
    Run one attempt of a chaos job: resume, compute, checkpoint, log, write.
    """
    register_fault_fs()
    log = EventLog()
    every = _int_env("CHAOS_EVERY", 3)
    pause = float(os.environ.get("CHAOS_STEP_S") or 0.2)
    sabotage = os.environ.get("CHAOS_SABOTAGE", "")
    out_dir = Path(os.environ.get("RESULT_DIR") or os.environ["OUTPUT_DIR"])

    task = make(os.environ)
    ckpt = checkpoint.Checkpointer(every_steps=every, keep_last=2)
    latest = _retry(ckpt.latest_step)
    if latest is not None and sabotage != "no-resume":
        saved = _retry(ckpt.load)
        loaded = ckpt.loaded_step if ckpt.loaded_step is not None else latest
        try:
            if not isinstance(saved, dict):
                raise TypeError("it holds no chaos job state")
            if saved.get("step") != loaded:
                raise ValueError(f"it says it is step {saved.get('step')}")
            if saved.get("digest") != state_digest(loaded, saved.get("state")):
                raise ValueError("its state does not match its digest")
            task.restore(saved["state"])
            if task.step != loaded:
                raise ValueError(f"its state is at step {task.step}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.event("corrupt", step=loaded, latest=latest)
            sys.stderr.write(f"checkpoint step {loaded} fails its own check: {exc}\n")
            return 3
        if loaded != latest:
            log.event("fallback", step=loaded, latest=latest)
    log.event("start", step=task.step)
    while task.step < task.total:
        deadline = time.monotonic() + pause
        task.advance()
        time.sleep(max(deadline - time.monotonic(), 0.0))
        step = task.step
        log.event("step", step=step)
        if step % every == 0 or step == task.total:
            state = task.state()
            saved = {"step": step, "state": state, "digest": state_digest(step, state)}
            _save(ckpt, saved, step)
            log.event("saved", step=step)
        checkpoint.report_progress(step, task.total)
    ckpt.close()
    result = task.result()
    if sabotage == "wrong-result" and log.attempt > 1:
        result = hashlib.sha256(result.encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(json.dumps({"result": result, "attempt": log.attempt}))
    tmp.replace(out_dir / "result.json")
    log.event("done")
    return 0


def _params(env: Mapping[str, str]) -> tuple[str, int, int]:
    """A job's seed, steps and work per step."""
    return (
        env.get("CHAOS_SEED", "0"),
        int(env.get("CHAOS_STEPS") or 12),
        int(env.get("CHAOS_WORK") or 200),
    )


def _int_seed(seed: str) -> int:
    """A job's seed as a number for the examples' generators (below 2**31)."""
    return int.from_bytes(_seed_value(seed)[:4], "big") >> 1


# -- the built-in job: a SHA-256 chain ------------------------------------------


@attrs.define
class _SumTask:
    total: int
    work: int
    value: bytes
    step: int = 0

    def advance(self) -> None:
        self.value = _advance(self.value, self.step, self.work)
        self.step += 1

    def state(self) -> Any:
        return {"step": self.step, "value": self.value.hex()}

    def restore(self, state: Any) -> None:
        self.value = bytes.fromhex(state["value"])
        self.step = int(state["step"])

    def result(self) -> str:
        return self.value.hex()


def _sum_task(env: Mapping[str, str]) -> _SumTask:
    seed, steps, work = _params(env)
    return _SumTask(total=steps, work=work, value=_seed_value(seed))


def run_sum_job() -> int:
    """
    Run one attempt of the built-in job; return its exit code.
    """
    return _run_job(_sum_task)


def _sum_argv(params: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "kelpie_sdk.chaos_jobs", "sum"]


def _sum_expected(params: Mapping[str, str]) -> str:
    return sum_chain(*_params(params))


register_job_kind(JobKind(name="sum", argv=_sum_argv, expected=_sum_expected))

_MAINS: dict[str, Callable[[], int]] = {"sum": run_sum_job}


# -- the examples: Monte Carlo (numpy) and PyTorch training ----------------------


def example_path(file: str) -> Path | None:
    """
    Where an example script (``monte_carlo.py`` or ``train.py``) is: the copy
    the wheel carries (``kelpie_sdk/_examples/``), or the checkout's
    ``examples/`` next to this package; None when neither is there.
    """
    here = Path(__file__).resolve().parent
    stem = file.removesuffix(".py")
    folder = {"monte_carlo": "monte_carlo", "train": "pytorch_training"}[stem]
    for candidate in (
        here / "_examples" / file,
        here.parent / "examples" / folder / file,
    ):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _example(file: str) -> ModuleType:
    """Import an example script as a module (once)."""
    path = example_path(file)
    if path is None:
        raise FileNotFoundError(
            f"the example {file} is not installed with kelpie_sdk; reinstall "
            "kelpie-sdk from its wheel or run from a checkout"
        )
    name = f"kelpie_sdk._examples_{file.removesuffix('.py')}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the example {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@functools.cache
def _imports(*modules: str) -> bool:
    try:
        for module in modules:
            importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def _monte_carlo_params(params: Mapping[str, str]) -> Any:
    seed, steps, work = _params(params)
    mc = _example("monte_carlo.py")
    return mc.Params(batches=steps, paths_per_batch=20 * work, seed=_int_seed(seed))


class _MonteCarloTask:
    """The Monte Carlo example's batches, one step each."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.mc = _example("monte_carlo.py")
        self.params = _monte_carlo_params(env)
        self._state: dict[str, Any] = self.mc.initial_state(self.params)
        self._rng = self.mc.generator(self._state)

    @property
    def total(self) -> int:
        return int(self.params.batches)

    @property
    def step(self) -> int:
        return int(self._state["batch"])

    def advance(self) -> None:
        self.mc.run_batch(self._state, self._rng, self.params)

    def state(self) -> Any:
        return self._state

    def restore(self, state: Any) -> None:
        if state["params"] != dataclasses.asdict(self.params):
            raise ValueError(
                f"it is from a run with other parameters ({state['params']})"
            )
        self._state = state
        self._rng = self.mc.generator(state)

    def result(self) -> str:
        return str(self.mc.dumps(self.mc.summarize(self._state, self.params)))


def _monte_carlo_expected(params: Mapping[str, str]) -> str:
    mc = _example("monte_carlo.py")
    return str(mc.dumps(mc.expected_result(_monte_carlo_params(params))))


def _torch_config(params: Mapping[str, str]) -> Any:
    seed, steps, _work = _params(params)
    train = _example("train.py")
    # Two or three epochs when the steps divide evenly, so that some interruptions
    # fall in the middle of an epoch and some at an epoch's end.
    epochs = next(e for e in (2, 3, 1) if steps % e == 0)
    batch_size = 16
    return train.Config(
        epochs=epochs,
        samples=steps // epochs * batch_size,
        batch_size=batch_size,
        seed=_int_seed(seed),
    )


class _TorchTask:
    """The PyTorch example's training, one optimizer step each."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import torch

        # As in the example: one thread, the same sums in the same order.
        torch.set_num_threads(1)
        self.train = _example("train.py")
        self.config = _torch_config(env)
        self.run = self.train.build(self.config)
        self._steps: Iterator[None] | None = None

    def _loop(self) -> Iterator[None]:
        # The example's training loop, paused after every step.
        run = self.run
        while run.epoch < self.config.epochs:
            for x, y in self.train.batches(run):
                self.train.train_step(run, x, y)
                yield
            run.epoch += 1
            run.batch = 0

    @property
    def total(self) -> int:
        return int(self.config.total_steps)

    @property
    def step(self) -> int:
        return int(self.run.step)

    def advance(self) -> None:
        if self._steps is None:
            self._steps = self._loop()
        next(self._steps)

    def state(self) -> Any:
        return self.train.state_of(self.run)

    def restore(self, state: Any) -> None:
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError("it is from a run with another configuration")
        self.train.restore(self.run, state)

    def result(self) -> str:
        return str(self.train.dumps(self.train.summarize(self.run)))


def _torch_expected(params: Mapping[str, str]) -> str:
    train = _example("train.py")
    # The example says where it starts; that is no business of the harness's.
    with contextlib.redirect_stdout(io.StringIO()):
        result, _weights = train.expected_result(_torch_config(params))
    return str(train.dumps(result))


def _example_argv(kind: str) -> Callable[[Mapping[str, str]], list[str]]:
    def argv(params: Mapping[str, str]) -> list[str]:
        return [sys.executable, "-m", "kelpie_sdk.chaos_jobs", kind]

    return argv


if example_path("monte_carlo.py") is not None:
    register_job_kind(
        JobKind(
            name="monte_carlo",
            argv=_example_argv("monte_carlo"),
            expected=_monte_carlo_expected,
            available=lambda: _imports("numpy"),
            needs="numpy (pip install numpy)",
        )
    )
    _MAINS["monte_carlo"] = lambda: _run_job(_MonteCarloTask)
if example_path("train.py") is not None:
    register_job_kind(
        JobKind(
            name="pytorch",
            argv=_example_argv("pytorch"),
            expected=_torch_expected,
            available=lambda: _imports("numpy", "torch"),
            needs="torch and numpy (pip install torch numpy)",
        )
    )
    _MAINS["pytorch"] = lambda: _run_job(_TorchTask)


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
