"""
Helpers for running the examples: load one as a module, run one with SIGKILLs at
random points, start a worker subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import attrs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def load_example(relative: str) -> ModuleType:
    """
    Import ``examples/<relative>`` as a module (the examples are not a package).
    """
    path = EXAMPLES / relative
    name = "example_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """
    The test's environment without KELPIE_*/SALAD_* variables, plus ``extra``.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KELPIE_", "SALAD_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def kill_points(
    rng: random.Random, low: int, high: int, count: int, gap: int
) -> list[int]:
    """
    ``count`` increasing steps in ``[low, high)``, at least ``gap`` apart.
    """
    span = high - low - (count - 1) * gap
    assert span > count, "the run is too short for that many kills"
    offsets = sorted(rng.sample(range(span), count))
    return [low + offset + i * gap for i, offset in enumerate(offsets)]


def progress_step(path: Path) -> int:
    """
    The step in a ``report_progress`` file, or -1 when there is none yet.
    """
    try:
        return int(json.loads(path.read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1


@attrs.frozen
class Attempt:
    """One run of the job: its exit code and what it printed."""

    returncode: int
    output: str


def run_with_kills(
    cmd: Sequence[str],
    env: dict[str, str],
    *,
    progress_file: Path,
    kill_at: Sequence[int],
    log_dir: Path,
    rng: random.Random,
    timeout: float = 60.0,
) -> list[Attempt]:
    """
    Run ``cmd``, SIGKILL it once its progress reaches each step of ``kill_at``
    (after a random 0-20 ms more, so kills land anywhere, saves included),
    restart it, and finally let it run to the end.

    Returns:
        Every attempt, the killed ones first.
    """
    env = {**env, "KELPIE_PROGRESS_FILE": str(progress_file)}
    attempts: list[Attempt] = []
    for number, target in enumerate([*kill_at, None], start=1):
        progress_file.unlink(missing_ok=True)
        log = log_dir / f"attempt-{number}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(cmd),
                env={**env, "KELPIE_ATTEMPT": str(number)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + timeout
                if target is not None:
                    while progress_step(progress_file) < target:
                        if proc.poll() is not None:
                            raise AssertionError(
                                f"attempt {number} ended (code {proc.returncode}) "
                                f"before step {target}:\n{log.read_text()}"
                            )
                        if time.monotonic() > deadline:
                            raise AssertionError(
                                f"attempt {number} did not reach step {target} in "
                                f"{timeout} s:\n{log.read_text()}"
                            )
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0.0, 0.02))
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        attempts.append(Attempt(proc.returncode, log.read_text()))
    return attempts


def start_worker(
    home: Path, *, api_url: str, api_key: str, group: str, storage_url: str, slots: int
) -> subprocess.Popen[bytes]:
    """
    Start ``kelpie worker`` (as ``python -m kelpie_sdk worker``) with its own
    directories under ``home``.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(
        KELPIE_API_URL=api_url,
        KELPIE_API_KEY=api_key,
        SALAD_CONTAINER_GROUP_ID=group,
        SALAD_MACHINE_ID=f"machine-{home.name}",
        KELPIE_STATE_FILE=str(home / "state.json"),
        INPUT_DIR=str(home / "input"),
        OUTPUT_DIR=str(home / "output"),
        CHECKPOINT_DIR=str(home / "checkpoint"),
        KELPIE_STORAGE_URL=storage_url,
        KELPIE_LONG_POLL_S="5",
        KELPIE_KILL_GRACE_S="3",
        KELPIE_SLOTS=str(slots),
        KELPIE_LOG_LEVEL="info",
    )
    with (home / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kelpie_sdk", "worker"],
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """
    SIGTERM to every worker at once (running jobs are released), then SIGKILL to
    any that lingers.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
