"""
Cost of kelpie_sdk.checkpoint saves against baselines measured in the same run.

The state is a PyTorch-style state dict of float32 tensors (``--mb`` MiB in all).
On ``file://`` (a temporary directory) and on ``s3://`` (moto's server on
127.0.0.1, started here) it measures:

(a) the time the training loop is blocked in an async ``save()``, against a plain
    in-memory copy of the same state (``{k: v.clone()}``); goal <= 1.5x;
(b) the total time of a blocking ``save()`` (snapshot, hash, upload, commit),
    against ``torch.save`` to a local file (file://) or ``torch.save`` followed by
    boto3's ``upload_file`` of that file (s3://);
(c) the bytes uploaded by an incremental save after 10% of the bytes changed,
    and its total time.

Timings are medians of ``--repeat`` runs ((a): of 3 samples per run; each save is a
new step). (a) is measured with no save in flight, the steady state when saves are
further apart than their own duration. Usage::

    .venv/bin/python benchmarks/checkpoint_bench.py [--mb 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import torch
from moto.server import ThreadedMotoServer

from kelpie_sdk.checkpoint import Checkpointer

MiB = 1024 * 1024
TENSOR_MIB = 8


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_state(mb: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    count = max(1, mb // TENSOR_MIB)
    numel = TENSOR_MIB * MiB // 4
    return {
        f"layer{i:03d}.weight": torch.randn(numel, generator=gen) for i in range(count)
    }


def change_ten_percent(state: dict[str, torch.Tensor]) -> None:
    total = sum(t.numel() for t in state.values())
    budget = total // 10
    for tensor in state.values():
        if budget <= 0:
            break
        n = min(budget, tensor.numel())
        tensor[:n] += 1.0
        budget -= n


def bench_backend(
    name: str,
    url: str,
    state: dict[str, torch.Tensor],
    repeat: int,
    baseline_total: Callable[[int], float],
    samples: int = 3,
    **options: Any,
) -> dict[str, float]:
    # keep_last=2 bounds what moto holds in memory; deleting old chunks is part of
    # each save's total time, as it would be in a real run.
    ckpt = Checkpointer(url, keep_last=2, **options)
    step = 0
    blocked, copies, totals, baselines = [], [], [], []
    for i in range(repeat):
        # (a) blocked time vs copy, interleaved so that drift affects both alike.
        for _ in range(samples):
            copies.append(timed(lambda: {k: v.clone() for k, v in state.items()}))
            state[next(iter(state))][0] += 1.0  # a new first chunk: a real save
            step += 1
            blocked.append(timed(lambda s=step: ckpt.save(state, step=s)))
            ckpt.wait()
        # (b) a full save, every chunk new: change every element.
        for tensor in state.values():
            tensor.add_(1.0)
        step += 1
        totals.append(timed(lambda s=step: ckpt.save(state, step=s, blocking=True)))
        assert ckpt.last_stats is not None
        full_uploaded = ckpt.last_stats.bytes_uploaded
        baselines.append(baseline_total(i))
    # (c) incremental: 10% of the bytes change.
    change_ten_percent(state)
    step += 1
    incremental = timed(lambda: ckpt.save(state, step=step, blocking=True))
    stats = ckpt.last_stats
    assert stats is not None
    ckpt.close()
    out = {
        "copy_s": statistics.median(copies),
        "blocked_s": statistics.median(blocked),
        "save_total_s": statistics.median(totals),
        "baseline_total_s": statistics.median(baselines),
        "full_uploaded_mb": full_uploaded / MiB,
        "incremental_s": incremental,
        "incremental_uploaded_mb": stats.bytes_uploaded / MiB,
        "state_mb": stats.bytes_total / MiB,
    }
    print(f"  {name}: {out}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results here"
    )
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",  # noqa: S106 - moto's dummy credentials
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)

    state = make_state(args.mb)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kelpie-ckpt-bench-") as tmp:
        baseline_file = Path(tmp) / "state.pt"

        def torch_save(_: int) -> float:
            return timed(lambda: torch.save(state, baseline_file))

        def torch_save_upload(i: int) -> float:
            def run() -> None:
                torch.save(state, baseline_file)
                s3.upload_file(str(baseline_file), bucket, f"baseline/{i}/state.pt")

            took = timed(run)
            s3.delete_object(Bucket=bucket, Key=f"baseline/{i}/state.pt")
            return took

        results["file://"] = bench_backend(
            "file://", f"file://{tmp}/ckpt", state, args.repeat, torch_save
        )
        results["file:// fsync=False"] = bench_backend(
            "file:// fsync=False",
            f"file://{tmp}/ckpt-nosync",
            state,
            args.repeat,
            torch_save,
            fsync=False,
        )
        results["s3:// (moto)"] = bench_backend(
            "s3://", f"s3://{bucket}/ckpt", state, args.repeat, torch_save_upload
        )
    server.stop()

    print(
        f"\nstate: {args.mb} MiB of float32 tensors ({TENSOR_MIB} MiB each); "
        f"median of {args.repeat}; python {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    header = (
        "| backend | copy (s) | blocked in save() (s) | ratio (a) | save total (s) "
        "| baseline (s) | ratio (b) | incremental uploaded | incremental time (s) |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name, r in results.items():
        baseline = (
            "torch.save" if name.startswith("file") else "torch.save + upload_file"
        )
        print(
            f"| {name} | {r['copy_s']:.3f} | {r['blocked_s']:.3f} "
            f"| {r['blocked_s'] / r['copy_s']:.2f}x | {r['save_total_s']:.2f} "
            f"| {r['baseline_total_s']:.2f} ({baseline}) "
            f"| {r['save_total_s'] / r['baseline_total_s']:.2f}x "
            f"| {r['incremental_uploaded_mb']:.1f} of {r['state_mb']:.1f} MiB "
            f"({r['incremental_uploaded_mb'] / r['state_mb']:.1%}) "
            f"| {r['incremental_s']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "checkpoint",
                    "args": {"mb": args.mb, "repeat": args.repeat},
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "backends": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
