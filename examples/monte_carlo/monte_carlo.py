"""
Price a European call option by Monte Carlo, and survive any interruption.

The simulation runs in batches of paths drawn from one ``numpy.random.Generator``.
After a batch, the generator's state (``bit_generator.state``) and the partial sums
are all there is to know, so that is the checkpoint. A run resumed from it draws
exactly the numbers the uninterrupted run would have drawn and adds them in the same
order: the result is bit-identical however often, and wherever, the run is killed.

Run it anywhere::

    python examples/monte_carlo/monte_carlo.py --batches 200 --output /tmp/mc

or as a Kelpie job: checkpoints go to ``KELPIE_CHECKPOINT_URL`` (set by
``kelpie worker``; ``./checkpoints`` without it), progress is reported with
``kelpie_sdk.checkpoint.report_progress`` and ``result.json`` is written into
``--output`` (default: ``OUTPUT_DIR``). On SIGTERM it saves and exits with code 85,
which asks the worker to put the job back in the queue.

In Python, `expected_result` computes the uninterrupted answer in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kelpie_sdk import checkpoint

#: The exit code that asks ``kelpie worker`` to requeue the job (not a failure).
EXIT_RESCHEDULE = 85


@dataclasses.dataclass(frozen=True)
class Params:
    """
    What to simulate: the option, the number of paths and the seed.

    The result depends on every field, and on nothing else.
    """

    batches: int = 200
    paths_per_batch: int = 100_000
    seed: int = 2024
    spot: float = 100.0
    strike: float = 105.0
    rate: float = 0.03
    volatility: float = 0.2
    maturity: float = 1.0


def initial_state(params: Params) -> dict[str, Any]:
    """
    The state before the first batch.
    """
    rng = np.random.Generator(np.random.PCG64(params.seed))
    return {
        "params": dataclasses.asdict(params),
        "batch": 0,
        "sum": 0.0,
        "sum_sq": 0.0,
        "rng": rng.bit_generator.state,
    }


def generator(state: dict[str, Any]) -> np.random.Generator:
    """
    A generator positioned where ``state`` left off.
    """
    bit_generator = np.random.PCG64()
    bit_generator.state = state["rng"]
    return np.random.Generator(bit_generator)


def run_batch(state: dict[str, Any], rng: np.random.Generator, params: Params) -> None:
    """
    Simulate one batch of paths and add it to ``state``, in place.
    """
    z = rng.standard_normal(params.paths_per_batch)
    drift = (params.rate - 0.5 * params.volatility**2) * params.maturity
    spread = params.volatility * math.sqrt(params.maturity)
    at_maturity = params.spot * np.exp(drift + spread * z)
    discount = math.exp(-params.rate * params.maturity)
    payoff = np.maximum(at_maturity - params.strike, 0.0) * discount
    state["sum"] += float(payoff.sum())
    state["sum_sq"] += float(np.dot(payoff, payoff))
    state["batch"] += 1
    state["rng"] = rng.bit_generator.state


def black_scholes(params: Params) -> float:
    """
    The exact price, for comparison with the estimate.
    """

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    spread = params.volatility * math.sqrt(params.maturity)
    d1 = (
        math.log(params.spot / params.strike)
        + (params.rate + 0.5 * params.volatility**2) * params.maturity
    ) / spread
    d2 = d1 - spread
    discount = math.exp(-params.rate * params.maturity)
    return params.spot * cdf(d1) - params.strike * discount * cdf(d2)


def summarize(state: dict[str, Any], params: Params) -> dict[str, Any]:
    """
    The result of the batches done so far.
    """
    paths = state["batch"] * params.paths_per_batch
    price = state["sum"] / paths
    variance = max(state["sum_sq"] / paths - price * price, 0.0)
    return {
        "price": price,
        "std_error": math.sqrt(variance / paths),
        "paths": paths,
        "price_hex": price.hex(),
        "black_scholes": black_scholes(params),
        "params": dataclasses.asdict(params),
    }


def dumps(result: dict[str, Any]) -> str:
    """
    ``result`` as the text of ``result.json`` (floats round-trip exactly).
    """
    return json.dumps(result, sort_keys=True) + "\n"


def expected_result(params: Params) -> dict[str, Any]:
    """
    The uninterrupted run, in this process, without checkpoints.
    """
    state = initial_state(params)
    rng = generator(state)
    while state["batch"] < params.batches:
        run_batch(state, rng, params)
    return summarize(state, params)


def simulate(
    params: Params,
    ckpt: checkpoint.Checkpointer,
    *,
    pause: float = 0.0,
) -> dict[str, Any] | None:
    """
    Run the remaining batches, resuming from ``ckpt``'s latest step.

    Returns:
        The result, or None when a preemption signal stopped the run (the state
        is saved).
    """
    start = ckpt.latest_step()
    state = ckpt.load() if start is not None else initial_state(params)
    if state["params"] != dataclasses.asdict(params):
        raise SystemExit(
            f"error: the checkpoint at {ckpt.url} is from a run with other "
            f"parameters ({state['params']}); use another checkpoint location"
        )
    rng = generator(state)
    print(
        f"starting at batch {state['batch']} of {params.batches} "
        f"(attempt {os.environ.get('KELPIE_ATTEMPT', '-')})",
        flush=True,
    )
    while state["batch"] < params.batches:
        run_batch(state, rng, params)
        done = state["batch"]
        if ckpt.should_save(done):
            ckpt.save(state, step=done)
        checkpoint.report_progress(
            done, params.batches, price=state["sum"] / (done * params.paths_per_batch)
        )
        if checkpoint.preempted():
            ckpt.close()
            print(f"preempted after batch {done}; state saved", flush=True)
            return None
        if pause:
            time.sleep(pause)
    ckpt.close()
    return summarize(state, params)


def write_result(result: dict[str, Any], out_dir: Path) -> Path:
    """
    Write ``result.json`` into ``out_dir`` atomically.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(dumps(result), encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = Params()
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    a = parser.add_argument
    a("--batches", type=int, default=default.batches, help="batches of paths")
    a(
        "--paths",
        type=int,
        default=default.paths_per_batch,
        help="paths per batch (default: %(default)s)",
    )
    a("--seed", type=int, default=default.seed, help="generator seed")
    a("--strike", type=float, default=default.strike, help="strike price")
    a("--every", type=int, default=10, help="save a checkpoint every N batches")
    a(
        "--checkpoint-url",
        default=None,
        help="where checkpoints go "
        "(default: KELPIE_CHECKPOINT_URL, else ./checkpoints)",
    )
    a(
        "--output",
        default=os.environ.get("OUTPUT_DIR"),
        help="directory for result.json (default: OUTPUT_DIR; none: print only)",
    )
    a("--pause", type=float, default=0.0, help="seconds to sleep after each batch")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.paths < 1 or args.every < 1:
        parser.error("--batches, --paths and --every must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = Params(
        batches=args.batches,
        paths_per_batch=args.paths,
        seed=args.seed,
        strike=args.strike,
    )
    checkpoint.install_preemption_handler()
    ckpt = checkpoint.Checkpointer(
        args.checkpoint_url, every_steps=args.every, keep_last=2
    )
    result = simulate(params, ckpt, pause=args.pause)
    if result is None:
        return EXIT_RESCHEDULE
    if args.output:
        write_result(result, Path(args.output))
    print(dumps(result), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
