"""
``kelpie up``: a whole Kelpie on one machine, for trying things out and for
development: the API server (SQLite), N workers and a local file storage root.

Everything lives under one directory (``--storage``, default ``./kelpie-local``)::

    kelpie.db            the server's database
    admin-key            the API key (created on first start, reused after)
    server.log           the server's log
    storage/             the storage root: bucket ``b`` is storage/b/
    workers/<i>/         each worker's directories, state file and worker.log

The children run in their own sessions, so Ctrl-C reaches only ``kelpie up``,
which then stops them in order: workers first (they release their jobs), the
server last.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import attrs

from kelpie_sdk.cli._common import Context
from kelpie_sdk.client import Client
from kelpie_sdk.errors import KelpieError

if TYPE_CHECKING:
    from kelpie_sdk.server import Store
    from kelpie_sdk.server._autoscale import Autoscaler
    from kelpie_sdk.server._providers import LocalProvider

__all__ = ["DEFAULT_BUCKET", "register"]

#: The bucket ``kelpie up`` creates in its storage root.
DEFAULT_BUCKET = "local"
_WORKER_CONFIG_EXIT = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``up``.
    """
    parser = subparsers.add_parser(
        "up",
        help="run a local cluster: the server, N workers and file storage",
        description=(
            "Start the API server (SQLite), N workers and a local file storage "
            "root on this machine; print the URL and API key; stop everything "
            "cleanly on Ctrl-C."
        ),
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="how many workers (default: 2)"
    )
    parser.add_argument(
        "--storage",
        metavar="DIR",
        default="./kelpie-local",
        help="where the database, storage and worker directories live "
        "(default: ./kelpie-local)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8787, help="0 picks a free port (default: 8787)"
    )
    parser.add_argument(
        "--container-group-id",
        default="local",
        metavar="ID",
        help="the queue the workers serve (default: local)",
    )
    parser.add_argument(
        "--slots", type=int, default=1, help="jobs per worker at once (default: 1)"
    )
    scaling = parser.add_argument_group(
        "autoscaling",
        "With --autoscale, workers start as jobs arrive and stop when the queue "
        "has been idle; --workers is then the most that run at once.",
    )
    scaling.add_argument(
        "--autoscale",
        action="store_true",
        help="start and stop workers with the queue (a scaling rule for the group)",
    )
    scaling.add_argument(
        "--min-workers",
        type=int,
        default=0,
        help="workers kept even when idle (default: 0)",
    )
    scaling.add_argument(
        "--idle-threshold",
        type=int,
        default=60,
        metavar="SECONDS",
        help="a finished job keeps its worker this long (default: 60)",
    )
    scaling.add_argument(
        "--autoscale-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between autoscaler passes (default: 5)",
    )
    scaling.add_argument(
        "--autoscale-window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the desired count must stay lower before workers stop "
        "(default: 30)",
    )
    parser.set_defaults(handler=_up)

    demo = subparsers.add_parser(
        "demo",
        help="watch a job survive the loss of its worker, on a local cluster",
        description=(
            "Start a local cluster (server, 2 workers, file storage) in a "
            "temporary directory, run a job that checkpoints every step, kill its "
            "worker with SIGKILL half-way, and watch another worker resume it "
            "from the last checkpoint."
        ),
    )
    demo.add_argument(
        "--steps", type=int, default=30, help="steps the job counts (default: 30)"
    )
    demo.add_argument(
        "--storage",
        metavar="DIR",
        default=None,
        help="keep the cluster's files here (default: a temporary directory)",
    )
    demo.set_defaults(handler=_demo)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _admin_key(root: Path) -> str:
    path = root / "admin-key"
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


def _clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("KELPIE_", "SALAD_"))
    }


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@attrs.define
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@attrs.define
class _Cluster:
    root: Path
    host: str
    port: int
    workers: int
    slots: int
    group: str
    key: str = ""
    server: _Child | None = None
    worker_children: list[_Child] = attrs.Factory(list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        return f"file://{self.root / 'storage'}"

    def start_server(self) -> None:
        env = _clean_env()
        env["KELPIE_ADMIN_KEY"] = self.key
        self.server = _Child(
            "server",
            [
                sys.executable,
                "-m",
                "kelpie_sdk.server",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--database",
                f"sqlite:///{self.root / 'kelpie.db'}",
            ],
            env,
            self.root,
            self.root / "server.log",
        )
        self.server.start()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with Client(self.url, self.key, max_retries=0, timeout=(1.0, 2.0)) as client:
            while time.monotonic() < deadline:
                if self.server is not None and self.server.poll() is not None:
                    return False
                try:
                    client.me()
                except KelpieError:
                    time.sleep(0.1)
                    continue
                return True
        return False

    def worker(self, index: int) -> _Child:
        home = self.root / "workers" / str(index)
        home.mkdir(parents=True, exist_ok=True)
        env = _clean_env()
        env.update(
            PYTHONUNBUFFERED="1",
            KELPIE_API_URL=self.url,
            KELPIE_API_KEY=self.key,
            SALAD_CONTAINER_GROUP_ID=self.group,
            SALAD_MACHINE_ID=f"local-{index}",
            KELPIE_STORAGE_URL=self.storage_url,
            KELPIE_STATE_FILE=str(home / "state.json"),
            INPUT_DIR=str(home / "input"),
            OUTPUT_DIR=str(home / "output"),
            CHECKPOINT_DIR=str(home / "checkpoint"),
            KELPIE_SLOTS=str(self.slots),
        )
        return _Child(
            f"worker {index}",
            [sys.executable, "-m", "kelpie_sdk.worker"],
            env,
            home,
            home / "worker.log",
        )

    def start_workers(self) -> None:
        for i in range(self.workers):
            child = self.worker(i)
            child.start()
            self.worker_children.append(child)

    def stop(self, out: IO[str]) -> None:
        """Workers first (they release their jobs), then the server."""
        for child in self.worker_children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for child in self.worker_children:
            if child.wait(max(deadline - time.monotonic(), 0.1)) is None:
                out.write(f"{child.name} did not stop in time; killing it\n")
                child.signal(signal.SIGKILL)
                child.wait(5)
            child.close()
        if self.server is not None:
            # uvicorn waits for open requests (long-polls abandoned by the
            # workers) on the first SIGTERM and gives up on them on the second.
            self.server.signal(signal.SIGTERM)
            if self.server.wait(3) is None:
                self.server.signal(signal.SIGTERM)
                if self.server.wait(10) is None:
                    self.server.signal(signal.SIGKILL)
                    self.server.wait(5)
            self.server.close()

    def kill(self) -> None:
        for child in [*self.worker_children, self.server]:
            if child is not None:
                child.signal(signal.SIGKILL)
                child.wait(5)
                child.close()


def _up(args: argparse.Namespace, ctx: Context) -> int:
    out = sys.stdout
    if args.workers < 0 or args.slots < 1:
        out.write("Error: --workers must be >= 0 and --slots >= 1\n")
        return 2
    if args.autoscale and not (
        0 <= args.min_workers <= args.workers <= 500
        and 0 <= args.idle_threshold <= 3600
        and args.autoscale_interval > 0
        and args.autoscale_window >= 0
    ):
        out.write(
            "Error: --autoscale needs 0 <= --min-workers <= --workers <= 500, "
            "--idle-threshold in 0..3600, --autoscale-interval > 0 and "
            "--autoscale-window >= 0\n"
        )
        return 2
    root = Path(args.storage).expanduser().absolute()
    (root / "storage" / DEFAULT_BUCKET).mkdir(parents=True, exist_ok=True)
    port = args.port if args.port != 0 else _free_port(args.host)
    cluster = _Cluster(
        root=root,
        host=args.host,
        port=port,
        workers=args.workers,
        slots=args.slots,
        group=args.container_group_id,
        key=_admin_key(root),
    )
    stopping = False
    scaling: _Scaling | None = None

    def on_signal(signum: int, frame: object) -> None:
        # Explicit for SIGINT too: a shell may start us with SIGINT ignored.
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt  # a second Ctrl-C: kill everything now
        stopping = True

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        cluster.start_server()
        if not cluster.wait_ready():
            out.write(
                "Error: the server did not start; its log says:\n"
                + _tail(root / "server.log")
                + "\n"
            )
            cluster.kill()
            return 1
        if args.autoscale:
            scaling = _start_autoscaler(cluster, args)
        else:
            cluster.start_workers()
        workers_line = (
            f"autoscaled, {args.min_workers} to {cluster.workers} x "
            f"{cluster.slots} slot(s) (log in {root / 'autoscaler.log'})"
            if args.autoscale
            else f"{cluster.workers} x {cluster.slots} slot(s)"
        )
        out.write(
            "Kelpie is up.\n"
            f"  API URL:          {cluster.url}\n"
            f"  API key:          {cluster.key}\n"
            f"  Container group:  {cluster.group}\n"
            f"  Storage root:     {cluster.storage_url}"
            f"  (bucket {DEFAULT_BUCKET!r} is ready)\n"
            f"  Workers:          {workers_line}; "
            f"logs in {root / 'workers'}/<i>/worker.log\n"
            "Try:\n"
            f"  export KELPIE_API_URL={cluster.url} KELPIE_API_KEY={cluster.key}\n"
            f"  kelpie submit --container-group-id {cluster.group} "
            "--command python --arg=-c --arg 'print(42)'\n"
            "Press Ctrl-C to stop.\n"
        )
        out.flush()
        while not stopping:
            time.sleep(0.2)
            if cluster.server is not None and cluster.server.poll() is not None:
                out.write(
                    "Error: the server exited; its log says:\n"
                    + _tail(root / "server.log")
                    + "\n"
                )
                cluster.stop(out)
                return 1
            for i, child in enumerate(cluster.worker_children):
                code = child.poll()
                if code is None:
                    continue
                child.close()
                if code == _WORKER_CONFIG_EXIT:
                    out.write(
                        f"Error: {child.name} rejected its settings:\n"
                        + _tail(child.log_path)
                        + "\n"
                    )
                    cluster.stop(out)
                    return 1
                out.write(f"{child.name} exited with code {code}; starting a new one\n")
                out.flush()
                replacement = cluster.worker(i)
                replacement.start()
                cluster.worker_children[i] = replacement
    except KeyboardInterrupt:
        pass
    out.write(
        "Stopping: workers first (their jobs go back to the queue), "
        "then the server...\n"
    )
    out.flush()
    try:
        if scaling is not None:
            scaling.stop()
        cluster.stop(out)
    except KeyboardInterrupt:
        out.write("Killing everything.\n")
        if scaling is not None:
            scaling.kill()
        cluster.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.write("Stopped.\n")
    return 0


@attrs.define
class _Scaling:
    """The autoscaler of ``kelpie up --autoscale`` and the workers it runs."""

    scaler: Autoscaler
    provider: LocalProvider
    store: Store
    handler: logging.Handler

    def stop(self) -> None:
        self.scaler.stop()
        self.provider.shutdown()
        logging.getLogger("kelpie_sdk.server").removeHandler(self.handler)
        self.handler.close()
        self.store.close()

    def kill(self) -> None:
        for worker in list(self.provider.workers.values()):
            worker.signal(signal.SIGKILL)
            worker.wait(5)
            worker.close()


def _start_autoscaler(cluster: _Cluster, args: argparse.Namespace) -> _Scaling:
    """
    Store the group's scaling rule and run the autoscaler in this process, with
    local worker processes as the group's instances.
    """
    from kelpie_sdk.models import ScalingRuleSubmission, ScalingRuleUpdate
    from kelpie_sdk.server import ADMIN_ID, Principal, open_store
    from kelpie_sdk.server._autoscale import Autoscaler
    from kelpie_sdk.server._providers import LocalProvider

    handler = logging.FileHandler(cluster.root / "autoscaler.log")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    log = logging.getLogger("kelpie_sdk.server")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    store = open_store(f"sqlite:///{cluster.root / 'kelpie.db'}")
    admin = Principal(ADMIN_ID, "", "")
    limits = {
        "min_replicas": args.min_workers,
        "max_replicas": cluster.workers,
        "idle_threshold_seconds": args.idle_threshold,
    }
    if store.get_rule(admin, cluster.group) is None:
        store.create_rule(
            admin,
            ScalingRuleSubmission(
                container_group_id=cluster.group,
                container_group_name=cluster.group,
                **limits,
            ),
        )
    else:
        store.update_rule(admin, cluster.group, ScalingRuleUpdate(**limits))
    provider = LocalProvider(cluster.worker)
    scaler = Autoscaler(
        store,
        provider,
        interval=args.autoscale_interval,
        window=args.autoscale_window,
    )
    scaler.start()
    return _Scaling(scaler, provider, store, handler)


_DEMO_JOB = """\
import json, os, time
from kelpie_sdk import checkpoint

total = int(os.environ["STEPS"])
ckpt = checkpoint.Checkpointer(every_steps=1, keep_last=2)
start = ckpt.latest_step()
state = {"count": 0, "starts": []} if start is None else ckpt.load()
state["starts"].append(start or 0)
print(f"attempt {os.environ['KELPIE_ATTEMPT']}: starting at step {start or 0}")
for step in range(start or 0, total):
    time.sleep(0.25)
    state["count"] = step + 1
    ckpt.save(state, step=step + 1, blocking=True)
    checkpoint.report_progress(step + 1, total)
ckpt.close()
out = os.environ["RESULT_DIR"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(state, f)
"""


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    import tempfile

    out = sys.stdout
    steps = max(int(args.steps), 4)
    with contextlib.ExitStack() as stack:
        if args.storage is None:
            root = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="kelpie-demo-"))
            )
        else:
            root = Path(args.storage).expanduser().absolute()
        root.mkdir(parents=True, exist_ok=True)
        (root / "storage" / DEFAULT_BUCKET).mkdir(parents=True, exist_ok=True)
        script = root / "demo_job.py"
        script.write_text(_DEMO_JOB, encoding="utf-8")
        cluster = _Cluster(
            root=root,
            host="127.0.0.1",
            port=_free_port("127.0.0.1"),
            workers=2,
            slots=1,
            group="demo",
            key=_admin_key(root),
        )
        try:
            cluster.start_server()
            if not cluster.wait_ready():
                out.write(
                    "Error: the server did not start:\n"
                    + _tail(root / "server.log")
                    + "\n"
                )
                return 1
            cluster.start_workers()
            out.write(
                f"Local cluster up at {cluster.url} with 2 workers (files in {root}).\n"
            )
            return _run_demo(cluster, script, steps, out)
        except KeyboardInterrupt:
            return 130
        finally:
            out.write("Stopping the cluster...\n")
            out.flush()
            cluster.stop(out)


def _run_demo(cluster: _Cluster, script: Path, steps: int, out: IO[str]) -> int:
    result_dir = cluster.root / "result"
    sync = {
        "during": [
            {
                "bucket": DEFAULT_BUCKET,
                "prefix": "demo/ckpt/",
                "local_path": str(cluster.root / "ckpt"),
                "direction": "upload",
            }
        ],
        "after": [
            {
                "bucket": DEFAULT_BUCKET,
                "prefix": "demo/out/",
                "local_path": str(result_dir),
                "direction": "upload",
            }
        ],
    }
    with Client(cluster.url, cluster.key) as client:
        job = client.submit_job(
            command=sys.executable,
            arguments=[str(script)],
            environment={"STEPS": str(steps), "RESULT_DIR": str(result_dir)},
            container_group_id=cluster.group,
            sync=sync,
            heartbeat_interval=1,
        )
        out.write(f"Submitted job {job.id}: count to {steps}, a checkpoint per step.\n")
        killed = False
        last = None
        deadline = time.monotonic() + 60 + steps
        while time.monotonic() < deadline:
            current = client.get_job(job.id)
            step = int((current.progress or {}).get("step") or 0)
            line = (
                f"  {current.status.value:9} attempt {current.attempt} "
                f"on {current.machine_id} step {step}/{steps}"
                if current.machine_id
                else f"  {current.status.value:9} waiting for a worker"
            )
            if line != last:
                out.write(line + "\n")
                out.flush()
                last = line
            if current.status.finished:
                break
            if not killed and step >= steps // 3 and current.machine_id:
                index = int(current.machine_id.rsplit("-", 1)[1])
                out.write(
                    f"Killing {current.machine_id} (SIGKILL: the node is gone)...\n"
                )
                cluster.worker_children[index].signal(signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        final = client.get_job(job.id)
    stored = cluster.root / "storage" / DEFAULT_BUCKET / "demo" / "out" / "result.json"
    if final.status.value != "completed" or not stored.exists():
        out.write(f"The job ended as {final.status.value}: {final.last_error or ''}\n")
        return 1
    out.write(
        f"Completed after {final.attempt} attempts; result in storage: "
        f"{stored.read_text(encoding='utf-8')}\n"
        '("starts" lists the step each attempt began at: the second attempt '
        "resumed from the last checkpoint.)\n"
    )
    return 0
