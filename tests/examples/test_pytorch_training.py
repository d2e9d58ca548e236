"""
examples/pytorch_training: killed and resumed training ends with bit-identical weights.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.examples.helpers import (
    EXAMPLES,
    clean_env,
    kill_points,
    load_example,
    run_with_kills,
)

SCRIPT = EXAMPLES / "pytorch_training" / "train.py"
EPOCHS, SAMPLES, BATCH, EVERY = 3, 1024, 32, 5
STEPS_PER_EPOCH = SAMPLES // BATCH
STARTED = re.compile(
    r"^starting at step (\d+) of \d+ \(epoch (\d+), batch (\d+);", re.M
)


def test_killed_training_is_bit_identical(tmp_path: Path) -> None:
    """Two SIGKILLs at random steps, two resumes: the same weights, bit for bit."""
    train = load_example("pytorch_training/train.py")
    config = train.Config(epochs=EPOCHS, samples=SAMPLES, batch_size=BATCH, seed=5)
    expected, weights = train.expected_result(config)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    total = EPOCHS * STEPS_PER_EPOCH
    kill_at = kill_points(rng, 2 * EVERY, total - 4, count=2, gap=2 * EVERY)
    cmd = [
        sys.executable,
        str(SCRIPT),
        f"--epochs={EPOCHS}",
        f"--samples={SAMPLES}",
        f"--batch-size={BATCH}",
        "--seed=5",
        f"--every={EVERY}",
        "--pause=0.015",
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
    why = f"(random seed {seed}, kills at steps {kill_at})"
    assert [-9, -9, 0] == [a.returncode for a in attempts], why
    starts = [
        tuple(int(g) for g in STARTED.search(a.output).groups())  # type: ignore[union-attr]
        for a in attempts
    ]
    assert (0, 0, 0) == starts[0], why
    for (previous, *_), (step, epoch, batch), killed_at in zip(
        starts[:-1], starts[1:], kill_at, strict=True
    ):
        assert previous <= step <= killed_at + 1, (starts, why)
        assert (epoch, batch) == divmod(step, STEPS_PER_EPOCH), (starts, why)
    # Checkpoints every 5 steps, 32 steps an epoch: every resume but one from 0
    # starts mid-epoch, with the loader skipping the batches already done.
    assert any(batch > 0 for _, _, batch in starts), (starts, why)
    assert train.dumps(expected) == (tmp_path / "out" / "result.json").read_text(), why
    resumed = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert weights.keys() == resumed.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed[name]), (name, why)


@pytest.mark.parametrize("stop_after", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7])
def test_resume_in_process(tmp_path: Path, stop_after: int) -> None:
    """Stopping at an epoch's end or in its middle, and resuming, changes nothing."""
    train = load_example("pytorch_training/train.py")
    config = train.Config(epochs=2, samples=SAMPLES, batch_size=BATCH, seed=1)
    expected, _ = train.expected_result(config)

    class Stop(Exception):
        pass

    url = f"file://{tmp_path}/ckpt"
    ckpt = train.checkpoint.Checkpointer(url, every_steps=stop_after)
    real_save = ckpt.save

    def save_then_stop(state: object, *, step: int) -> None:
        real_save(state, step=step, blocking=True)
        raise Stop

    ckpt.save = save_then_stop
    with train.isolated_randomness():
        with pytest.raises(Stop):
            train.train(config, ckpt)
        # The interruption scrambles every generator the run uses.
        random.seed(99)
        train.np.random.seed(99)
        torch.manual_seed(99)
        run = train.train(config, train.checkpoint.Checkpointer(url, every_steps=1000))
        assert expected == train.summarize(run)


def test_checkpoint_of_other_config_is_refused(tmp_path: Path) -> None:
    """A checkpoint made with another configuration stops the run with a clear message."""
    train = load_example("pytorch_training/train.py")
    url = f"file://{tmp_path}/ckpt"
    first = train.Config(epochs=1, samples=64, batch_size=32, seed=1)
    other = train.Config(epochs=1, samples=64, batch_size=32, seed=2)
    with train.isolated_randomness():
        train.train(first, train.checkpoint.Checkpointer(url, every_steps=1))
        with pytest.raises(SystemExit, match="from a run with another configuration"):
            train.train(other, train.checkpoint.Checkpointer(url))
