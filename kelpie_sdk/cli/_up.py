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
which then stops them in order (Ctrl-C, SIGTERM and SIGHUP alike): first every
worker stops claiming (SIGUSR1, confirmed by a file each creates), then they
release their jobs (SIGTERM), so that no stopping worker takes a job another
one released; the server stops last. On Linux the children also get SIGTERM
when ``kelpie up`` dies without cleaning up (even by SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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
#: The server's quarantine and placement settings (``ReputationPolicy.ENV``).
_REPUTATION_SETTINGS = frozenset(
    {
        "KELPIE_QUARANTINE_FAILURES",
        "KELPIE_QUARANTINE_JOBS",
        "KELPIE_QUARANTINE_RATE",
        "KELPIE_QUARANTINE_SECONDS",
        "KELPIE_FLAKY_INTERRUPTIONS",
        "KELPIE_FLAKY_RATE",
        "KELPIE_PLACEMENT_WINDOW",
        "KELPIE_LIVE_SECONDS",
    }
)
#: The server quarantined the worker's machine: its replacement is a new machine.
_WORKER_QUARANTINED_EXIT = 5
#: The workers' long poll: a claim in flight ends within this many seconds,
#: which bounds how long a stop waits for the workers to stop claiming.
_WORKER_LONG_POLL_S = 5
#: How long a stop waits for every worker to confirm it stopped claiming.
_STOP_CLAIMING_TIMEOUT_S = _WORKER_LONG_POLL_S + 25
#: What each worker creates once it has stopped claiming (in its directory).
_CLAIMS_STOPPED = "claims-stopped"
_PR_SET_PDEATHSIG = 1


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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server binds: a port in TIME_WAIT is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _die_with_parent() -> Callable[[], None] | None:
    """
    A ``preexec_fn`` that has the kernel send the child SIGTERM when this
    process dies, however it dies (Linux only; ``None`` elsewhere).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Loaded here, not after the fork.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _say(out: IO[str], text: str) -> None:
    """Write while stopping: the terminal may be gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError):
        out.write(text)
        out.flush()


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


def _worker_env(
    *,
    url: str,
    key: str,
    group: str,
    machine: str,
    storage_url: str,
    home: Path,
    long_poll_s: int,
) -> dict[str, str]:
    """
    The environment of a worker of a local cluster (``kelpie up``, ``kelpie
    chaos``): the clean environment plus the worker's settings, its directories
    under ``home``.
    """
    env = _clean_env()
    env.update(
        PYTHONUNBUFFERED="1",
        KELPIE_API_URL=url,
        KELPIE_API_KEY=key,
        SALAD_CONTAINER_GROUP_ID=group,
        SALAD_MACHINE_ID=machine,
        KELPIE_STORAGE_URL=storage_url,
        KELPIE_STATE_FILE=str(home / "state.json"),
        INPUT_DIR=str(home / "input"),
        OUTPUT_DIR=str(home / "output"),
        CHECKPOINT_DIR=str(home / "checkpoint"),
        KELPIE_LONG_POLL_S=str(long_poll_s),
        # Local workers share one node: never set its SaladCloud deletion
        # cost or ask to reallocate it, even when run on a SaladCloud node.
        KELPIE_IMDS="off",
    )
    return env


def _wait_ready(url: str, key: str, server: _Child | None, timeout: float) -> bool:
    """
    Whether the server at ``url`` answers within ``timeout`` seconds (``False``
    as soon as its process exits).
    """
    deadline = time.monotonic() + timeout
    with Client(url, key, max_retries=0, timeout=(1.0, 2.0)) as client:
        while time.monotonic() < deadline:
            if server is not None and server.poll() is not None:
                return False
            try:
                client.me()
            except KelpieError:
                time.sleep(0.1)
                continue
            return True
    return False


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
    #: A worker's "stopped claiming" file (``None`` for the server).
    claims_stopped: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        if self.claims_stopped is not None:
            self.claims_stopped.unlink(missing_ok=True)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Safe: kelpie up starts no threads of its own.
            preexec_fn=_die_with_parent(),
        )

    def stopped_claiming(self) -> bool:
        """Whether the worker confirmed it claims no more, or has exited."""
        return self.poll() is not None or (
            self.claims_stopped is not None and self.claims_stopped.exists()
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


def _server_child(root: Path, host: str, port: int, env: dict[str, str]) -> _Child:
    """
    A local cluster's API server (not started): SQLite in ``root/kelpie.db``,
    its log in ``root/server.log``.
    """
    return _Child(
        "server",
        [
            sys.executable,
            "-m",
            "kelpie_sdk.server",
            "--host",
            host,
            "--port",
            str(port),
            "--database",
            f"sqlite:///{root / 'kelpie.db'}",
        ],
        env,
        root,
        root / "server.log",
    )


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
        # The quarantine and placement settings are the server's: pass them on.
        env.update((k, v) for k, v in os.environ.items() if k in _REPUTATION_SETTINGS)
        self.server = _server_child(self.root, self.host, self.port, env)
        self.server.start()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return _wait_ready(self.url, self.key, self.server, timeout)

    def worker(self, index: int, machine: str | None = None) -> _Child:
        home = self.root / "workers" / str(index)
        home.mkdir(parents=True, exist_ok=True)
        env = _worker_env(
            url=self.url,
            key=self.key,
            group=self.group,
            machine=machine or f"local-{index}",
            storage_url=self.storage_url,
            home=home,
            long_poll_s=_WORKER_LONG_POLL_S,
        )
        env.update(
            KELPIE_SLOTS=str(self.slots),
            KELPIE_CLAIMS_STOPPED_FILE=str(home / _CLAIMS_STOPPED),
        )
        return _Child(
            f"worker {index}",
            [sys.executable, "-m", "kelpie_sdk.worker"],
            env,
            home,
            home / "worker.log",
            claims_stopped=home / _CLAIMS_STOPPED,
        )

    def start_workers(self) -> None:
        for i in range(self.workers):
            child = self.worker(i)
            child.start()
            self.worker_children.append(child)

    def stop(self, out: IO[str]) -> None:
        """
        Workers first: all stop claiming, then they release their jobs (so no
        stopping worker takes a released job); then the server.
        """
        for child in self.worker_children:
            child.signal(signal.SIGUSR1)
        deadline = time.monotonic() + _STOP_CLAIMING_TIMEOUT_S
        waiting = list(self.worker_children)
        while waiting and time.monotonic() < deadline:
            waiting = [c for c in waiting if not c.stopped_claiming()]
            if waiting:
                time.sleep(0.05)
        if waiting:
            names = ", ".join(c.name for c in waiting)
            _say(out, f"{names} did not stop claiming in time; stopping anyway\n")
        for child in self.worker_children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for child in self.worker_children:
            if child.wait(max(deadline - time.monotonic(), 0.1)) is None:
                _say(out, f"{child.name} did not stop in time; killing it\n")
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
    if args.port != 0 and _port_in_use(args.host, args.port):
        out.write(
            f"Error: port {args.port} on {args.host} is already in use (another "
            "`kelpie up` or Kelpie server?); stop that one, or pick another port "
            "with --port (0 picks a free one)\n"
        )
        return 1
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

    # SIGHUP: the terminal was closed; stop as for Ctrl-C.
    previous = {
        sig: signal.signal(sig, on_signal)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
            "-- python -c 'print(42)'\n"
            "Press Ctrl-C to stop.\n"
        )
        out.flush()
        renamed = 0
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
                machine = None
                if code == _WORKER_QUARANTINED_EXIT:
                    # The same machine id would stay quarantined: start the
                    # replacement as a new machine, as a reallocation would.
                    renamed += 1
                    machine = f"local-{i}-{renamed}"
                    out.write(
                        f"{child.name} was quarantined by the server (failures on "
                        f"several jobs); starting a new one as machine {machine}\n"
                    )
                else:
                    out.write(
                        f"{child.name} exited with code {code}; starting a new one\n"
                    )
                out.flush()
                replacement = cluster.worker(i, machine)
                replacement.start()
                cluster.worker_children[i] = replacement
    except KeyboardInterrupt:
        pass
    _say(
        out,
        "Stopping: workers first (their jobs go back to the queue), "
        "then the server...\n",
    )
    try:
        if scaling is not None:
            scaling.stop()
        cluster.stop(out)
    except KeyboardInterrupt:
        _say(out, "Killing everything.\n")
        if scaling is not None:
            scaling.kill()
        cluster.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say(out, "Stopped.\n")
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
