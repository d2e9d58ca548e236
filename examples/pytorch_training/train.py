"""
Train a small PyTorch model on the CPU, and resume exactly after any interruption.

Everything the next step depends on is in the checkpoint: the model, the optimizer,
the learning-rate scheduler, the three random-number generators the loop uses
(torch for dropout, numpy and Python's ``random`` for the input noise) and the
position of the data loader in its epoch. The loader is a real
``torch.utils.data.DataLoader`` that shuffles with a seeded ``torch.Generator``; a
resumed run rewinds that generator to the start of the epoch, draws the same
permutation and skips the batches already done, so it continues mid-epoch at the
same batch. The final weights are bit-identical to an uninterrupted run's.

Run it anywhere::

    python examples/pytorch_training/train.py --epochs 5 --output /tmp/train

or as a Kelpie job: checkpoints go to ``KELPIE_CHECKPOINT_URL`` (set by
``kelpie worker``; ``./checkpoints`` without it), progress is reported with
``kelpie_sdk.checkpoint.report_progress``, and ``model.pt`` and ``result.json`` are
written into ``--output`` (default: ``OUTPUT_DIR``). On SIGTERM it saves and exits
with code 85, which asks the worker to put the job back in the queue.

In Python, `expected_result` trains without interruption in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from kelpie_sdk import checkpoint

#: The exit code that asks ``kelpie worker`` to requeue the job (not a failure).
EXIT_RESCHEDULE = 85


@dataclasses.dataclass(frozen=True)
class Config:
    """
    What to train. The result depends on every field, and on nothing else.
    """

    epochs: int = 5
    samples: int = 4096
    features: int = 32
    hidden: int = 64
    batch_size: int = 64
    lr: float = 3e-3
    noise_probability: float = 0.5
    noise_scale: float = 0.05
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclasses.dataclass
class Run:
    """
    The live objects of one training run, and where it is.
    """

    config: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader[tuple[torch.Tensor, ...]]
    shuffle: torch.Generator
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    epoch: int = 0
    batch: int = 0  # batches done in this epoch
    step: int = 0  # optimizer steps done in all
    epoch_shuffle_state: torch.Tensor | None = None
    last_loss: float = float("nan")


def make_data(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A fixed synthetic regression problem: y = sin(x . w) + small noise.
    """
    g = torch.Generator().manual_seed(config.seed + 1)
    n = config.samples + 512  # the last 512 are held out for evaluation
    x = torch.randn(n, config.features, generator=g)
    w = torch.randn(config.features, 1, generator=g) / config.features**0.5
    y = torch.sin(2 * x @ w) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def build(config: Config) -> Run:
    """
    Seed every generator and build the model, optimizer, scheduler and loader.
    """
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    x, y = make_data(config)
    train = TensorDataset(x[: config.samples], y[: config.samples])
    shuffle = torch.Generator().manual_seed(config.seed + 2)
    loader = DataLoader(
        train, batch_size=config.batch_size, shuffle=True, generator=shuffle
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(config.features, config.hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(config.hidden, config.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(config.hidden, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.total_steps
    )
    return Run(
        config,
        model,
        optimizer,
        scheduler,
        loader,
        shuffle,
        eval_x=x[config.samples :],
        eval_y=y[config.samples :],
    )


def state_of(run: Run) -> dict[str, Any]:
    """
    Everything needed to continue ``run`` exactly.
    """
    return {
        "config": dataclasses.asdict(run.config),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        # The shuffle generator as it was when this epoch's loader was made: a
        # resume rewinds to it to draw the same permutation.
        "epoch_shuffle": run.epoch_shuffle_state,
        "epoch": run.epoch,
        "batch": run.batch,
        "step": run.step,
        "last_loss": run.last_loss,
    }


def restore(run: Run, state: dict[str, Any]) -> None:
    """
    Put a checkpointed state into ``run``'s objects.
    """
    if state["config"] != dataclasses.asdict(run.config):
        raise SystemExit(
            f"error: the checkpoint is from a run with another configuration "
            f"({state['config']}); use another checkpoint location"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.epoch, run.batch, run.step = state["epoch"], state["batch"], state["step"]
    run.epoch_shuffle_state = state["epoch_shuffle"]
    run.last_loss = state["last_loss"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """
    This epoch's remaining batches, in the uninterrupted run's order.

    A fresh epoch records the shuffle generator's state first. A resumed epoch
    rewinds the generator to that state, so the loader draws the same permutation,
    and skips the batches already done (skipping consumes no other randomness).
    """
    if run.batch == 0:
        run.epoch_shuffle_state = run.shuffle.get_state()
    else:
        assert run.epoch_shuffle_state is not None
        run.shuffle.set_state(run.epoch_shuffle_state)
    return itertools.islice(iter(run.loader), run.batch, None)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """
    One optimizer step; Python's and numpy's generators decide the input noise.
    """
    config = run.config
    if random.random() < config.noise_probability:
        noise = np.random.normal(0.0, config.noise_scale, size=tuple(x.shape))
        x = x + torch.from_numpy(noise).to(x.dtype)
    run.model.train()
    run.optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(run.model(x), y)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    run.last_loss = loss.item()
    run.batch += 1
    run.step += 1


def weights_sha256(model: torch.nn.Module) -> str:
    """
    A hash of every parameter and buffer: name, dtype, shape and bytes.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def summarize(run: Run) -> dict[str, Any]:
    """
    The result of a finished run.
    """
    run.model.eval()
    with torch.no_grad():
        eval_loss = torch.nn.functional.mse_loss(
            run.model(run.eval_x), run.eval_y
        ).item()
    return {
        "config": dataclasses.asdict(run.config),
        "steps": run.step,
        "last_train_loss": run.last_loss,
        "eval_loss": eval_loss,
        "weights_sha256": weights_sha256(run.model),
    }


def dumps(result: dict[str, Any]) -> str:
    """
    ``result`` as the text of ``result.json`` (floats round-trip exactly).
    """
    return json.dumps(result, sort_keys=True) + "\n"


def train(
    config: Config,
    ckpt: checkpoint.Checkpointer | None = None,
    *,
    pause: float = 0.0,
) -> Run | None:
    """
    Train to the end, resuming from ``ckpt``'s latest step if it has one.

    Returns:
        The finished run, or None when a preemption signal stopped it (the state
        is saved).
    """
    # One thread: the same sums in the same order on every machine and every run.
    torch.set_num_threads(1)
    run = build(config)
    if ckpt is not None and ckpt.latest_step() is not None:
        restore(run, ckpt.load())
    print(
        f"starting at step {run.step} of {config.total_steps} (epoch {run.epoch}, "
        f"batch {run.batch}; attempt {os.environ.get('KELPIE_ATTEMPT', '-')})",
        flush=True,
    )
    while run.epoch < config.epochs:
        for x, y in batches(run):
            train_step(run, x, y)
            if ckpt is not None and ckpt.should_save(run.step):
                ckpt.save(state_of(run), step=run.step)
            checkpoint.report_progress(
                run.step, config.total_steps, loss=run.last_loss, epoch=run.epoch
            )
            if checkpoint.preempted():
                if ckpt is not None:
                    ckpt.close()
                print(f"preempted after step {run.step}; state saved", flush=True)
                return None
            if pause:
                time.sleep(pause)
        run.epoch += 1
        run.batch = 0
    if ckpt is not None:
        ckpt.close()
    return run


@contextlib.contextmanager
def isolated_randomness() -> Iterator[None]:
    """
    Leave the caller's generators and torch thread count as they were.
    """
    threads = torch.get_num_threads()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_num_threads(threads)


def expected_result(config: Config) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """
    The uninterrupted run, in this process, without checkpoints.

    Returns:
        The result (as in ``result.json``) and the final weights.
    """
    with isolated_randomness():
        run = train(config)
        assert run is not None
        return summarize(run), run.model.state_dict()


def write_outputs(run: Run, out_dir: Path) -> dict[str, Any]:
    """
    Write ``model.pt`` (the state dict) and ``result.json`` into ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = summarize(run)
    torch.save(run.model.state_dict(), out_dir / ".model.pt.tmp")
    os.replace(out_dir / ".model.pt.tmp", out_dir / "model.pt")
    (out_dir / ".result.json.tmp").write_text(dumps(result), encoding="utf-8")
    os.replace(out_dir / ".result.json.tmp", out_dir / "result.json")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = Config()
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    a = parser.add_argument
    a("--epochs", type=int, default=default.epochs, help="passes over the data")
    a("--samples", type=int, default=default.samples, help="training examples")
    a("--batch-size", type=int, default=default.batch_size, help="examples per step")
    a("--lr", type=float, default=default.lr, help="peak learning rate")
    a("--seed", type=int, default=default.seed, help="seed of every generator")
    a("--every", type=int, default=20, help="save a checkpoint every N steps")
    a(
        "--checkpoint-url",
        default=None,
        help="where checkpoints go "
        "(default: KELPIE_CHECKPOINT_URL, else ./checkpoints)",
    )
    a(
        "--output",
        default=os.environ.get("OUTPUT_DIR"),
        help="directory for model.pt and result.json (default: OUTPUT_DIR; "
        "none: print the result only)",
    )
    a("--pause", type=float, default=0.0, help="seconds to sleep after each step")
    args = parser.parse_args(argv)
    for name in ("epochs", "samples", "batch_size", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(
        epochs=args.epochs,
        samples=args.samples,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    checkpoint.install_preemption_handler()
    ckpt = checkpoint.Checkpointer(
        args.checkpoint_url, every_steps=args.every, keep_last=2
    )
    run = train(config, ckpt, pause=args.pause)
    if run is None:
        return EXIT_RESCHEDULE
    result = write_outputs(run, Path(args.output)) if args.output else summarize(run)
    print(dumps(result), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
