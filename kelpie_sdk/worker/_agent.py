"""
The worker loop: claim, heartbeat, download, run, upload, report, repeat.

One :class:`Worker` runs ``slots`` independent loops (threads), each holding at
most one job at a time with its own directories and state file. Everything the
worker says to the server goes through the public :class:`~kelpie_sdk.Client`;
everything it moves goes through :class:`~kelpie_sdk.storage.Storage`.

Threads per running job: the slot's own thread (downloads, the child's life,
uploads and reports), a heartbeat thread and a snapshot thread that uploads the
changed checkpoint files after each successful heartbeat. Only the slot thread
signals the child and reports outcomes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs

from kelpie_sdk.client import Client
from kelpie_sdk.errors import (
    APIError,
    APIStatusError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    KelpieError,
    MachineQuarantined,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
)
from kelpie_sdk.models import Job, JobStatus, SyncConfig, WorkerReport
from kelpie_sdk.storage import storage_url_is_durable
from kelpie_sdk.worker._config import SlotConfig, WorkerConfig
from kelpie_sdk.worker._imds import (
    DELETION_COST_CLAIMED,
    DELETION_COST_FINAL_UPLOAD,
    DELETION_COST_IDLE,
    REALLOCATE_IDLE,
    REALLOCATE_MAX_FAILURES,
    REALLOCATE_QUARANTINED,
    DeletionCost,
    Imds,
    deletion_cost_after_heartbeats,
)
from kelpie_sdk.worker._logship import LogShipper
from kelpie_sdk.worker._metrics import WorkerMetrics
from kelpie_sdk.worker._runner import JobProcess, SpawnError, describe_exit
from kelpie_sdk.worker._snapshot import DirSnapshot, SyncResult
from kelpie_sdk.worker._state import HeldJob, StateFile
from kelpie_sdk.worker._watch import JobWatch, read_progress

if TYPE_CHECKING:
    from kelpie_sdk.storage import Storage

__all__ = [
    "EXIT_CONFIG",
    "EXIT_IDLE",
    "EXIT_MAX_FAILURES",
    "EXIT_OK",
    "EXIT_QUARANTINED",
    "RESCHEDULE_EXIT_CODE",
    "Outcome",
    "Worker",
]

logger = logging.getLogger("kelpie_sdk.worker")

#: The worker stopped because it was asked to (SIGTERM/SIGINT).
EXIT_OK = 0
#: The settings are missing or invalid.
EXIT_CONFIG = 2
#: ``MAX_JOB_FAILURES`` jobs failed on this worker: replace the node.
EXIT_MAX_FAILURES = 3
#: No work for ``MAX_TIME_WITH_NO_WORK_S``: replace (or scale down) the node.
EXIT_IDLE = 4
#: The API server quarantined this machine (failures across different jobs):
#: replace the node.
EXIT_QUARANTINED = 5
#: A job that exits with this code asks to be rescheduled: it is released,
#: not failed.
RESCHEDULE_EXIT_CODE = 85

_RELEASE_ATTEMPTS = 3
#: Why an upload was not attempted: the lease is gone (or cannot be confirmed
#: because the worker is stopping during an API outage).
_NOT_HELD = "the job is no longer held by this worker"
_REPORT_ATTEMPTS = 5
#: Where a job's checkpoints go when it names no place of its own: under the
#: storage root as this "bucket", or on the node under this directory.
DEFAULT_CHECKPOINT_BUCKET = "kelpie-checkpoints"
#: The variable that tells kelpie_sdk.checkpoint where to write.
DEFAULT_URL_VAR = "KELPIE_CHECKPOINT_URL"
#: The variables that name legacy-mode directories; sync-mode jobs do not get
#: them, since nothing moves those directories for a sync-mode job.
_LEGACY_DIR_VARS = ("INPUT_DIR", "OUTPUT_DIR", "CHECKPOINT_DIR")


class Outcome(enum.StrEnum):
    """
    How one job ended on this worker.
    """

    COMPLETED = "completed"
    FAILED = "failed"
    RELEASED = "released"
    #: The server took the job away (cancel, or the lease moved): nothing reported.
    CANCELED = "canceled"
    #: The report could not be delivered; the lease will expire on the server.
    UNREPORTED = "unreported"


#: Outcomes after which the job does not come back to this node.
_FINAL_HERE = frozenset({Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELED})


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _is_dangerous(path: Path) -> bool:
    """A directory the worker must never wipe: /, home, cwd or one above it."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        return True
    protected = [Path.cwd().resolve(), Path.home().resolve()]
    return any(resolved == p or resolved in p.parents for p in protected)


def _wipe(path: Path) -> None:
    """Empty a directory (create it if missing)."""
    if _is_dangerous(path):
        logger.warning("not wiping %s: it is /, home, or the working directory", path)
        path.mkdir(parents=True, exist_ok=True)
        return
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _pid_belongs_to_job(pid: int, job_id: str) -> bool:
    """Whether process ``pid`` still runs job ``job_id`` (Linux /proc)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"KELPIE_JOB_ID={job_id}".encode() in environ.split(b"\0")


@attrs.define
class _Plan:
    """What to move for one job, resolved against the slot and storage."""

    downloads: list[tuple[str, str, Path, str | None]] = attrs.Factory(list)
    #: The legacy input prefix, whose emptiness is worth a warning.
    inputs: tuple[str, str] | None = None
    snapshots: list[DirSnapshot] = attrs.Factory(list)
    outputs: list[tuple[Path, str, str, str | None]] = attrs.Factory(list)
    wipe: list[Path] = attrs.Factory(list)
    checkpoint_url: str | None = None
    output_url: str | None = None
    #: A per-job checkpoint directory on this node (no durable storage).
    private_checkpoints: Path | None = None
    #: Why the job's checkpoints will not survive the node, if they will not.
    checkpoint_warning: str | None = None


class Worker:
    """
    The worker agent.

    Args:
        config: The settings.
        client_factory: Builds an API client; one is made per slot and per
            heartbeat thread. Defaults to ``Client`` with the configured
            credentials.
        storage_factory: Builds the storage (once, lazily). Defaults to
            ``Storage(config.storage_url, max_retries=config.max_retries)``.
        stdout: Where jobs' stdout is streamed (default ``sys.stdout``).
        stderr: Where jobs' stderr is streamed (default ``sys.stderr``).
        imds: SaladCloud's metadata service; by default one at
            ``config.imds_url`` when ``config.imds_enabled``, else none.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        client_factory: Callable[[], Client] | None = None,
        storage_factory: Callable[[], Storage] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        imds: Imds | None = None,
    ) -> None:
        self.config = config
        if imds is None and config.imds_enabled:
            imds = Imds(config.imds_url)
        self.imds = imds
        self._deletion_cost = None if imds is None else DeletionCost(imds, config.slots)
        self._signalled = threading.Event()
        self._reallocation_asked = False
        self._reallocating = False
        self._client_factory = client_factory or self._default_client
        self._storage_factory = storage_factory
        self._storage: Storage | None = None
        self._storage_lock = threading.Lock()
        self.stdout = stdout
        self.stderr = stderr
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._exit_code = EXIT_OK
        self._stop_reason = ""
        self._lock = threading.Lock()
        self._failures = 0
        self._slots: list[_Slot] = []
        self.long_poll_supported: bool | None = None
        #: Whether the API server has accepted one of our calls yet.
        self.api_reached = False
        #: Prometheus metrics, served by ``run`` when ``metrics_port`` is set.
        self.metrics = WorkerMetrics.from_config(config)

    # -- plumbing ----------------------------------------------------------------

    def _default_client(self) -> Client:
        c = self.config
        return Client(
            c.api_url,
            c.api_key,
            salad_api_key=c.salad_api_key,
            salad_organization=c.salad_organization,
            salad_project=c.salad_project,
            max_retries=max(c.max_retries - 1, 0),
            # On SaladCloud without a key: the workload token from IMDS.
            workload_token=None if self.imds is None else self.imds.token,
        )

    def make_client(self) -> Client:
        """
        A new API client.
        """
        return self._client_factory()

    @property
    def storage(self) -> Storage:
        """
        The shared storage, created on first use.
        """
        with self._storage_lock:
            if self._storage is None:
                if self._storage_factory is not None:
                    self._storage = self._storage_factory()
                else:
                    from kelpie_sdk.storage import Storage

                    self._storage = Storage(
                        self.config.storage_url, max_retries=self.config.max_retries
                    )
            return self._storage

    # -- stopping ----------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """
        Whether the worker is shutting down.
        """
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str:
        """Why the worker is stopping (``""`` while it is not)."""
        return self._stop_reason

    def stop(self, reason: str = "stop requested", exit_code: int = EXIT_OK) -> None:
        """
        Ask the worker to stop: no new claims; running jobs get SIGTERM, their
        last checkpoints are uploaded, and they are released to the queue.

        Safe to call from a signal handler and from any thread; the first
        reason and exit code win.
        """
        with self._lock:
            if self._stop.is_set():
                return
            self._exit_code = exit_code
            self._stop_reason = reason
            self._stop.set()
        for slot in list(self._slots):
            slot.wake()

    @property
    def draining(self) -> bool:
        """
        Whether the worker has stopped claiming (``stop_claiming``).
        """
        return self._draining.is_set()

    def stop_claiming(self, on_stopped: Callable[[], object] | None = None) -> None:
        """
        Claim no more jobs; running jobs go on, and the worker exits once they
        are done. A claim in flight is let finish (a job it brings is released
        unstarted).

        Safe to call from a signal handler and from any thread.

        Args:
            on_stopped: Called (in a new thread) once no slot is claiming: from
                then on this worker will not take a job that another releases.
        """
        with self._lock:
            if not self._draining.is_set():
                logger.info(
                    "stopped claiming: running jobs go on, then the worker exits"
                )
                self._stop_reason = self._stop_reason or "drained"
            self._draining.set()
        if on_stopped is not None:

            def notify() -> None:
                while any(slot.claiming for slot in list(self._slots)):
                    time.sleep(0.05)
                on_stopped()

            threading.Thread(target=notify, name="drained", daemon=True).start()

    def wait_stop(self, timeout: float) -> bool:
        """
        Sleep up to ``timeout`` seconds, waking early when the worker stops.

        Returns:
            Whether the worker is stopping.
        """
        return self._stop.wait(timeout)

    def note_failure(self) -> None:
        """
        Count a failure reported by this worker; at ``max_job_failures`` ask
        IMDS to reallocate the node and stop claiming, or, without IMDS, stop
        with ``EXIT_MAX_FAILURES`` (the original kept claiming, W-22).
        """
        with self._lock:
            self._failures += 1
            count = self._failures
        if count >= self.config.max_job_failures:
            self._replace_node(
                REALLOCATE_MAX_FAILURES,
                "max job failures reached",
                EXIT_MAX_FAILURES,
                logging.ERROR,
                "%d job failures on this worker (MAX_JOB_FAILURES=%d): stopping "
                "with exit code %d so that the node is replaced",
                count,
                self.config.max_job_failures,
                EXIT_MAX_FAILURES,
            )

    def quarantined(self, exc: MachineQuarantined) -> None:
        """
        The server gives this machine no work for now: ask IMDS to reallocate
        the node, or, without IMDS, stop with ``EXIT_QUARANTINED``.
        """
        self._replace_node(
            REALLOCATE_QUARANTINED,
            "quarantined by the API server",
            EXIT_QUARANTINED,
            logging.ERROR,
            "%s: stopping with exit code %d so that the node is replaced",
            exc,
            EXIT_QUARANTINED,
        )

    def check_idle(self) -> None:
        """
        Once every slot has had no job for ``max_time_with_no_work_s``
        (measured from the end of its last job, not the start, W-21), ask IMDS
        to reallocate the node, or, without IMDS, stop with ``EXIT_IDLE``.
        """
        budget = self.idle_budget()
        if budget is None or budget >= 0:
            return
        limit = self.config.max_time_with_no_work_s
        # The node's idle time: that of the slot whose last job ended last.
        idle_ms = round(1000 * (limit - budget))
        self._replace_node(
            f"{REALLOCATE_IDLE}{idle_ms}",
            "max time with no work reached",
            EXIT_IDLE,
            logging.WARNING,
            "no work for %.0f s (MAX_TIME_WITH_NO_WORK_S): stopping with exit code %d",
            limit,
            EXIT_IDLE,
        )

    def idle_budget(self) -> float | None:
        """
        Seconds left until every slot has been idle for
        ``max_time_with_no_work_s``.

        Returns:
            ``None`` without an idle limit or while a slot runs a job.
        """
        limit = self.config.max_time_with_no_work_s
        since = [s.idle_since for s in self._slots]
        if limit <= 0 or not since:
            return None
        latest = 0.0
        for t in since:
            if t is None:
                return None
            latest = max(latest, t)
        return latest + limit - time.monotonic()

    def set_deletion_cost(self, slot: int, value: int) -> None:
        """
        Record one slot's deletion cost; the node's (the highest) goes to IMDS
        when it changes. Does nothing without IMDS.
        """
        if self._deletion_cost is not None:
            self._deletion_cost.set(slot, value)

    def _replace_node(
        self, reason: str, why: str, exit_code: int, level: int, msg: str, *args: Any
    ) -> None:
        """
        Ask IMDS for another node (``_reallocate``); without IMDS, or if it
        does not agree, log ``msg`` and stop with ``exit_code``.
        """
        if self._reallocate(reason, why):
            return
        logger.log(level, msg, *args)
        self.stop(why, exit_code)

    def _reallocate(self, reason: str, why: str) -> bool:
        """
        Ask IMDS for another node, and stop claiming if it agreed.

        Returns:
            Whether IMDS accepted (without IMDS, or if it does not answer, the
            caller stops with its exit code instead).
        """
        with self._lock:
            if self.imds is None or self._stop.is_set():
                return False
            if self._reallocation_asked:
                return True  # another slot is asking; it stops the worker
            self._reallocation_asked = True
        if not self.imds.reallocate(reason):
            return False
        with self._lock:
            self._reallocating = True
        self.stop(f"{why}; reallocation requested", EXIT_OK)
        return True

    # -- running -----------------------------------------------------------------

    def run(self) -> int:
        """
        Run until stopped; returns the process exit code.

        Signal handling is the caller's business (see ``install_signal_handlers``);
        this method only waits, so it can run in the main thread.
        """
        c = self.config
        if c.machine_id_generated:
            logger.info(
                "SALAD_MACHINE_ID is not set; using machine id %s", c.machine_id
            )
        logger.info(
            "kelpie worker started: machine %s, container group %s, %d slot(s), api %s",
            c.machine_id,
            c.container_group_id,
            c.slots,
            c.api_url or "(default)",
        )
        if c.metrics_port is not None:
            try:
                self.metrics.serve(c.metrics_host, c.metrics_port)
            except ConfigError as exc:
                logger.error("configuration error: %s", exc)
                return EXIT_CONFIG
        self._slots = [_Slot(self, c.slot(i)) for i in range(c.slots)]
        threads = [
            threading.Thread(target=s.run, name=f"slot-{s.cfg.index}", daemon=True)
            for s in self._slots
        ]
        for t in threads:
            t.start()
        while not self._stop.wait(0.5):
            if not any(t.is_alive() for t in threads):
                break
        # Busy slots finish their shutdown (SIGTERM, grace, last upload, release);
        # idle ones are at most in a long poll, which they abandon.
        for slot, t in zip(self._slots, threads, strict=True):
            t.join(timeout=None if slot.busy else 2.0)
        with self._storage_lock:
            if self._storage is not None:
                self._storage.close()
        if self._reallocating and not self._signalled.is_set():
            # Exiting now would let the container restart on this node and
            # claim again; SaladCloud stops it once the move begins.
            logger.info(
                "waiting up to %.0f s for SaladCloud to stop this container",
                self.config.reallocate_wait_s,
            )
            self._signalled.wait(self.config.reallocate_wait_s)
        if self._deletion_cost is not None:
            self._deletion_cost.close()
        if self.imds is not None:
            self.imds.close()
        self.metrics.close()
        logger.info(
            "kelpie worker exiting (%s) with code %d",
            self._stop_reason or "done",
            self._exit_code,
        )
        return self._exit_code

    def install_signal_handlers(
        self, on_claims_stopped: Callable[[], object] | None = None
    ) -> None:
        """
        SIGTERM and SIGINT stop the worker gracefully; SIGUSR1 makes it stop
        claiming (``stop_claiming``). Main thread only.

        Args:
            on_claims_stopped: Passed to ``stop_claiming`` on SIGUSR1.
        """

        def handle(signum: int, frame: object) -> None:
            logger.info("received %s: shutting down", signal.Signals(signum).name)
            self._signalled.set()
            self.stop(f"received {signal.Signals(signum).name}", EXIT_OK)

        def drain(signum: int, frame: object) -> None:
            self.stop_claiming(on_claims_stopped)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGUSR1, drain)


class _Slot:
    """One job at a time, with its own directories and state file."""

    def __init__(self, worker: Worker, cfg: SlotConfig) -> None:
        self.worker = worker
        self.cfg = cfg
        self.state = StateFile(
            cfg.state_file, machine_id=worker.config.machine_id, slot=cfg.index
        )
        self.busy = False
        #: True from just before the drain check to the end of a claim call.
        self.claiming = False
        self.idle_since: float | None = time.monotonic()
        self._run: _JobRun | None = None
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self.worker.make_client()
        return self._client

    def wake(self) -> None:
        run = self._run
        if run is not None:
            run.wake.set()

    def report(self, job_id: str, attempt: int | None, **fields: Any) -> WorkerReport:
        c = self.worker.config
        return WorkerReport(
            machine_id=c.machine_id,
            container_group_id=c.container_group_id,
            attempt=attempt,
            **fields,
        )

    def run(self) -> None:
        try:
            self._release_previous()
            self._loop()
        except Exception:
            logger.exception("slot %d crashed", self.cfg.index)
            self.worker.stop(f"slot {self.cfg.index} crashed", 1)

    def _release_previous(self) -> None:
        """Hand back at once a job that a previous run of this slot held."""
        held, history = self.state.read_previous()
        if held is not None:
            if held.pid is not None and _pid_belongs_to_job(held.pid, held.id):
                logger.warning(
                    "job %s: its process %d outlived the previous worker; killing it",
                    held.id,
                    held.pid,
                )
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(held.pid, signal.SIGKILL)
            logger.info(
                "job %s (attempt %s) was in progress when this worker last stopped; "
                "releasing it",
                held.id,
                held.attempt,
            )
            report = WorkerReport(
                machine_id=held.machine_id,
                container_group_id=held.container_group_id,
                attempt=held.attempt,
                reason="the worker restarted",
            )
            released = _deliver(
                lambda: self.client.release(held.id, report),
                what=f"release of job {held.id}",
                attempts=_RELEASE_ATTEMPTS,
                sleep=self.worker.wait_stop,
            )
            history.append(
                {
                    "id": held.id,
                    "attempt": held.attempt,
                    "start": held.start,
                    "end": _utcnow(),
                    "outcome": "released" if released else "unreported",
                    "reason": "worker restarted",
                }
            )
        self.state.start(history)

    def _loop(self) -> None:
        w = self.worker
        c = w.config
        error_delay = 1.0
        while not w.stopping:
            wait = c.long_poll_s if c.long_poll_s > 0 else None
            if wait is not None:
                wait = _within_idle_budget(wait, w.idle_budget())
            started = time.monotonic()
            # Raised before the check, so that stop_claiming() either sees this
            # claim or this check sees the drain.
            self.claiming = True
            if w.draining:
                self.claiming = False
                break
            claim_result = "error"
            error: KelpieError | None = None
            try:
                job = self.client.claim_work(
                    machine_id=c.machine_id,
                    container_group_id=c.container_group_id,
                    wait=wait,
                )
                claim_result = "empty" if job is None else "job"
            except MachineQuarantined as exc:
                claim_result = "empty"
                error = exc
            except (APIError, KelpieError) as exc:
                error = exc
            finally:
                self.claiming = False
                w.metrics.note_claim(time.monotonic() - started, claim_result)
            if isinstance(error, MachineQuarantined):
                w.quarantined(error)
                return
            if error is not None:
                if (
                    isinstance(error, AuthenticationError | PermissionDeniedError)
                    and not w.api_reached
                ):
                    # Refused before anything was accepted: the key is wrong,
                    # and retrying will not fix it.
                    logger.error(
                        "configuration error: the API server refused this worker's "
                        "credentials (%s); check KELPIE_API_KEY (--api-key) or "
                        "SALAD_API_KEY",
                        error,
                    )
                    w.stop("the API server refused the credentials", EXIT_CONFIG)
                    return
                logger.warning(
                    "slot %d: claiming work failed: %s (retrying in %.0f s)",
                    self.cfg.index,
                    error,
                    error_delay,
                )
                w.wait_stop(error_delay)
                error_delay = min(error_delay * 2, max(c.poll_interval_s, 1.0))
                continue
            error_delay = 1.0
            w.api_reached = True
            if job is None:
                w.set_deletion_cost(self.cfg.index, DELETION_COST_IDLE)
                elapsed = time.monotonic() - started
                if wait is not None and elapsed >= wait / 2:
                    w.long_poll_supported = True
                w.check_idle()
                if wait is None or not w.long_poll_supported:
                    # The original behaviour (or a server without long-poll).
                    w.wait_stop(_within_idle_budget(c.poll_interval_s, w.idle_budget()))
                continue
            self.busy = True
            self.idle_since = None
            w.set_deletion_cost(self.cfg.index, DELETION_COST_CLAIMED)
            try:
                self._stop_older_attempts(job)
                if w.wait_stop(0) or w.draining:
                    self._release_unstarted(job)
                    break
                self._run = _JobRun(self, job)
                self._run.execute()
            finally:
                self._run = None
                self.busy = False
                self.idle_since = time.monotonic()
                w.set_deletion_cost(self.cfg.index, DELETION_COST_IDLE)

    def _stop_older_attempts(self, job: Job) -> None:
        """
        Stop another slot's attempt at the same job and wait for it to end.

        The server hands a job out again once its lease lapses, and after an
        outage it can hand it to another slot of this very node before the
        slot that ran it hears, on its next heartbeat, that the job moved.
        Both attempts would then share the job's ``sync`` directories on this
        disk, one wiping and overwriting the other's files.
        """
        for other in list(self.worker._slots):
            run = other._run
            if other is self or run is None or run.job.id != job.id:
                continue
            run._mark_lost(
                f"the server handed the job to slot {self.cfg.index} of this node "
                f"as attempt {job.attempt}"
            )
            # Its process gets the kill grace; its worker thread then ends.
            deadline = time.monotonic() + self.worker.config.kill_grace_s + 30.0
            while other._run is run and time.monotonic() < deadline:
                time.sleep(0.05)
            if other._run is run:
                logger.warning(
                    "job %s: attempt %s on slot %d has not ended; starting attempt "
                    "%s anyway",
                    job.id,
                    run.attempt,
                    other.cfg.index,
                    job.attempt,
                )

    def _release_unstarted(self, job: Job) -> None:
        logger.info("job %s: claimed while shutting down; releasing it", job.id)
        report = self.report(
            job.id, job.attempt, reason="claimed while the worker was shutting down"
        )
        _deliver(
            lambda: self.client.release(job.id, report),
            what=f"release of job {job.id}",
            attempts=_RELEASE_ATTEMPTS,
        )


def _within_idle_budget(wait: float, budget: float | None) -> float:
    """
    Shorten a wait so that the idle limit is checked when it is reached.

    A little is added to the budget so that the check after the wait sees the
    limit passed.
    """
    if budget is None:
        return wait
    return min(wait, max(budget, 0.0) + 0.1)


def _safe_name(job_id: str) -> str:
    """A job id as one safe path component."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", job_id) or "job"


def _deliver(
    call: Callable[[], object],
    *,
    what: str,
    attempts: int,
    sleep: Callable[[float], object] = time.sleep,
) -> bool:
    """
    Make a report with retries; never raises (the original crashed, W-9).

    Returns:
        Whether the server accepted it.
    """
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            call()
            return True
        except ConflictError as exc:
            logger.warning(
                "%s refused: this worker no longer holds the job (%s)", what, exc
            )
            return False
        except NotFoundError as exc:
            logger.warning("%s refused: the job no longer exists (%s)", what, exc)
            return False
        except APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code != 429:
                logger.error("%s refused: %s", what, exc)
                return False
            logger.warning(
                "%s failed (attempt %d/%d): %s", what, attempt, attempts, exc
            )
        except KelpieError as exc:
            logger.warning(
                "%s failed (attempt %d/%d): %s", what, attempt, attempts, exc
            )
        if attempt < attempts:
            sleep(delay)
            delay = min(delay * 2, 30.0)
    logger.error("%s could not be delivered after %d attempts", what, attempts)
    return False


class _JobRun:
    """One claimed job on one slot, from claim to report."""

    def __init__(self, slot: _Slot, job: Job) -> None:
        self.slot = slot
        self.worker = slot.worker
        self.config = slot.worker.config
        self.job = job
        self.attempt = job.attempt
        self.wake = threading.Event()
        self.lost = threading.Event()
        self.lost_reason = ""
        self._hb_stop = threading.Event()
        self._tick = threading.Event()
        self._lease_confirmed_at: float | None = None
        self._lease_lock = threading.Lock()
        self.process: JobProcess | None = None
        self.logs: LogShipper | None = None
        self.plan = _Plan()
        self._snapshots_ready = False
        self._abandoned: list[threading.Thread] = []
        self._heartbeats = 0
        self._final_upload = False
        self._cost_lock = threading.Lock()

    # -- small helpers ------------------------------------------------------------

    def _info(self, msg: str, *args: object) -> None:
        logger.info("job %s: %s", self.job.id, msg % args if args else msg)

    def _warn(self, msg: str, *args: object) -> None:
        logger.warning("job %s: %s", self.job.id, msg % args if args else msg)

    def report(self, **fields: Any) -> WorkerReport:
        progress = self.read_progress()
        if progress is not None and "progress" not in fields:
            fields["progress"] = progress
        return self.slot.report(self.job.id, self.attempt, **fields)

    def read_progress(self) -> dict[str, Any] | None:
        return read_progress(self.slot.cfg.progress_file)

    @property
    def interval(self) -> float:
        return float(max(self.job.heartbeat_interval, 1))

    def lease_valid(self) -> bool:
        """Whether the last confirmed heartbeat still covers us (W-3 fence)."""
        if self.lost.is_set():
            return False
        with self._lease_lock:
            at = self._lease_confirmed_at
        return at is not None and time.monotonic() - at < 1.5 * self.interval

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            self._warn("%s; stopping it", reason)
        self.wake.set()

    def _set_cost(self, value: int, *, final: bool = False) -> None:
        """The slot's deletion cost; once the final upload began, only that."""
        with self._cost_lock:
            if final:
                self._final_upload = True
            elif self._final_upload:
                return
            self.worker.set_deletion_cost(self.slot.cfg.index, value)

    # -- heartbeat and snapshots ----------------------------------------------------

    def _heartbeat_once(self, client: Client) -> bool | None:
        """
        Send one heartbeat.

        Returns:
            True if we hold the job, False if we lost it, None on an API error.
        """
        sent_at = time.monotonic()
        try:
            status = client.heartbeat(
                self.job.id, self.report(error=self.plan.checkpoint_warning)
            )
        except NotFoundError:
            self.worker.metrics.note_heartbeat("lost")
            self._mark_lost("the job no longer exists on the server")
            return False
        except KelpieError as exc:
            self.worker.metrics.note_heartbeat("failed")
            self._warn("heartbeat failed: %s", exc)
            return None
        if status is not JobStatus.RUNNING:
            self.worker.metrics.note_heartbeat("lost")
            self._mark_lost(f"the server answered the heartbeat with {status.value!r}")
            return False
        self.worker.metrics.note_heartbeat("ok")
        with self._lease_lock:
            self._lease_confirmed_at = sent_at
        return True

    def _heartbeat_loop(self) -> None:
        client = self.worker.make_client()
        try:
            error_delay = 1.0
            while not self._hb_stop.is_set():
                ok = self._heartbeat_once(client)
                if ok is False:
                    return
                if ok is None:
                    # Keep the job running; retry sooner than the interval.
                    self._hb_stop.wait(min(error_delay, self.interval))
                    error_delay = min(error_delay * 2, 30.0)
                    continue
                error_delay = 1.0
                self._heartbeats += 1
                self._set_cost(deletion_cost_after_heartbeats(self._heartbeats))
                self._tick.set()
                self._hb_stop.wait(self.interval)
        finally:
            client.close()

    def _snapshot_loop(self) -> None:
        while not self._hb_stop.is_set():
            self._tick.wait()
            self._tick.clear()
            if (
                self._hb_stop.is_set()
                or not self._snapshots_ready
                or not self.lease_valid()
            ):
                continue
            for snap in self.plan.snapshots:
                try:
                    result = self._sync(snap, final=False)
                except (StorageError, OSError) as exc:
                    self._warn(
                        "checkpoint upload from %s failed: %s", snap.local_dir, exc
                    )
                    continue
                if result.uploaded or result.deleted:
                    self._info(
                        "checkpoint %s: %d file(s) uploaded, %d deleted",
                        snap.local_dir,
                        result.uploaded,
                        result.deleted,
                    )

    def _sync(self, snap: DirSnapshot, *, final: bool) -> SyncResult:
        started = time.monotonic()
        result = snap.sync(self.worker.storage, final=final)
        if result.uploaded:
            self.worker.metrics.note_checkpoint_upload(
                time.monotonic() - started, result.bytes, final=final
            )
        return result

    def confirm_lease(self) -> bool:
        """
        Make sure we still hold the job before uploading its results: reuse a
        recent heartbeat, else send one (retrying through outages).
        """
        if self.lease_valid():
            return True
        client = self.worker.make_client()
        delay = 1.0
        try:
            while not self.lost.is_set():
                ok = self._heartbeat_once(client)
                if ok is True:
                    return True
                if ok is False:
                    return False
                if self.worker.stopping:
                    return False
                self.worker.wait_stop(delay)
                delay = min(delay * 2, 30.0)
            return False
        finally:
            client.close()

    def _final_sync(self, *, required: bool) -> str | None:
        """
        Upload the checkpoint directories' last changes.

        Returns:
            An error message, or ``None`` on success.
        """
        if not self.plan.snapshots:
            return None
        if not self.lease_valid() and not self.confirm_lease():
            self._warn("not uploading the last checkpoint: the job is not ours now")
            return _NOT_HELD
        for snap in self.plan.snapshots:
            try:
                result = self._sync(snap, final=True)
            except (StorageError, OSError) as exc:
                msg = f"{snap.local_dir}: {exc}"
                logger.log(
                    logging.ERROR if required else logging.WARNING,
                    "job %s: last checkpoint upload failed: %s",
                    self.job.id,
                    msg,
                )
                return msg
            if result.uploaded or result.deleted:
                self._info(
                    "checkpoint %s: %d file(s) uploaded, %d deleted (final)",
                    snap.local_dir,
                    result.uploaded,
                    result.deleted,
                )
        return None

    # -- the plan ----------------------------------------------------------------

    def _resolve(self, path: str) -> Path:
        return Path(path).expanduser().absolute()

    def make_plan(self) -> _Plan:
        job, cfg = self.job, self.slot.cfg
        storage_needed = False
        plan = _Plan()
        compress = job.compression
        if job.sync is not None:
            sync = job.sync
            for entry in sync.before or ():
                plan.downloads.append(
                    (
                        entry.bucket,
                        entry.prefix,
                        self._resolve(entry.local_path),
                        entry.pattern,
                    )
                )
            for entry in sync.during or ():
                plan.snapshots.append(self._snapshot_for(entry, compress))
            for entry in sync.after or ():
                plan.outputs.append(
                    (
                        self._resolve(entry.local_path),
                        entry.bucket,
                        entry.prefix,
                        entry.pattern,
                    )
                )
            plan.wipe = sorted(
                {self._resolve(e.local_path) for _, e in sync.entries()}, key=str
            )
            storage_needed = bool(plan.downloads or plan.snapshots or plan.outputs)
            if storage_needed:
                if sync.during:
                    first = sync.during[0]
                    plan.checkpoint_url = self.worker.storage.url(
                        first.bucket, first.prefix
                    )
                if sync.after:
                    first = sync.after[0]
                    plan.output_url = self.worker.storage.url(
                        first.bucket, first.prefix
                    )
        else:
            plan.wipe = [cfg.input_dir, cfg.output_dir, cfg.checkpoint_dir]
            if job.input_bucket and job.input_prefix is not None:
                plan.downloads.append(
                    (job.input_bucket, job.input_prefix, cfg.input_dir, None)
                )
                plan.inputs = (job.input_bucket, job.input_prefix)
            if job.checkpoint_bucket and job.checkpoint_prefix is not None:
                plan.downloads.append(
                    (
                        job.checkpoint_bucket,
                        job.checkpoint_prefix,
                        cfg.checkpoint_dir,
                        None,
                    )
                )
                plan.snapshots.append(
                    DirSnapshot(
                        cfg.checkpoint_dir,
                        job.checkpoint_bucket,
                        job.checkpoint_prefix,
                        compress=compress,
                    )
                )
                plan.checkpoint_url = self.worker.storage.url(
                    job.checkpoint_bucket, job.checkpoint_prefix
                )
            if job.output_bucket and job.output_prefix is not None:
                plan.outputs.append(
                    (cfg.output_dir, job.output_bucket, job.output_prefix, None)
                )
                plan.output_url = self.worker.storage.url(
                    job.output_bucket, job.output_prefix
                )
        if plan.checkpoint_url is None and DEFAULT_URL_VAR not in job.environment:
            self._default_checkpoints(plan)
        return plan

    def _default_checkpoints(self, plan: _Plan) -> None:
        """
        Give a job that names no checkpoint location one of its own: under
        the storage root when that is durable, else a directory on this node.
        """
        name = _safe_name(self.job.id)
        storage_url = self.config.storage_url
        if storage_url_is_durable(storage_url):
            plan.checkpoint_url = self.worker.storage.url(
                DEFAULT_CHECKPOINT_BUCKET, f"{name}/"
            )
            return
        local = self.slot.cfg.state_file.parent / DEFAULT_CHECKPOINT_BUCKET / name
        plan.private_checkpoints = local
        plan.checkpoint_url = local.as_uri()
        plan.checkpoint_warning = (
            f"its checkpoints go to {local} on this node and will not survive the "
            f"loss of the node: the worker's storage URL {storage_url!r} names no "
            "durable place (set KELPIE_STORAGE_URL to a bucket or shared directory, "
            "or give the job sync.during or a checkpoint prefix)"
        )

    def _snapshot_for(self, entry: SyncConfig, compress: bool) -> DirSnapshot:
        return DirSnapshot(
            self._resolve(entry.local_path),
            entry.bucket,
            entry.prefix,
            pattern=entry.pattern,
            compress=compress,
        )

    def environment(self) -> dict[str, str]:
        """The child's environment: worker's, overlaid by job's, then ours."""
        cfg = self.slot.cfg
        env = dict(os.environ)
        if self.job.sync is not None:
            # Nothing downloads or uploads these directories for a sync-mode
            # job: a job writing there would lose its files.
            for name in _LEGACY_DIR_VARS:
                env.pop(name, None)
        env.update(self.job.environment)
        injected = {
            "KELPIE_JOB_ID": self.job.id,
            "KELPIE_ATTEMPT": str(self.attempt if self.attempt is not None else 0),
            "KELPIE_STATE_FILE": str(cfg.state_file),
            "KELPIE_PROGRESS_FILE": str(cfg.progress_file),
        }
        if self.job.sync is None:
            injected["INPUT_DIR"] = str(cfg.input_dir)
            injected["OUTPUT_DIR"] = str(cfg.output_dir)
            injected["CHECKPOINT_DIR"] = str(cfg.checkpoint_dir)
        if self.plan.checkpoint_url is not None:
            injected[DEFAULT_URL_VAR] = self.plan.checkpoint_url
        if self.plan.output_url is not None:
            injected["KELPIE_OUTPUT_URL"] = self.plan.output_url
        if cfg.cuda_visible_devices is not None:
            injected["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
        env.update(injected)
        return env

    # -- the job -------------------------------------------------------------------

    def execute(self) -> Outcome:
        job = self.job
        state = self.slot.state
        self._info(
            "claimed (attempt %s): %s %s",
            self.attempt,
            job.command,
            " ".join(job.arguments),
        )
        state.hold(
            HeldJob(
                id=job.id,
                attempt=self.attempt,
                machine_id=self.config.machine_id,
                container_group_id=self.config.container_group_id,
                phase="starting",
                start=_utcnow(),
            )
        )
        with contextlib.suppress(FileNotFoundError):
            self.slot.cfg.progress_file.unlink()
        hb = threading.Thread(
            target=self._heartbeat_loop, name=f"hb-{job.id}", daemon=True
        )
        snap = threading.Thread(
            target=self._snapshot_loop, name=f"snap-{job.id}", daemon=True
        )
        hb.start()
        snap.start()
        self.worker.metrics.note_job_started()
        watch = self._watch()
        watch.start()
        outcome = Outcome.UNREPORTED
        details: dict[str, Any] = {}
        try:
            outcome, details = self._execute()
        except Exception as exc:
            logger.exception("job %s: unexpected error in the worker", job.id)
            if self.process is not None and self.process.poll() is None:
                self.process.terminate(self.config.kill_grace_s)
            self._stop_heartbeat(hb, snap)
            outcome, details = self._fail(f"worker error: {exc!r}")
        finally:
            if self.logs is not None:
                self.logs.stop()
            watch.stop()
            self._stop_heartbeat(hb, snap)
            state.finish(outcome.value, **details)
            self.worker.metrics.note_job_finished(outcome.value)
            if not self.worker.stopping:
                # Downloads abandoned on cancel must end before their directories
                # are wiped for the next job. (On shutdown nothing waits for
                # them: the next start wipes the directories before each job.)
                for t in self._abandoned:
                    t.join()
                for path in self.plan.wipe:
                    with contextlib.suppress(OSError):
                        _wipe(path)
            private = self.plan.private_checkpoints
            if private is not None and outcome in _FINAL_HERE:
                # The job will not run on this node again; a released one may.
                shutil.rmtree(private, ignore_errors=True)
            self._info("finished: %s", outcome.value)
        return outcome

    def _watch(self) -> JobWatch:
        """Progress and cancellation between heartbeats (see ``_watch.py``)."""

        def on_lost(reason: str) -> None:
            if not self._hb_stop.is_set():  # not once the outcome is reported
                self._mark_lost(reason)

        return JobWatch(
            make_client=self.worker.make_client,
            job_id=self.job.id,
            machine_id=self.config.machine_id,
            attempt=self.attempt,
            progress_file=self.slot.cfg.progress_file,
            make_report=lambda record: self.slot.report(
                self.job.id, self.attempt, progress=record
            ),
            on_lost=on_lost,
        )

    def _log_shipper(self) -> LogShipper | None:
        """The job's output, sent to the server (see ``_logship.py``)."""
        if not self.config.ship_logs or self.attempt is None:
            return None
        shipper = LogShipper(
            make_client=self.worker.make_client,
            job_id=self.job.id,
            machine_id=self.config.machine_id,
            attempt=self.attempt,
            container_group_id=self.config.container_group_id,
        )
        shipper.start()
        return shipper

    def _stop_heartbeat(self, *threads: threading.Thread) -> None:
        self._hb_stop.set()
        self._tick.set()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=60.0)

    def _fail(
        self, error: str, exit_code: int | None = None
    ) -> tuple[Outcome, dict[str, Any]]:
        self._hb_stop.set()
        self._warn("failed: %s", error.splitlines()[0] if error else "")
        ok = _deliver(
            lambda: self.slot.client.report_failed(
                self.job.id, self.report(exit_code=exit_code, error=error)
            ),
            what=f"failure report of job {self.job.id}",
            attempts=_REPORT_ATTEMPTS,
        )
        if ok:
            self.worker.note_failure()
        details: dict[str, Any] = {"error": error[:500]}
        if exit_code is not None:
            details["exit_code"] = exit_code
        return (Outcome.FAILED if ok else Outcome.UNREPORTED), details

    def _release(self, reason: str) -> tuple[Outcome, dict[str, Any]]:
        self._hb_stop.set()
        self._info("releasing to the queue: %s", reason)
        ok = _deliver(
            lambda: self.slot.client.release(self.job.id, self.report(reason=reason)),
            what=f"release of job {self.job.id}",
            attempts=_RELEASE_ATTEMPTS,
        )
        return (Outcome.RELEASED if ok else Outcome.UNREPORTED), {"reason": reason}

    def _shutdown_reason(self) -> str:
        why = self.worker.stop_reason
        return "the worker is shutting down" + (f" ({why})" if why else "")

    def _canceled(self) -> tuple[Outcome, dict[str, Any]]:
        return Outcome.CANCELED, {"reason": self.lost_reason}

    def _interrupted(self) -> bool:
        return self.lost.is_set() or self.worker.stopping

    def _run_cancellable(
        self, fn: Callable[[], Any]
    ) -> tuple[bool, Any, BaseException | None]:
        """
        Run ``fn`` in a helper thread; return early if the job is lost or the
        worker stops (the helper is then left to finish on its own and joined
        before the slot's directories are wiped).

        Returns:
            (finished, result, exception).
        """
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the slot thread
                box["error"] = exc
            finally:
                done.set()
                self.wake.set()

        t = threading.Thread(target=target, name=f"io-{self.job.id}", daemon=True)
        t.start()
        while not done.is_set():
            if self._interrupted():
                self._abandoned.append(t)
                return False, None, None
            self.wake.wait(0.5)
            self.wake.clear()
        return True, box.get("result"), box.get("error")

    def _execute(self) -> tuple[Outcome, dict[str, Any]]:
        job, state = self.job, self.slot.state
        try:
            self.plan = self.make_plan()
        except (KelpieError, ValueError) as exc:
            return self._fail(f"invalid storage settings: {exc}")
        if self.plan.private_checkpoints is not None:
            try:
                self.plan.private_checkpoints.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return self._fail(
                    f"cannot create {self.plan.private_checkpoints}: {exc}"
                )
        if self.plan.checkpoint_warning is not None:
            self._warn("%s", self.plan.checkpoint_warning)
            # Into the job's last_error now, not one heartbeat interval later.
            self._heartbeat_once(self.slot.client)
        for path in self.plan.wipe:
            try:
                _wipe(path)
            except OSError as exc:
                return self._fail(f"cannot prepare directory {path}: {exc}")

        # Downloads (cancellable).
        if self.plan.downloads:
            state.update(phase="downloading")
            finished, _, raised = self._run_cancellable(self._download_all)
            if not finished:
                return self._after_interrupt_before_start()
            if raised is not None:
                if isinstance(raised, StorageError | OSError):
                    return self._fail(f"inputs could not be downloaded: {raised}")
                raise raised
        for snap in self.plan.snapshots:
            snap.prime()
        self._snapshots_ready = True
        if self._interrupted():
            return self._after_interrupt_before_start()

        # The command.
        argv = [job.command, *job.arguments]
        self.logs = self._log_shipper()
        try:
            self.process = JobProcess(
                argv,
                self.environment(),
                label=job.id,
                stdout=self.worker.stdout,
                stderr=self.worker.stderr,
                on_line=None if self.logs is None else self.logs.add,
            )
            self.process.start()
        except SpawnError as exc:
            return self._fail(f"the command could not be started: {exc}")
        proc = self.process
        state.update(phase="running", pid=proc.pid)
        self._info("started process %s", proc.pid)

        def waiter() -> None:
            with contextlib.suppress(Exception):
                proc.wait()
            self.wake.set()

        threading.Thread(target=waiter, name=f"wait-{job.id}", daemon=True).start()
        while proc.poll() is None and not self._interrupted():
            self.wake.wait(1.0)
            self.wake.clear()

        if self._interrupted() and proc.poll() is None:
            stopped = proc.terminate(self.config.kill_grace_s)
            code = proc.wait() if stopped is None else stopped
        else:
            code = proc.wait()
        # One write for "exited, now uploading" (each write is an fsync).
        state.update(phase="uploading", pid=None)
        self._info("process exited: %s", describe_exit(code))
        if self.logs is not None:
            self.logs.stop()  # the last lines reach the server before the report

        if self.lost.is_set():
            return self._canceled()
        if proc.terminated_by_us:
            # Stopped on worker shutdown: keep what it saved, hand it back. (A
            # job that ended on its own meanwhile is reported as usual.)
            self._final_sync(required=False)
            return self._release(self._shutdown_reason())
        if code == RESCHEDULE_EXIT_CODE:
            self._final_sync(required=False)
            return self._release(
                f"the job exited with {RESCHEDULE_EXIT_CODE} (reschedule)"
            )
        if code != 0:
            self._final_sync(required=False)
            exit_code = 128 - code if code < 0 else code
            tail = proc.stderr_tail()
            message = f"the command failed with {describe_exit(code)}"
            if tail:
                message += f"; last lines of stderr:\n{tail}"
            return self._fail(message, exit_code=exit_code)

        # Exit 0: everything reaches storage, verified, before "completed";
        # meanwhile the node is the last one SaladCloud should remove.
        self._set_cost(DELETION_COST_FINAL_UPLOAD, final=True)
        problem = self._final_sync(required=True)
        if problem is None:
            problem = self._upload_outputs()
        if problem is _NOT_HELD or self.lost.is_set() or not self.confirm_lease():
            if self.lost.is_set():
                return self._canceled()
            # Only a shutdown stops confirm_lease() without losing the job.
            return self._release("the worker stopped before the outputs were stored")
        if problem is not None:
            return self._fail(f"outputs could not be uploaded: {problem}", exit_code=0)
        self._hb_stop.set()
        ok = _deliver(
            lambda: self.slot.client.report_completed(
                self.job.id, self.report(exit_code=0)
            ),
            what=f"completion report of job {job.id}",
            attempts=_REPORT_ATTEMPTS,
        )
        return (Outcome.COMPLETED if ok else Outcome.UNREPORTED), {"exit_code": 0}

    def _after_interrupt_before_start(self) -> tuple[Outcome, dict[str, Any]]:
        if self.lost.is_set():
            return self._canceled()
        return self._release(self._shutdown_reason())

    def _download_all(self) -> None:
        storage = self.worker.storage
        for bucket, prefix, local, pattern in self.plan.downloads:
            if self._interrupted():
                return
            result = storage.download_prefix(
                bucket, prefix, local, pattern=pattern, decompress=self.job.compression
            )
            self.worker.metrics.note_bytes("download", "input", result.bytes)
            self._info(
                "downloaded %d file(s), %d bytes from %s",
                result.files,
                result.bytes,
                storage.url(bucket, prefix),
            )
            if self.plan.inputs == (bucket, prefix) and result.files == 0:
                self._warn(
                    "the input prefix %s is empty; running the command without inputs",
                    storage.url(bucket, prefix),
                )

    def _upload_outputs(self) -> str | None:
        storage = self.worker.storage
        for local, bucket, prefix, pattern in self.plan.outputs:
            if not self.lease_valid() and not self.confirm_lease():
                return _NOT_HELD
            try:
                result = storage.upload_dir(
                    local,
                    bucket,
                    prefix,
                    pattern=pattern,
                    compress=self.job.compression,
                    verify=True,
                )
            except (StorageError, OSError) as exc:
                return str(exc)
            self.worker.metrics.note_bytes("upload", "output", result.bytes)
            self._info(
                "uploaded %d output file(s), %d bytes to %s",
                result.files,
                result.bytes,
                storage.url(bucket, prefix),
            )
        return None
