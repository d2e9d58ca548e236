"""
The Checkpointer: explicit, atomic, incremental, asynchronous checkpoints.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import posixpath
import stat
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any

import attrs

from kelpie_sdk.checkpoint import _codecs, _manifest, _progress, _signals
from kelpie_sdk.checkpoint._signals import preempted
from kelpie_sdk.checkpoint._store import Store, default_url, parallel_map
from kelpie_sdk.errors import (
    CheckpointCodecError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStorageError,
)

log = logging.getLogger("kelpie_sdk.checkpoint")

DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
DEFAULT_EVERY_SECONDS = 300.0
# Set by the worker for the job's process: the Checkpointer then handles SIGTERM.
JOB_ID_ENV = "KELPIE_JOB_ID"
# A local temporary file this old belongs to a writer that was killed.
STALE_TEMPORARY_SECONDS = 3600.0

_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _flush_at_exit() -> None:
    for ckpt in list(_live):
        try:
            ckpt.wait()
        except CheckpointError:
            log.exception("a checkpoint save failed while the interpreter was exiting")


def _register_atexit() -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_flush_at_exit)
            _atexit_registered = True


@attrs.frozen
class SaveStats:
    """
    What the last completed save did.

    Attributes:
        step: The step committed.
        bytes_total: Bytes in the snapshot.
        bytes_uploaded: Bytes of chunks written (chunks already stored are skipped).
        chunks_total: Chunks in the snapshot.
        chunks_uploaded: Chunks written.
        seconds: Time from the start of the background work to the commit.
    """

    step: int
    bytes_total: int
    bytes_uploaded: int
    chunks_total: int
    chunks_uploaded: int
    seconds: float


class Checkpointer:
    """
    Save and load numbered checkpoints under one fsspec URL.

    ``save()`` copies the state in memory and returns; one background thread hashes,
    uploads and commits it. At most one save is in flight. A step is committed by
    creating its manifest, last and exclusively, so readers only ever see whole steps.

    A Checkpointer is meant for one thread (the training loop); the background work
    is its own.

    Args:
        url: Any fsspec URL or local path. Default: ``KELPIE_CHECKPOINT_URL``, else
            ``./checkpoints`` (read when the Checkpointer is created).
        keep_last: Keep only the newest N committed steps (None: keep all).
        keep_every: Also keep every step that is a multiple of K.
        every_steps: `should_save(step)` is True when ``step % every_steps == 0``.
        every_seconds: `should_save()` is True when this long has passed since the last
            save (or since the Checkpointer was created). When neither policy is
            given, every 300 seconds.
        preemption: Install a SIGTERM handler (main thread only) so that SIGTERM
            makes `should_save()` True; the next save is then made blocking and,
            once it is committed, the process ends as SIGTERM would have ended it.
            A Python handler installed before is still called. None (the default):
            only in a job run by ``kelpie worker`` (``KELPIE_JOB_ID`` is set).
        chunk_size: Bytes per chunk; smaller means finer incremental saves.
        storage_options: Passed to fsspec (credentials, endpoint...).
        fs: An fsspec filesystem to use instead of building one from the URL.
        io_threads: Concurrent chunk uploads and downloads.
        fsync: On local disks, fsync chunks and manifests (survives power loss).

    Raises:
        CheckpointStorageError: No fsspec implementation for the URL.
        ValueError: An invalid argument.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        storage_options: dict[str, Any] | None = None,
        fs: Any = None,
        io_threads: int = 8,
        fsync: bool = True,
        preemption: bool | None = None,
    ) -> None:
        for name, value in (
            ("keep_last", keep_last),
            ("keep_every", keep_every),
            ("every_steps", every_steps),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if chunk_size < 1024:
            raise ValueError(f"chunk_size must be at least 1024, got {chunk_size}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be positive, got {every_seconds}")
        self.url = url or default_url()
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.every_steps = every_steps
        if every_steps is None and every_seconds is None:
            every_seconds = DEFAULT_EVERY_SECONDS
        self.every_seconds = every_seconds
        self.chunk_size = chunk_size
        self.io_threads = max(1, io_threads)
        self._store = Store(
            self.url, storage_options=storage_options, fs=fs, fsync=fsync
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._known: set[str] | None = None
        self._manifests: dict[int, dict[str, Any]] = {}
        self._last_step: int | None = None
        self._last_save_time = time.monotonic()
        self._closed = False
        self.last_stats: SaveStats | None = None
        self.loaded_step: int | None = None
        _live.add(self)
        _register_atexit()
        if preemption is None:
            preemption = bool(os.environ.get(JOB_ID_ENV))
        if preemption:
            _signals.install_deferring_handler()

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r})"

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- policy

    def should_save(self, step: int) -> bool:
        """
        Return whether the policy says to save at ``step``.

        True when a preemption signal arrived (see `install_preemption_handler` and
        the ``preemption`` argument), when ``step`` is a multiple of
        ``every_steps``, or when ``every_seconds`` have passed since the last save.
        Always False for a step at or below one already saved, loaded or found by
        `latest_step()`, since that step cannot be committed twice.
        """
        if self._last_step is not None and step <= self._last_step:
            return False
        if preempted():
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return (
            self.every_seconds is not None
            and time.monotonic() - self._last_save_time >= self.every_seconds
        )

    def _note_step(self, step: int) -> None:
        if self._last_step is None or step > self._last_step:
            self._last_step = step

    # ------------------------------------------------------------------ save

    def save(
        self,
        state: Any,
        *,
        step: int,
        codec: str | None = None,
        blocking: bool = False,
    ) -> None:
        """
        Snapshot ``state`` and commit it as ``step`` in the background.

        Waits first for the previous save, if any, to finish (backpressure), and
        raises its error if it failed. The state may be changed as soon as this
        returns.

        Args:
            state: bytes, a JSON-able value, numpy arrays or torch tensors (nested in
                dicts, lists and tuples, e.g. ``{"model": m.state_dict(),
                "optimizer": opt.state_dict()}``), or anything picklable.
            step: The step number (an int >= 0); each step is committed once.
            codec: ``"raw"``, ``"json"``, ``"pickle"`` or ``"arrays"``; chosen from
                the type of ``state`` when None.
            blocking: Wait until the step is committed. Always, after a SIGTERM
                whose default action the Checkpointer deferred: the process then
                ends by that signal once the step is committed.

        Raises:
            CheckpointCodecError: The state cannot be encoded.
            CheckpointConflictError: (from a previous or this blocking save) the step
                was already committed.
            CheckpointStorageError: The storage failed.
        """
        self._begin(step)
        snap = _codecs.snapshot(state, codec)
        self._start(snap, step, blocking)

    def finish(self, state: Any, *, step: int, codec: str | None = None) -> None:
        """
        Save the final state unless ``step`` is saved already, then close.

        Call it after the loop, with the total number of steps: a run shorter than
        the save interval still leaves its result, and a run that was already
        finished (``latest_step()`` returned ``step``) saves nothing.

        Raises:
            The errors of `save` and `close`.
        """
        try:
            if self._last_step is None or step > self._last_step:
                self.save(state, step=step, codec=codec, blocking=True)
        finally:
            self.close()

    def save_dir(
        self, path: str | os.PathLike[str], *, step: int, blocking: bool = False
    ) -> None:
        """
        Snapshot every file under a local directory and commit it as ``step``.

        The files are read into memory before this returns; each file is chunked
        separately, so unchanged files are not uploaded again.

        Raises:
            CheckpointNotFoundError: ``path`` is not a directory.
        """
        self._begin(step)
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise CheckpointNotFoundError(f"save_dir: {root!r} is not a directory")
        entries: list[_codecs.Entry] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            if not filenames and not dirnames and rel_dir != ".":
                entries.append(
                    _codecs.Entry(rel_dir.replace(os.sep, "/"), b"", {"dir": True})
                )
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                with open(full, "rb") as f:
                    data = f.read()
                mode = stat.S_IMODE(os.stat(full).st_mode)
                entries.append(_codecs.Entry(rel, data, {"mode": mode}))
        self._start(_codecs.Snapshot("files", entries, kind="dir"), step, blocking)

    def _begin(self, step: int) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.wait()

    def _start(self, snap: _codecs.Snapshot, step: int, blocking: bool) -> None:
        job = {
            "job_id": os.environ.get("KELPIE_JOB_ID"),
            "attempt": os.environ.get("KELPIE_ATTEMPT"),
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        self._note_step(step)
        self._last_save_time = time.monotonic()
        thread = threading.Thread(
            target=self._run,
            args=(snap, step, job),
            name=f"kelpie-checkpoint-save-{step}",
            # Not a daemon: the interpreter finishes a save in flight before exiting.
            daemon=False,
        )
        self._thread = thread
        thread.start()
        deferred = preempted() and _signals.termination_pending()
        if blocking or deferred:
            self.wait()
        if deferred:
            # The preemption save is committed: finish the others, then end the
            # process as the deferred SIGTERM would have.
            _flush_at_exit()
            _signals.terminate()

    def wait(self) -> None:
        """
        Wait for the save in flight, and raise its error if it failed.

        Raises:
            CheckpointError: The background save failed (the error is raised once).
        """
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """
        Flush the save in flight and stop accepting saves.

        Raises:
            CheckpointError: The last save failed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            _live.discard(self)

    def _run(self, snap: _codecs.Snapshot, step: int, job: dict[str, Any]) -> None:
        try:
            self._write(snap, step, job)
        except CheckpointError as exc:
            self._error = exc
        except BaseException as exc:  # noqa: BLE001 - stored, raised by wait()
            err = CheckpointError(
                f"saving step {step} failed: {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._error = err
            return
        try:
            self._retain(step)
        except CheckpointError as exc:
            err = type(exc)(f"step {step} was committed, but retention failed: {exc}")
            err.__cause__ = exc.__cause__ or exc
            self._error = err

    def _known_chunks(self) -> set[str]:
        if self._known is None:
            # One listing instead of one existence check per chunk.
            self._known = self._store.list_chunks()
        return self._known

    def _write(self, snap: _codecs.Snapshot, step: int, job: dict[str, Any]) -> None:
        started = time.perf_counter()
        known = self._known_chunks()
        size = self.chunk_size
        pending: dict[str, memoryview] = {}
        entries = []
        total = 0
        chunk_count = 0
        for entry in snap.entries:
            view = memoryview(entry.data).cast("B")
            pieces = [view[i : i + size] for i in range(0, len(view), size)]
            digests = parallel_map(
                lambda piece: hashlib.sha256(piece).hexdigest(),
                pieces,
                self.io_threads if len(view) > 4 * size else 1,
            )
            chunks = []
            for digest, piece in zip(digests, pieces, strict=True):
                chunks.append([digest, len(piece)])
                if digest not in known:
                    pending.setdefault(digest, piece)
            total += len(view)
            chunk_count += len(pieces)
            entries.append(
                {
                    "name": entry.name,
                    "size": len(view),
                    "chunks": chunks,
                    "meta": entry.meta,
                }
            )
        todo = sorted(pending.items())
        parallel_map(lambda item: self._store.put_chunk(*item), todo, self.io_threads)
        with self._lock:
            known.update(pending)
        body = {
            "format": _manifest.FORMAT_VERSION,
            "step": step,
            "kind": snap.kind,
            "codec": snap.codec,
            "chunk_size": size,
            "size": total,
            "entries": entries,
            **job,
        }
        self._store.sync()
        self._store.create_manifest(step, _manifest.encode(body))
        with self._lock:
            self._manifests[step] = body
        try:
            _progress.note_checkpoint(step)
        except CheckpointError as exc:  # only the history's lost compute suffers
            log.warning("could not record the checkpoint in the progress file: %s", exc)
        self.last_stats = SaveStats(
            step=step,
            bytes_total=total,
            bytes_uploaded=sum(len(p) for p in pending.values()),
            chunks_total=chunk_count,
            chunks_uploaded=len(pending),
            seconds=time.perf_counter() - started,
        )

    # ------------------------------------------------------------- retention

    def _retain(self, committed: int) -> None:
        if self.keep_last is None and self.keep_every is None:
            return
        steps = self._store.list_steps()
        valid: list[int] = []
        docs: dict[int, dict[str, Any]] = {}
        for step in steps:
            try:
                docs[step] = self._manifest(step)
                valid.append(step)
            except (CheckpointCorruptError, CheckpointNotFoundError):
                continue
        keep = set(valid)
        if self.keep_last is not None:
            keep = set(valid[-self.keep_last :])
            if self.keep_every is not None:
                keep |= {s for s in valid if s % self.keep_every == 0}
        keep.add(committed)
        # Manifests first: once a step's manifest is gone nobody can load it, so its
        # chunks may go; the reverse order could leave a manifest without its data.
        doomed = [s for s in steps if s not in keep and s <= committed]
        for step in doomed:
            self._store.delete_step(step)
            with self._lock:
                self._manifests.pop(step, None)
        if not doomed:
            # Nothing became unreferenced; orphans of crashed saves wait for the
            # next deletion, which saves a full chunk listing per save.
            return
        needed: set[str] = set()
        for step in self._store.list_steps():
            if step in docs:
                needed |= _manifest.chunk_digests(docs[step])
            else:
                # A step we could not read (or a new one from another writer): to be
                # safe, delete no chunks this time.
                try:
                    needed |= _manifest.chunk_digests(self._manifest(step))
                except CheckpointError:
                    log.warning(
                        "retention: step %s unreadable; no chunks deleted", step
                    )
                    return
        self._store.remove_stale_temporaries(STALE_TEMPORARY_SECONDS)
        garbage = self._store.list_chunks() - needed
        self._store.delete_chunks(garbage, self.io_threads)
        with self._lock:
            if self._known is not None:
                self._known -= garbage

    # ------------------------------------------------------------------ read

    def _manifest(self, step: int) -> dict[str, Any]:
        with self._lock:
            cached = self._manifests.get(step)
        if cached is not None:
            return cached
        path = self._store.manifest_path(step)
        doc = _manifest.decode(self._store.get(path), step, path)
        with self._lock:
            self._manifests[step] = doc
        return doc

    def steps(self) -> list[int]:
        """
        Return the committed steps whose manifest verifies, ascending.

        Raises:
            CheckpointFormatError: A manifest is from a newer format version.
            CheckpointStorageError: The storage failed.
        """
        out = []
        for step in self._store.list_steps():
            try:
                self._manifest(step)
            except (CheckpointCorruptError, CheckpointNotFoundError):
                continue
            out.append(step)
        return out

    def _complete(self, step: int) -> bool:
        try:
            doc = self._manifest(step)
        except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
            log.warning("skipping step %s: %s", step, exc)
            return False
        chunks: dict[str, int] = {}
        for entry in doc["entries"]:
            chunks.update((d, s) for d, s in entry["chunks"])
        items = sorted(chunks.items())
        sizes = parallel_map(
            lambda item: self._store.size(self._store.chunk_path(item[0])),
            items,
            self.io_threads,
        )
        for (digest, expected), actual in zip(items, sizes, strict=True):
            if expected != actual:
                log.warning(
                    "skipping step %s: chunk %s is %s",
                    step,
                    digest,
                    "missing" if actual is None else f"{actual} bytes, not {expected}",
                )
                return False
        return True

    def latest_step(self) -> int | None:
        """
        Return the newest step that is completely committed, or None.

        Newest first, a step counts when its manifest verifies and every chunk it
        names exists with the right size; a partial or corrupt step is skipped (with a
        warning in the ``kelpie_sdk.checkpoint`` log) in favour of the previous one.

        Raises:
            CheckpointFormatError: A manifest is from a newer format version.
            CheckpointStorageError: The storage failed.
        """
        for step in reversed(self._store.list_steps()):
            if self._complete(step):
                self._note_step(step)
                return step
        return None

    def _fetch(
        self, doc: dict[str, Any], step: int
    ) -> list[tuple[dict[str, Any], bytearray]]:
        out = []
        for entry in doc["entries"]:
            buf = bytearray(entry["size"])
            offsets = []
            pos = 0
            for digest, size in entry["chunks"]:
                offsets.append((digest, size, pos))
                pos += size
            if pos != entry["size"]:
                raise CheckpointCorruptError(
                    f"step {step}: entry {entry['name']!r} chunk sizes do not add up"
                )

            def get(item: tuple[str, int, int], buf: bytearray = buf) -> None:
                digest, size, offset = item
                try:
                    data = self._store.get(self._store.chunk_path(digest))
                except CheckpointNotFoundError as exc:
                    raise CheckpointCorruptError(
                        f"step {step}: chunk {digest} is missing"
                    ) from exc
                if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                    raise CheckpointCorruptError(
                        f"step {step}: chunk {digest} does not match its hash"
                    )
                buf[offset : offset + size] = data

            parallel_map(get, offsets, self.io_threads)
            out.append((dict(entry.get("meta", {})), buf))
        return out

    def _candidates(self, step: int | None) -> list[int]:
        if step is not None:
            return [step]
        candidates = list(reversed(self._store.list_steps()))
        if not candidates:
            raise CheckpointNotFoundError(f"no checkpoint under {self.url}")
        return candidates

    def _load_doc(
        self, step: int | None, kind: str
    ) -> tuple[int, dict[str, Any], list[tuple[dict[str, Any], bytearray]]]:
        self.wait()
        last_error: CheckpointError | None = None
        for candidate in self._candidates(step):
            try:
                doc = self._manifest(candidate)
                if doc.get("kind", "state") != kind:
                    hint = "restore_dir()" if kind == "state" else "load()"
                    raise CheckpointCodecError(
                        f"step {candidate} holds a {doc.get('kind')}; use {hint}"
                    )
                return candidate, doc, self._fetch(doc, candidate)
            except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
                if step is not None:
                    if isinstance(exc, CheckpointNotFoundError):
                        raise CheckpointNotFoundError(
                            f"step {step} is not committed under {self.url}"
                        ) from exc.__cause__
                    raise
                log.warning(
                    "step %s cannot be loaded, trying older: %s", candidate, exc
                )
                last_error = exc
        raise CheckpointNotFoundError(
            f"no loadable checkpoint under {self.url}: {last_error}"
        ) from last_error

    def load(self, step: int | None = None, *, map_location: Any = None) -> Any:
        """
        Load a committed step (by default the newest loadable one).

        Every chunk is checked against its hash: wrong data is never returned. With
        ``step=None`` a step that fails the check is skipped for the previous one;
        `loaded_step` tells which step was loaded.

        Args:
            step: The step to load, or None for the newest.
            map_location: Where to put torch tensors: None for the device they were
                saved from, a device (``"cpu"``), a dict from saved device to device,
                or a callable taking the saved device name.

        Raises:
            CheckpointNotFoundError: No such step, or no checkpoint at all.
            CheckpointCorruptError: The requested step's data does not match.
            CheckpointFormatError: The manifest is from a newer format version.
            CheckpointCodecError: The state cannot be decoded here.
        """
        loaded, doc, buffers = self._load_doc(step, "state")
        state = _codecs.decode(doc["codec"], buffers, map_location)
        self.loaded_step = loaded
        self._note_step(loaded)
        return state

    def restore_dir(self, path: str | os.PathLike[str], step: int | None = None) -> int:
        """
        Write the files of a step saved with `save_dir()` into a local directory.

        Files are written atomically one by one; other files in ``path`` are left
        alone.

        Returns:
            The step restored.
        """
        loaded, doc, buffers = self._load_doc(step, "dir")
        root = os.fspath(path)
        for entry, (meta, data) in zip(doc["entries"], buffers, strict=True):
            rel = posixpath.normpath(entry["name"])
            if rel.startswith(("../", "/")) or rel == "..":
                raise CheckpointCorruptError(f"step {loaded}: unsafe path {rel!r}")
            target = os.path.join(root, *rel.split("/"))
            try:
                if meta.get("dir"):
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fd, tmp = tempfile.mkstemp(
                    dir=os.path.dirname(target), prefix=".restore-"
                )
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, int(meta.get("mode", 0o644)))
                os.replace(tmp, target)
            except OSError as exc:
                raise CheckpointStorageError(f"cannot write {target}: {exc}") from exc
        self.loaded_step = loaded
        self._note_step(loaded)
        return loaded
