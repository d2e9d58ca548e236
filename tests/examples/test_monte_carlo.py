"""
examples/monte_carlo: the result is bit-identical however often the run is killed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tests.examples.helpers import (
    EXAMPLES,
    clean_env,
    kill_points,
    load_example,
    run_with_kills,
)

SCRIPT = EXAMPLES / "monte_carlo" / "monte_carlo.py"
BATCHES, PATHS, EVERY = 60, 20_000, 4


def test_killed_run_is_bit_identical(tmp_path: Path) -> None:
    """Three SIGKILLs at random batches, three restarts: the same bytes as one run."""
    mc = load_example("monte_carlo/monte_carlo.py")
    params = mc.Params(batches=BATCHES, paths_per_batch=PATHS, seed=11)
    expected = mc.dumps(mc.expected_result(params))
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kill_at = kill_points(rng, 2 * EVERY, BATCHES - 4, count=3, gap=2 * EVERY)
    cmd = [
        sys.executable,
        str(SCRIPT),
        f"--batches={BATCHES}",
        f"--paths={PATHS}",
        "--seed=11",
        f"--every={EVERY}",
        "--pause=0.02",
        f"--output={tmp_path / 'out'}",
    ]
    env = clean_env(KELPIE_CHECKPOINT_URL=f"file://{tmp_path}/ckpt")
    attempts = run_with_kills(
        cmd,
        env,
        progress_file=tmp_path / "progress.json",
        kill_at=kill_at,
        log_dir=tmp_path,
        rng=rng,
    )
    why = f"(random seed {seed}, kills at batches {kill_at})"
    assert [-9, -9, -9, 0] == [a.returncode for a in attempts], why
    starts = [
        int(line.split()[3])
        for a in attempts
        for line in a.output.splitlines()
        if line.startswith("starting at batch")
    ]
    # Each restart resumed from a checkpoint, never from scratch nor from the future.
    assert 4 == len(starts), why
    assert 0 == starts[0], why
    for previous, start, killed_at in zip(
        starts[:-1], starts[1:], kill_at, strict=True
    ):
        assert previous <= start <= killed_at + 1, (starts, why)
    assert starts[-1] > 0, why
    assert expected == (tmp_path / "out" / "result.json").read_text(), why
    assert expected == attempts[-1].output.splitlines(keepends=True)[-1], why


def test_result_does_not_depend_on_checkpoint_interval(tmp_path: Path) -> None:
    """A run resumed from a checkpoint taken at another interval gives the same result."""
    mc = load_example("monte_carlo/monte_carlo.py")
    params = mc.Params(batches=12, paths_per_batch=1000, seed=3)
    ckpt = mc.checkpoint.Checkpointer(f"file://{tmp_path}/ckpt", every_steps=5)
    state = mc.initial_state(params)
    rng = mc.generator(state)
    for _ in range(7):
        mc.run_batch(state, rng, params)
        if ckpt.should_save(state["batch"]):
            ckpt.save(state, step=state["batch"])
    ckpt.close()
    resumed = mc.checkpoint.Checkpointer(f"file://{tmp_path}/ckpt", every_steps=3)
    assert 5 == resumed.latest_step()
    result = mc.simulate(params, resumed)
    assert mc.expected_result(params) == result
    assert json.loads(mc.dumps(result))["price_hex"] == result["price"].hex()


def test_checkpoint_of_other_parameters_is_refused(tmp_path: Path) -> None:
    """A checkpoint made with other parameters stops the run with a clear message."""
    mc = load_example("monte_carlo/monte_carlo.py")
    url = f"file://{tmp_path}/ckpt"
    ckpt = mc.checkpoint.Checkpointer(url, every_steps=1)
    ckpt.save(mc.initial_state(mc.Params(seed=1)), step=1, blocking=True)
    ckpt.close()
    with pytest.raises(SystemExit, match="from a run with other parameters"):
        mc.simulate(mc.Params(seed=2), mc.checkpoint.Checkpointer(url))
