"""
Transfer throughput of kelpie_sdk.storage against its baselines, in one run.

S3 (moto's server on 127.0.0.1, started here): ``Storage`` against boto3's own
``upload_file``/``download_file`` with the default ``TransferConfig`` (boto3's
multipart transfer), same bytes, same endpoint, same process.
For many small files, boto3 is measured twice: a plain loop (what a script
does) and the same calls on a thread pool as large as ``Storage``'s.

Local files (``file://``): ``Storage`` against ``shutil.copy`` of the same files.

Every figure is the median of ``--repeat`` runs; ours and the baseline alternate
within each repetition so that drift affects both alike. Ratios above 1 mean
``Storage`` is faster.

Usage::

    .venv/bin/python benchmarks/transfer_bench.py [--large-mb 256] \
        [--small-count 500] [--small-kb 64] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from kelpie_sdk.storage import Storage

MiB = 1024 * 1024


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_files(root: Path, large_mb: int, count: int, small_kb: int) -> None:
    (root / "large").mkdir(parents=True)
    if large_mb:
        with open(root / "large" / "large.bin", "wb") as f:
            for _ in range(large_mb):
                f.write(os.urandom(MiB))
    small = root / "small"
    small.mkdir()
    for i in range(count):
        sub = small / f"d{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04d}.bin").write_bytes(os.urandom(small_kb * 1024))


def files_of(root: Path) -> list[tuple[Path, str]]:
    return sorted(
        ((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
        key=lambda f: f[1],
    )


def clear(s3: object, bucket: str) -> None:
    """Delete every object (moto keeps them in memory)."""
    paginator = s3.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})  # type: ignore[attr-defined]


def run_set(
    label: str,
    files: list[tuple[Path, str]],
    *,
    args: argparse.Namespace,
    storage: Storage,
    local: Storage,
    s3: Any,
    bucket: str,
    work: Path,
) -> list[dict[str, object]] | None:
    """Time one set of files every way; None if a download came back wrong."""
    rows: list[dict[str, object]] = []
    nbytes = sum(p.stat().st_size for p, _ in files)
    times: dict[str, list[float]] = {}
    rels = [rel for _, rel in files]

    def boto_up(prefix: str) -> None:
        for path, rel in files:
            s3.upload_file(str(path), bucket, f"{prefix}/{rel}")

    def boto_up_threads(prefix: str) -> None:
        def one(item: tuple[Path, str]) -> None:
            s3.upload_file(str(item[0]), bucket, f"{prefix}/{item[1]}")

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, files))

    def boto_down(prefix: str, out: Path) -> None:
        for rel in rels:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, f"{prefix}/{rel}", str(out / rel))

    def boto_down_threads(prefix: str, out: Path) -> None:
        def one(rel: str) -> None:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, f"{prefix}/{rel}", str(out / rel))

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, rels))

    def copy_all(pairs: list[tuple[Path, Path]]) -> None:
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)

    def run_rep(rep: int) -> bool:
        """One repetition of every transfer; False if a copy came back wrong."""
        out = work / f"out-{rep}"
        tag = f"{rep}-{uuid.uuid4().hex[:6]}"
        threads = len(files) > 1
        phases: list[list[tuple[str, Callable[[], object]]]] = [
            [
                (
                    "s3 upload ours",
                    lambda: storage.upload_files(files, bucket, f"o{tag}"),
                ),
                ("s3 upload boto3", lambda: boto_up(f"b{tag}")),
            ]
            + (
                [("s3 upload boto3 threads", lambda: boto_up_threads(f"t{tag}"))]
                if threads
                else []
            ),
            [
                (
                    "s3 download ours",
                    lambda: storage.download_prefix(bucket, f"o{tag}", out / "o"),
                ),
                ("s3 download boto3", lambda: boto_down(f"b{tag}", out / "b")),
            ]
            + (
                [
                    (
                        "s3 download boto3 threads",
                        lambda: boto_down_threads(f"t{tag}", out / "t"),
                    )
                ]
                if threads
                else []
            ),
            [
                ("file upload ours", lambda: local.upload_files(files, "b", f"l{tag}")),
                (
                    "file upload shutil.copy",
                    lambda: copy_all([(p, work / f"c{tag}" / r) for p, r in files]),
                ),
            ],
            [
                (
                    "file download ours",
                    lambda: local.download_prefix("b", f"l{tag}", out / "lo"),
                ),
                (
                    "file download shutil.copy",
                    lambda: copy_all(
                        [
                            (work / "store" / "b" / f"l{tag}" / r, out / "lc" / r)
                            for r in rels
                        ]
                    ),
                ),
            ],
        ]
        for phase in phases:
            # Alternate who goes first, so that drift (page cache, moto's memory,
            # other load) does not always favour the same side.
            for name, step in phase if rep % 2 == 0 else reversed(phase):
                times.setdefault(name, []).append(timed(step))
        for sub in ("o", "b", "lo", "lc") + (("t",) if threads else ()):
            for path, rel in files:
                if path.read_bytes() != (out / sub / rel).read_bytes():
                    print(f"MISMATCH {sub} {rel}", file=sys.stderr)
                    return False
        shutil.rmtree(out)
        shutil.rmtree(work / f"c{tag}")
        shutil.rmtree(work / "store" / "b" / f"l{tag}")
        clear(s3, bucket)
        return True

    for rep in range(args.repeat):
        if not run_rep(rep):
            return None

    med = {name: statistics.median(v) for name, v in times.items()}
    pairs = [
        ("s3 upload", "s3 upload ours", "s3 upload boto3"),
        ("s3 upload", "s3 upload ours", "s3 upload boto3 threads"),
        ("s3 download", "s3 download ours", "s3 download boto3"),
        ("s3 download", "s3 download ours", "s3 download boto3 threads"),
        ("file upload", "file upload ours", "file upload shutil.copy"),
        ("file download", "file download ours", "file download shutil.copy"),
    ]
    for what, ours, base in pairs:
        if base not in med:
            continue
        rows.append(
            {
                "files": label,
                "transfer": what,
                "baseline": base.removeprefix(what + " "),
                "ours_mib_s": nbytes / MiB / med[ours],
                "baseline_mib_s": nbytes / MiB / med[base],
                "ratio": med[base] / med[ours],
                "ours_s": times[ours],
                "baseline_s": times[base],
            }
        )
    return rows


def _serve(port_queue: multiprocessing.Queue[int], stop: Any) -> None:
    """Run moto's server in this (child) process until ``stop`` is set."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port_queue.put(server.get_host_and_port()[1])
    stop.wait()
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mb", type=int, default=256)
    parser.add_argument("--small-count", type=int, default=500)
    parser.add_argument("--small-kb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    # moto runs in a child process so that its request handling does not share
    # the benchmark's GIL (it would slow down whichever side runs more threads).
    ctx = multiprocessing.get_context("spawn")
    port_queue: multiprocessing.Queue[int] = ctx.Queue()
    stop = ctx.Event()
    child = ctx.Process(target=_serve, args=(port_queue, stop), daemon=True)
    child.start()
    host, port = "127.0.0.1", port_queue.get(timeout=60)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",  # noqa: S106 - moto's dummy credentials
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    os.environ.pop("AWS_PROFILE", None)
    bucket = "bench"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    work = Path(tempfile.mkdtemp(prefix="kelpie-bench-"))
    rows: list[dict[str, object]] = []
    try:
        src = work / "src"
        make_files(src, args.large_mb, args.small_count, args.small_kb)
        large = files_of(src / "large")
        small = files_of(src / "small")
        sets = {
            f"1 x {args.large_mb} MiB": large,
            f"{args.small_count} x {args.small_kb} KiB": small,
        }
        # A size of 0 leaves that set out.
        sets = {label: files for label, files in sets.items() if files}
        storage = Storage("s3://", max_concurrency=args.concurrency)
        local = Storage(f"file://{work / 'store'}", max_concurrency=args.concurrency)
        for label, files in sets.items():
            got = run_set(
                label,
                files,
                args=args,
                storage=storage,
                local=local,
                s3=s3,
                bucket=bucket,
                work=work,
            )
            if got is None:
                return 1
            rows.extend(got)
        storage.close()
        local.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stop.set()
        child.join(10)

    header = (
        f"{'files':<16} {'transfer':<14} {'baseline':<14} "
        f"{'ours MiB/s':>11} {'base MiB/s':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['files']:<16} {r['transfer']:<14} {r['baseline']:<14} "
            f"{r['ours_mib_s']:>11.1f} {r['baseline_mib_s']:>11.1f} {r['ratio']:>6.2f}"
        )
    print(
        f"\nmedian of {args.repeat}; ratio = baseline time / our time (> 1: faster);"
        f" python {platform.python_version()}, boto3 {boto3.__version__},"
        f" {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
