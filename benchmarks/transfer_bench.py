"""
Transfer throughput of kelpie_sdk.storage against its baselines, in one run.

S3 (moto's server on 127.0.0.1, started here): ``Storage`` against boto3's own
``upload_file``/``download_file`` with the default ``TransferConfig`` (the
"multipart transfer" of the issue), same bytes, same endpoint, same process.
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
    with open(root / "large" / "large.bin", "wb") as f:
        for _ in range(large_mb):
            f.write(os.urandom(MiB))
    small = root / "small"
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

    def add(name: str, seconds: float, times: dict[str, list[float]] = times) -> None:
        times.setdefault(name, []).append(seconds)

    for rep in range(args.repeat):
        # --- S3 upload: ours, then boto3 (loop), then boto3 (threads)
        ours_prefix = f"ours-{rep}-{uuid.uuid4().hex[:6]}"
        base_prefix = f"base-{rep}-{uuid.uuid4().hex[:6]}"
        pool_prefix = f"pool-{rep}-{uuid.uuid4().hex[:6]}"
        add(
            "s3 upload ours",
            timed(lambda p=ours_prefix: storage.upload_files(files, bucket, p)),
        )
        add(
            "s3 upload boto3",
            timed(
                lambda p=base_prefix: [
                    s3.upload_file(str(f), bucket, f"{p}/{rel}") for f, rel in files
                ]
            ),
        )
        if len(files) > 1:
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                add(
                    "s3 upload boto3 threads",
                    timed(
                        lambda p=pool_prefix, pool=pool: list(
                            pool.map(
                                lambda fr: s3.upload_file(
                                    str(fr[0]), bucket, f"{p}/{fr[1]}"
                                ),
                                files,
                            )
                        )
                    ),
                )
        # --- S3 download of the same objects
        out = work / f"out-{rep}"
        add(
            "s3 download ours",
            timed(
                lambda p=ours_prefix, o=out: storage.download_prefix(
                    bucket, p, o / "ours"
                )
            ),
        )

        def boto_download(p: str, o: Path) -> None:
            for _, rel in files:
                dest = o / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, f"{p}/{rel}", str(dest))

        add(
            "s3 download boto3",
            timed(lambda p=base_prefix, o=out: boto_download(p, o / "base")),
        )
        if len(files) > 1:

            def pool_download(p: str, o: Path) -> None:
                def one(rel: str) -> None:
                    dest = o / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, f"{p}/{rel}", str(dest))

                with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                    list(pool.map(one, [rel for _, rel in files]))

            add(
                "s3 download boto3 threads",
                timed(lambda p=pool_prefix, o=out: pool_download(p, o / "pool")),
            )
        for sub in ("ours", "base"):
            for path, rel in files:
                a, b = path.read_bytes(), (out / sub / rel).read_bytes()
                if a != b:
                    print(f"MISMATCH {sub} {rel}", file=sys.stderr)
                    return None
        shutil.rmtree(out)
        clear(s3, bucket)

        # --- file:// against shutil.copy
        lprefix = f"l{rep}"
        add(
            "file upload ours",
            timed(lambda p=lprefix: local.upload_files(files, "b", p)),
        )

        def copy_all(dst: Path) -> None:
            for path, rel in files:
                dest = dst / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest)

        add(
            "file upload shutil.copy",
            timed(lambda r=rep: copy_all(work / f"copy-{r}")),
        )
        add(
            "file download ours",
            timed(
                lambda p=lprefix, r=rep: local.download_prefix(
                    "b", p, work / f"lout-{r}"
                )
            ),
        )
        add(
            "file download shutil.copy",
            timed(lambda r=rep: copy_all(work / f"lcopy-{r}")),
        )
        shutil.rmtree(work / "store" / "b" / lprefix)
        for name in (f"copy-{rep}", f"lout-{rep}", f"lcopy-{rep}"):
            shutil.rmtree(work / name)

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
