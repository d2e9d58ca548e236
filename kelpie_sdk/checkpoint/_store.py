"""
The storage layer: content-addressed chunks and step manifests on any fsspec store.

Layout under the root::

    chunks/ab/<sha256>                   immutable chunk bodies, named by their hash
    steps/000000001234/manifest.json     one per committed step, written last
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from kelpie_sdk.errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStorageError,
)

DEFAULT_URL_ENV = "KELPIE_CHECKPOINT_URL"
DEFAULT_LOCAL_DIR = "checkpoints"

_T = TypeVar("_T")
_R = TypeVar("_R")

_CREATE_LOCK = threading.Lock()

_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _describe(exc: BaseException) -> str:
    for link in _chain(exc):
        if type(link).__name__ in _CREDENTIAL_ERRORS:
            return f"missing credentials ({type(link).__name__}: {link})"
    if isinstance(exc, PermissionError):
        return f"access denied: missing or invalid credentials? ({exc})"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def storage_errors(what: str, *, missing_ok: bool = False) -> Iterator[None]:
    """
    Turn backend exceptions into CheckpointError subclasses, keeping the cause.

    Args:
        what: What was being done, for the message.
        missing_ok: Map FileNotFoundError to CheckpointNotFoundError (reads) rather
            than to CheckpointStorageError (writes: a missing bucket is a setup error).
    """
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        if missing_ok:
            raise CheckpointNotFoundError(f"{what}: not found ({exc})") from exc
        raise CheckpointStorageError(f"{what} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise CheckpointStorageError(f"{what} failed: {_describe(exc)}") from exc


def default_url() -> str:
    """
    Return the default location: ``KELPIE_CHECKPOINT_URL``, else ``./checkpoints``.
    """
    return os.environ.get(DEFAULT_URL_ENV) or os.path.abspath(DEFAULT_LOCAL_DIR)


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    """
    Apply ``fn`` to every item on up to ``threads`` threads; re-raise the first error.

    Plain threads rather than concurrent.futures: executors refuse new work once the
    interpreter starts shutting down, and a save may still be finishing then.
    """
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    position = iter(range(len(items)))

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                index = next(position, None)
            if index is None:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                with lock:
                    errors.append(exc)
                return

    workers = [
        threading.Thread(target=work, name="kelpie-checkpoint-io", daemon=True)
        for _ in range(min(threads, len(items)))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


class Store:
    """
    Chunks and manifests under one root of one fsspec filesystem.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        fs: Any = None,
        fsync: bool = True,
    ) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url
        if fs is None:
            try:
                fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            except (ValueError, ImportError) as exc:
                raise CheckpointStorageError(
                    f"no fsspec implementation for checkpoint URL {url!r}: {exc}"
                ) from exc
            except Exception as exc:
                raise CheckpointStorageError(
                    f"cannot open checkpoint URL {url!r}: {_describe(exc)}"
                ) from exc
        else:
            root = fs._strip_protocol(url)
        self.fs = fs
        self.local = isinstance(fs, LocalFileSystem)
        self.root = str(root).rstrip("/") or "/"
        self.fsync = fsync
        self._dirs_lock = threading.Lock()
        self._dirty_dirs: set[str] = set()
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.protocols = tuple(str(p) for p in protocols)

    # ----------------------------------------------------------------- paths

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def chunk_path(self, digest: str) -> str:
        """
        Return the path of a chunk.
        """
        return self._join("chunks", digest[:2], digest)

    def manifest_path(self, step: int) -> str:
        """
        Return the path of a step's manifest.
        """
        return self._join("steps", f"{step:012d}", "manifest.json")

    # ---------------------------------------------------------------- writes

    def _local_write(
        self,
        path: str,
        data: bytes | memoryview,
        exclusive: bool,
        sync_dir: bool = True,
    ) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "xb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        try:
            if exclusive:
                try:
                    # link() is atomic and fails when the name exists: an exclusive,
                    # all-or-nothing create.
                    os.link(tmp, path)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                        raise
                    # No hard links here: O_EXCL still stops a second writer,
                    # but a crash can leave a partial file (which fails verification).
                    with open(path, "xb") as f:
                        f.write(data)
            else:
                os.replace(tmp, path)
                tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)
        if self.fsync:
            if sync_dir:
                _fsync_dir(directory)
            else:
                with self._dirs_lock:
                    self._dirty_dirs.add(directory)

    def sync(self) -> None:
        """
        Make the chunk renames durable (fsync their directories) before a commit.
        """
        with self._dirs_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        with storage_errors("syncing chunk directories"):
            for directory in sorted(dirs):
                _fsync_dir(directory)

    def put_chunk(self, digest: str, data: bytes | memoryview) -> None:
        """
        Write a chunk (overwriting is harmless: the name is the content's hash).
        """
        path = self.chunk_path(digest)
        with storage_errors(f"writing chunk {path}"):
            if self.local:
                self._local_write(path, data, exclusive=False, sync_dir=False)
            else:
                self.fs.pipe_file(path, bytes(data))

    def create_manifest(self, step: int, data: bytes) -> None:
        """
        Commit a step: create its manifest only if no manifest exists for that step.

        Raises:
            CheckpointConflictError: A manifest for the step already exists.
        """
        path = self.manifest_path(step)
        try:
            with storage_errors(f"committing step {step} to {path}"):
                if self.local:
                    self._local_write(path, data, exclusive=True)
                else:
                    # s3fs sends If-None-Match: * for mode="create"; memory and other
                    # backends open the file with "xb", which checks then writes: the
                    # lock makes that exclusive at least between threads of a process.
                    with _CREATE_LOCK:
                        self.fs.pipe_file(path, data, mode="create")
        except CheckpointStorageError as exc:
            if _is_exists_error(exc.__cause__):
                raise CheckpointConflictError(
                    f"step {step} is already committed at {path} by another writer"
                ) from exc.__cause__
            raise

    # ----------------------------------------------------------------- reads

    def get(self, path: str) -> bytes:
        """
        Read a whole object.
        """
        with storage_errors(f"reading {path}", missing_ok=True):
            return bytes(self.fs.cat_file(path))

    def size(self, path: str) -> int | None:
        """
        Return an object's size, or None when it does not exist.
        """
        with storage_errors(f"checking {path}"):
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            return int(info["size"])

    def list_steps(self) -> list[int]:
        """
        Return the steps that have a directory under ``steps/``, ascending.
        """
        base = self._join("steps")
        with storage_errors(f"listing {base}"):
            # Other processes write here too: drop every cached listing.
            self.fs.invalidate_cache()
            try:
                names = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
        steps = []
        for name in names:
            tail = posixpath.basename(str(name).rstrip("/"))
            if tail.isdigit():
                steps.append(int(tail))
        return sorted(steps)

    def list_chunks(self) -> set[str]:
        """
        Return the digests of every chunk in the store.
        """
        base = self._join("chunks")
        with storage_errors(f"listing {base}"):
            self.fs.invalidate_cache()
            try:
                paths = self.fs.find(base)
            except FileNotFoundError:
                return set()
        out = set()
        for path in paths:
            name = posixpath.basename(str(path))
            if len(name) == 64 and ".tmp-" not in name:
                out.add(name)
        return out

    def remove_stale_temporaries(self, max_age: float) -> int:
        """
        Delete temporary files left by killed local writers, once older than max_age.

        Only local stores write temporaries (object stores put whole objects).

        Returns:
            How many were deleted.
        """
        if not self.local:
            return 0
        removed = 0
        cutoff = time.time() - max_age
        for sub in ("chunks", "steps"):
            for dirpath, _, filenames in os.walk(self._join(sub)):
                for name in filenames:
                    if ".tmp-" not in name:
                        continue
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
        return removed

    # --------------------------------------------------------------- deletes

    def delete_step(self, step: int) -> None:
        """
        Remove a step's manifest (and its directory).
        """
        path = self.manifest_path(step)
        with storage_errors(f"deleting {path}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            if self.local:
                with contextlib.suppress(OSError):
                    os.rmdir(posixpath.dirname(path))

    def delete_chunks(self, digests: Iterable[str], threads: int) -> None:
        """
        Remove chunks.
        """

        def rm(digest: str) -> None:
            path = self.chunk_path(digest)
            with (
                storage_errors(f"deleting {path}"),
                contextlib.suppress(FileNotFoundError),
            ):
                self.fs.rm_file(path)

        parallel_map(rm, sorted(digests), threads)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_exists_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    for link in _chain(exc):
        if isinstance(link, FileExistsError):
            return True
        if "PreconditionFailed" in f"{type(link).__name__} {link}":
            return True
    return False
