"""
Job storage for the worker: parallel, retried, verified transfers.

A *bucket* and *prefix*, as the wire protocol names them, map to a URL under a
storage root (``KELPIE_STORAGE_URL``, default ``s3://``)::

    s3://                      bucket b, prefix p/  ->  s3://b/p/
    file:///srv/kelpie         bucket b, prefix p/  ->  /srv/kelpie/b/p/
    memory://                  bucket b, prefix p/  ->  memory://b/p/

``s3://`` goes through boto3's transfer manager (multipart, ranged parallel
downloads), with the client and manager created once per :class:`Storage` and
shared by all threads. S3-compatible services (R2, MinIO, moto) are reached
through the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``). Every other protocol goes through
fsspec; local files (``file://``) are copied with the operating system's fast
path and renamed into place.

Every transfer of many files runs on a bounded thread pool. Each file is retried
with exponential backoff on transient errors (connection failures, timeouts,
5xx, throttling); permanent errors (no such bucket, rejected or missing
credentials) are not retried. Errors are never swallowed: when any file still
fails, the call raises a :class:`~kelpie_sdk.errors.StorageError` naming the
failing keys, after the files already in flight have finished.

This is the only module of kelpie_sdk that imports boto3, botocore or s3fs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import mimetypes
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import attrs

from kelpie_sdk.errors import (
    ConfigError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "DEFAULT_STORAGE_URL",
    "MULTIPART_CHUNKSIZE",
    "MULTIPART_THRESHOLD",
    "STORAGE_URL_ENV",
    "Storage",
    "TransferResult",
    "check_storage_url",
    "storage_url_is_durable",
]

#: The environment variable that names the storage root.
STORAGE_URL_ENV = "KELPIE_STORAGE_URL"
#: The storage root when neither the argument nor the variable gives one.
DEFAULT_STORAGE_URL = "s3://"
#: Protocols that live in the memory of one process: nothing outside it sees them.
_PROCESS_LOCAL = frozenset({"memory"})


#: Files at least this large are uploaded in parts and downloaded in ranges.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
#: The size of one part or range.
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
#: The fewest parallel requests that one large S3 transfer may use.
MIN_REQUEST_CONCURRENCY = 16

_T = TypeVar("_T")

# (key relative to the prefix, full key, size, ETag if known)
_Entries = list[tuple[str, str, int, str | None]]

_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
_GZIP_LEVEL = 6
# Up to this many uploaded files are verified with one HEAD (stat) each; more
# with one listing of the prefix after all of them went up.
_HEAD_VERIFY_MAX = 16
_COPY_BUFFER = 1024 * 1024
_MAX_NAMED_KEYS = 10

# S3 error codes that no retry can fix, by the error class they become.
_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidSecurity",
        "403",
        "401",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "BadDigest",
        "IncompleteBody",
        "500",
        "502",
        "503",
        "504",
    }
)


def _split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of a storage root; a bare absolute path is ``file``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return ("file", url) if url.startswith("/") else ("", url)
    return scheme.lower(), rest


def check_storage_url(url: str) -> None:
    """
    Check that a storage root names a protocol fsspec knows, without connecting.

    Args:
        url: The root, e.g. ``s3://``, ``file:///srv/kelpie`` or ``/srv/kelpie``.

    Raises:
        ConfigError: The URL has no protocol, or one that fsspec does not know.
    """
    from fsspec.registry import known_implementations, registry

    scheme, _ = _split_url(url)
    known = {"s3", "s3a", "file", "local"}
    known.update(known_implementations)
    known.update(registry)
    if not scheme:
        msg = f"storage URL {url!r} must look like s3://, file:///some/dir or memory://"
        raise ConfigError(msg)
    if scheme not in known:
        msg = (
            f"storage URL {url!r}: unknown protocol {scheme + '://'!r}; use s3://, "
            "file:///some/dir or another protocol that fsspec knows (gs://, az://...)"
        )
        raise ConfigError(msg)


def storage_url_is_durable(url: str) -> bool:
    """
    Whether a storage root can hold data that outlives one process and node.

    It must name a place (a directory, or a bucket: ``s3://`` alone names none)
    and not live in one process's memory (``memory://``). A ``file://`` root
    counts: a local cluster shares it, and elsewhere it is up to the operator
    to put it on a shared mount.
    """
    scheme, rest = _split_url(url)
    return bool(scheme) and scheme not in _PROCESS_LOCAL and bool(rest.strip("/"))


@attrs.frozen
class TransferResult:
    """
    What one transfer call moved.

    Attributes:
        files: The number of files moved.
        bytes: The bytes moved over the wire (compressed sizes when compressing).
        keys: For uploads, the object keys written (prefix included, ``.gz``
            included when compressing); for downloads, the local paths written,
            relative to the target directory, in POSIX form.
    """

    files: int
    bytes: int
    keys: tuple[str, ...]


class _Backend(Protocol):
    """
    The operations a storage protocol provides, on full (bucket, key) pairs.

    Backend methods raise the library's own exceptions; :class:`Storage`
    classifies and retries them.
    """

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int, str | None]]:
        """
        Return (key, size, etag) of every object under the prefix.
        """

    def upload(
        self,
        local: str,
        bucket: str,
        key: str,
        content_encoding: str | None,
        content_type: str | None,
    ) -> None:
        """
        Write one object from a local file, whole or not at all.
        """

    def download(
        self, bucket: str, key: str, local: str, size: int, etag: str | None
    ) -> None:
        """
        Write one object to a local file, whole or not at all.
        """

    def size(self, bucket: str, key: str) -> int:
        """
        Return the size of one object.
        """

    def delete(self, bucket: str, key: str) -> None:
        """
        Delete one object.
        """

    def classify(self, exc: BaseException, where: str) -> StorageError | None:
        """
        Return the permanent error for ``exc``, or None if it is transient.
        """

    def close(self) -> None:
        """
        Release clients and threads.
        """


class Storage:
    """
    Moves files between local directories and job storage.

    Thread-safe: one instance may serve several jobs at once.

    Args:
        root_url: The storage root; falls back to ``KELPIE_STORAGE_URL``, then
            ``s3://``.
        storage_options: For ``s3://``: ``key``, ``secret``, ``token``,
            ``endpoint_url``, ``region_name``, ``client_kwargs`` (passed to
            ``boto3.client``) and ``config_kwargs`` (passed to
            ``botocore.config.Config``). For other protocols: passed to fsspec.
        max_concurrency: The most files transferred at once.
        max_retries: How often one file is retried after a transient error.
        environ: Where to read ``KELPIE_STORAGE_URL`` and the AWS variables;
            defaults to ``os.environ``.
        sleep: Called with the backoff delay before each retry.

    Raises:
        ConfigError: The root URL is not usable.
    """

    def __init__(
        self,
        root_url: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_concurrency: int = 8,
        max_retries: int = 3,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        env = os.environ if environ is None else environ
        root = root_url or env.get(STORAGE_URL_ENV) or DEFAULT_STORAGE_URL
        if max_concurrency < 1:
            msg = f"max_concurrency must be at least 1, got {max_concurrency}"
            raise ConfigError(msg)
        if max_retries < 0:
            msg = f"max_retries must not be negative, got {max_retries}"
            raise ConfigError(msg)
        scheme, sep, rest = root.partition("://")
        if not sep:
            if root.startswith("/"):
                scheme, rest = "file", root
                root = "file://" + root
            else:
                msg = (
                    f"storage URL {root!r} (argument root_url or {STORAGE_URL_ENV})"
                    " must look like s3://, file:///some/dir or memory://"
                )
                raise ConfigError(msg)
        self.root_url = root
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self._sleep = sleep
        options = dict(storage_options or {})
        # The path part of the root: a directory (file://, memory://) or a
        # bucket plus key prefix that every "bucket" lives under (s3://b/root).
        self._root_path = rest.strip("/")
        self._local_root: Path | None = None
        self._backend: _Backend
        if scheme in ("s3", "s3a"):
            self._scheme = "s3"
            self._backend = _S3Backend(
                options,
                env,
                request_concurrency=max(max_concurrency, MIN_REQUEST_CONCURRENCY),
                file_concurrency=max_concurrency,
            )
        elif scheme in ("file", "local"):
            self._scheme = "file"
            self._local_root = Path("/" + rest.lstrip("/")) if rest else Path("/")
            self._backend = _LocalBackend(self._local_root)
        else:
            self._scheme = scheme
            self._backend = _FsspecBackend(scheme, self._root_path, options)

    # -- location ---------------------------------------------------------------

    def url(self, bucket: str, key_or_prefix: str = "") -> str:
        """
        Return the URL where a bucket's key or prefix lives.

        Args:
            bucket: The bucket, as the job names it.
            key_or_prefix: A key or prefix inside it.

        Returns:
            For example ``s3://b/p/`` or ``file:///some/root/b/p/``.
        """
        _check_bucket(bucket)
        parts = [p for p in (self._root_path, bucket) if p]
        if self._scheme == "file":
            return "file:///" + "/".join(parts) + "/" + key_or_prefix
        return f"{self._scheme}://" + "/".join(parts) + "/" + key_or_prefix

    def _loc(self, bucket: str, key: str) -> tuple[str, str]:
        """
        Map a job bucket and key onto the backend's own bucket and key.
        """
        _check_bucket(bucket)
        if self._scheme == "s3" and self._root_path:
            real_bucket, _, base = self._root_path.partition("/")
            base = f"{base}/" if base else ""
            return real_bucket, f"{base}{bucket}/{key}"
        return bucket, key

    # -- operations -------------------------------------------------------------

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        """
        List the objects under a prefix.

        A prefix that is not empty is treated as a directory: ``p`` and ``p/``
        both list ``p/...`` and never ``p2/...``. Directory markers (keys
        ending in ``/``) are left out.

        Args:
            bucket: The bucket.
            prefix: The prefix; ``""`` lists the whole bucket.

        Returns:
            (key relative to the prefix, size) pairs, sorted by key. Empty if
            nothing is stored under the prefix.

        Raises:
            StorageNotFoundError: The bucket does not exist.
            StoragePermissionError: The credentials were rejected or are missing.
            StorageError: Listing still failed after the retries.
        """
        return [(rel, size) for rel, _key, size, _etag in self._list(bucket, prefix)]

    def _list(self, bucket: str, prefix: str) -> _Entries:
        prefix = _normalize_prefix(prefix)
        real_bucket, real_prefix = self._loc(bucket, prefix)
        where = self.url(bucket, prefix)
        found = self._call(
            lambda: self._backend.list(real_bucket, real_prefix),
            where=where,
            what="listing",
        )
        out = []
        for key, size, etag in found:
            if not key.startswith(real_prefix) or key.endswith("/"):
                continue
            rel = key[len(real_prefix) :]
            out.append((rel, prefix + rel, size, etag))
        out.sort()
        return out

    def download_prefix(
        self,
        bucket: str,
        prefix: str,
        local_dir: str | os.PathLike[str],
        *,
        pattern: str | None = None,
        decompress: bool = False,
    ) -> TransferResult:
        """
        Download every object under a prefix into a local directory.

        Object ``prefix + rel`` becomes ``local_dir/rel``; parent directories
        are created and existing files are replaced. Each file appears whole or
        not at all (it is written under a temporary name and renamed).

        Args:
            bucket: The bucket.
            prefix: The prefix (see :meth:`list`).
            local_dir: The target directory; created if missing.
            pattern: A Python regular expression; only objects whose key
                *relative to the prefix* it matches (``re.search``) are moved.
            decompress: Gunzip objects whose key ends in ``.gz`` and drop the
                suffix from the local name; other objects are copied as they are.

        Returns:
            What was moved; ``files == 0`` when the prefix holds no (matching)
            objects, which is not an error here.

        Raises:
            StorageNotFoundError: The bucket does not exist.
            StoragePermissionError: The credentials were rejected or are missing.
            StorageError: A key would escape ``local_dir``, or files still
                failed after their retries; the message names them.
        """
        regex = _compile(pattern)
        target = Path(local_dir)
        entries = [
            e for e in self._list(bucket, prefix) if regex is None or regex.search(e[0])
        ]
        jobs: list[tuple[str, Callable[[], tuple[str, int]]]] = []
        for rel, key, size, etag in entries:
            local_rel = rel[:-3] if decompress and rel.endswith(".gz") else rel
            dest = _safe_join(target, local_rel, self.url(bucket, key))
            real_bucket, real_key = self._loc(bucket, key)
            jobs.append(
                (
                    key,
                    _bind_download(
                        self._backend,
                        real_bucket,
                        real_key,
                        dest,
                        size,
                        etag,
                        gunzip=decompress and rel.endswith(".gz"),
                        local_rel=local_rel,
                    ),
                )
            )
        target.mkdir(parents=True, exist_ok=True)
        return self._run_all(
            jobs,
            what="download",
            where=self.url(bucket, prefix),
            prefix=_normalize_prefix(prefix),
        )

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        bucket: str,
        prefix: str,
        *,
        pattern: str | None = None,
        compress: bool = False,
        verify: bool = True,
    ) -> TransferResult:
        """
        Upload every file below a local directory (recursively) to a prefix.

        File ``local_dir/rel`` becomes object ``prefix + rel``. Symbolic links
        to files are followed; hidden files are included.

        Args:
            local_dir: The directory; a missing directory uploads nothing.
            bucket: The bucket.
            prefix: The prefix (a ``/`` is added when missing).
            pattern: A Python regular expression searched in each file's path
                relative to ``local_dir`` (POSIX form).
            compress: See :meth:`upload_files`.
            verify: See :meth:`upload_files`.

        Returns:
            What was moved.

        Raises:
            StorageNotFoundError: The bucket does not exist.
            StoragePermissionError: The credentials were rejected or are missing.
            StorageError: Files still failed after their retries, or did not
                verify; the message names them.
        """
        regex = _compile(pattern)
        files = sorted(
            (
                (path, rel)
                for path, rel in _walk(Path(local_dir))
                if regex is None or regex.search(rel)
            ),
            key=lambda f: f[1],
        )
        return self.upload_files(
            files, bucket, prefix, compress=compress, verify=verify
        )

    def upload_files(
        self,
        files: Iterable[tuple[str | os.PathLike[str], str]],
        bucket: str,
        prefix: str,
        *,
        compress: bool = False,
        verify: bool = True,
    ) -> TransferResult:
        """
        Upload the given files, each to ``prefix + its relative key``.

        Each object is written whole or not at all: S3 makes a PUT or a
        completed multipart upload visible atomically, and local storage writes
        a temporary name in the same directory and renames it.

        Args:
            files: (local path, key relative to the prefix) pairs.
            bucket: The bucket.
            prefix: The prefix (a ``/`` is added when missing).
            compress: Gzip each file and append ``.gz`` to its key; on S3 the
                object gets ``Content-Encoding: gzip`` and the content type of
                the original name.
            verify: After each upload, check that the object exists with the
                size that was sent; a mismatch fails that file.

        Returns:
            What was moved.

        Raises:
            StorageNotFoundError: The bucket does not exist.
            StoragePermissionError: The credentials were rejected or are missing.
            StorageError: Files still failed after their retries, or did not
                verify; the message names them.
        """
        prefix = _normalize_prefix(prefix)
        jobs: list[tuple[str, Callable[[], tuple[str, int]]]] = []

        def content_type(rel: str) -> str | None:
            # Only S3 stores a content type; guessing costs a little per file.
            return mimetypes.guess_type(rel)[0] if self._scheme == "s3" else None

        files = list(files)
        many = len(files)
        for local, rel in files:
            if not rel or rel.startswith("/"):
                msg = f"key {rel!r} for {os.fspath(local)!r} must be relative"
                raise StorageError(msg)
            key = prefix + rel + (".gz" if compress else "")
            real_bucket, real_key = self._loc(bucket, key)
            jobs.append(
                (
                    key,
                    _bind_upload(
                        self._backend,
                        os.fspath(local),
                        real_bucket,
                        real_key,
                        compress=compress,
                        # Many files are checked with one listing afterwards.
                        verify=verify and many <= _HEAD_VERIFY_MAX,
                        key=key,
                        content_type=content_type(rel),
                    ),
                )
            )
        where = self.url(bucket, prefix)
        if not verify or len(jobs) <= _HEAD_VERIFY_MAX:
            return self._run_all(jobs, what="upload", where=where, prefix=prefix)

        def check(sent: dict[str, int]) -> dict[str, BaseException]:
            stored = {
                key: size for _rel, key, size, _etag in self._list(bucket, prefix)
            }
            bad: dict[str, BaseException] = {}
            for key, size in sent.items():
                if key not in stored:
                    msg = f"verification failed for {key}: not found after upload"
                    bad[key] = StorageError(msg)
                elif stored[key] != size:
                    msg = (
                        f"verification failed for {key}: stored {stored[key]} bytes,"
                        f" sent {size}"
                    )
                    bad[key] = StorageError(msg)
            return bad

        return self._run_all(
            jobs, what="upload", where=where, prefix=prefix, check=check
        )

    def delete(self, bucket: str, key: str) -> None:
        """
        Delete one object; deleting a missing object is not an error.

        Raises:
            StorageNotFoundError: The bucket does not exist.
            StoragePermissionError: The credentials were rejected or are missing.
            StorageError: The delete still failed after its retries.
        """
        real_bucket, real_key = self._loc(bucket, key)
        self._call(
            lambda: self._backend.delete(real_bucket, real_key),
            where=self.url(bucket, key),
            what="delete",
        )

    def close(self) -> None:
        """
        Release the clients and their threads; the instance is unusable after.
        """
        self._backend.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Storage({self.root_url!r})"

    # -- retries and fan-out ----------------------------------------------------

    def _call(self, fn: Callable[[], _T], *, where: str, what: str) -> _T:
        """
        Run one backend call with retries; raise a StorageError when it fails.
        """
        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                permanent = self._backend.classify(exc, where)
                if permanent is not None:
                    raise permanent from exc
                if attempt >= self.max_retries:
                    msg = (
                        f"{what} of {where} failed after {attempt + 1} attempts:"
                        f" {_describe(exc)}"
                    )
                    raise StorageError(msg) from exc
                self._sleep(_backoff(attempt))
                attempt += 1

    def _run_all(
        self,
        jobs: Sequence[tuple[str, Callable[[], tuple[str, int]]]],
        *,
        what: str,
        where: str,
        prefix: str,
        check: Callable[[dict[str, int]], dict[str, BaseException]] | None = None,
    ) -> TransferResult:
        """
        Run file transfers on the pool; raise one error naming every failure.

        ``check``, if given, gets {name: size} of the files that went through and
        returns {name: error} for those that fail a check made afterwards.
        """
        if not jobs:
            return TransferResult(files=0, bytes=0, keys=())
        stop = threading.Event()

        def run(fn: Callable[[], tuple[str, int]]) -> tuple[str, int]:
            if stop.is_set():
                raise _Skipped
            try:
                return self._call(fn, where=where, what=what)
            except (StorageNotFoundError, StoragePermissionError):
                # Every other file would fail the same way: start no more.
                stop.set()
                raise

        results: dict[int, tuple[str, int]] = {}
        failures: list[tuple[str, BaseException]] = []
        skipped = 0
        workers = min(self.max_concurrency, len(jobs))
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="kelpie-storage"
        ) as pool:
            futures = {
                pool.submit(run, fn): (i, name) for i, (name, fn) in enumerate(jobs)
            }
            for future in concurrent.futures.as_completed(futures):
                i, name = futures[future]
                try:
                    results[i] = future.result()
                except _Skipped:
                    skipped += 1
                except Exception as exc:  # noqa: BLE001 - collected, raised below
                    failures.append((name, exc))
        if check is not None and results:
            bad = check(dict(results.values()))
            failures.extend(bad.items())
            results = {i: r for i, r in results.items() if r[0] not in bad}
        if failures:
            failures = [
                (n[len(prefix) :] if n.startswith(prefix) else n, e)
                for n, e in failures
            ]
            raise _combine(failures, skipped, len(jobs), what, where)
        ordered = [results[i] for i in range(len(jobs))]
        return TransferResult(
            files=len(ordered),
            bytes=sum(size for _, size in ordered),
            keys=tuple(name for name, _ in ordered),
        )


class _Skipped(Exception):
    """
    A file that was not attempted because an earlier one failed for good.
    """


def _combine(
    failures: list[tuple[str, BaseException]],
    skipped: int,
    total: int,
    what: str,
    where: str,
) -> StorageError:
    """
    One error for a batch: the failed keys, each distinct reason once, and the
    most specific error class that fits every failure.
    """
    failures.sort(key=lambda f: f[0])
    names = ", ".join(name for name, _ in failures[:_MAX_NAMED_KEYS])
    if len(failures) > _MAX_NAMED_KEYS:
        names += f" and {len(failures) - _MAX_NAMED_KEYS} more"
    reasons = list(dict.fromkeys(_describe(exc) for _, exc in failures))
    msg = f"{len(failures)} of {total} files failed to {what} ({where}): {names}"
    if skipped:
        msg += f"; {skipped} more not attempted"
    msg += ". " + " | ".join(reasons[:3])
    cls: type[StorageError] = StorageError
    for candidate in (StoragePermissionError, StorageNotFoundError):
        if all(isinstance(exc, candidate) for _, exc in failures):
            cls = candidate
            break
    error = cls(msg)
    first = failures[0][1]
    error.__cause__ = first.__cause__ or first
    return error


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _backoff(attempt: int) -> float:
    """
    0.5 s * 2**attempt, capped at 8 s, minus up to 25 % jitter.
    """
    delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0**attempt)
    return delay * (1 - 0.25 * random.random())


def _check_bucket(bucket: str) -> None:
    if not bucket or "/" in bucket or bucket in (".", ".."):
        msg = f"invalid bucket name {bucket!r}"
        raise StorageError(msg)


def _normalize_prefix(prefix: str) -> str:
    """
    ``p`` -> ``p/``; ``/p/`` -> ``p/``; ``""`` stays ``""`` (the whole bucket).
    """
    prefix = prefix.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        msg = f"invalid pattern {pattern!r}: {exc}"
        raise StorageError(msg) from exc


def _safe_join(target: Path, rel: str, where: str) -> Path:
    """
    Refuse keys such as ``../x`` that would land outside the target directory.
    """
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts:
        msg = f"object {where} would be written outside {target}; refusing"
        raise StorageError(msg)
    return target.joinpath(*parts)


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """
    Every file below ``root`` (links followed), sorted, with its POSIX path.
    """
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file():
                yield path, path.relative_to(root).as_posix()


def _bind_upload(
    backend: _Backend,
    local: str,
    bucket: str,
    real_key: str,
    *,
    compress: bool,
    verify: bool,
    key: str,
    content_type: str | None,
) -> Callable[[], tuple[str, int]]:
    def upload() -> tuple[str, int]:
        if not os.path.isfile(local):
            # Not retried: the local side will not get better by waiting.
            msg = f"cannot read {local}: not a file"
            raise StorageError(msg)
        with _maybe_gzip(local, compress) as source:
            size = os.path.getsize(source)
            backend.upload(
                source, bucket, real_key, "gzip" if compress else None, content_type
            )
            if verify:
                try:
                    actual = backend.size(bucket, real_key)
                except Exception as exc:
                    if not isinstance(backend.classify(exc, key), StorageNotFoundError):
                        raise
                    msg = f"verification failed for {key}: not found after upload"
                    raise _VerifyError(msg) from exc
                if actual != size:
                    msg = (
                        f"verification failed for {key}: stored {actual} bytes,"
                        f" sent {size}"
                    )
                    raise _VerifyError(msg)
        return key, size

    return upload


class _VerifyError(Exception):
    """
    The object that was written does not have the size that was sent.
    """


def _bind_download(
    backend: _Backend,
    bucket: str,
    key: str,
    dest: Path,
    size: int,
    etag: str | None,
    *,
    gunzip: bool,
    local_rel: str,
) -> Callable[[], tuple[str, int]]:
    def download() -> tuple[str, int]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not gunzip:
            backend.download(bucket, key, os.fspath(dest), size, etag)
            return local_rel, size
        packed = _temp_name(dest.with_name(dest.name + ".gz"))
        try:
            backend.download(bucket, key, os.fspath(packed), size, etag)
            with (
                _replacing(dest) as plain,
                open(plain, "xb") as out,
                gzip.open(packed, "rb") as src,
            ):
                shutil.copyfileobj(src, out, _COPY_BUFFER)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(packed)
        return local_rel, size

    return download


@contextlib.contextmanager
def _maybe_gzip(local: str, compress: bool) -> Iterator[str]:
    """
    Yield the file to send: ``local`` itself, or a gzipped temporary copy.
    """
    if not compress:
        yield local
        return
    fd, packed = tempfile.mkstemp(prefix="kelpie-", suffix=".gz")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL, mtime=0
            ) as out,
            open(local, "rb") as src,
        ):
            shutil.copyfileobj(src, out, _COPY_BUFFER)
        yield packed
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(packed)


# -- S3 through boto3 ----------------------------------------------------------


class _S3Backend:
    """
    S3 (and S3-compatible services) through one boto3 client and transfer manager.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        env: Mapping[str, str],
        *,
        request_concurrency: int,
        file_concurrency: int,
    ) -> None:
        known = {
            "key",
            "secret",
            "token",
            "endpoint_url",
            "region_name",
            "client_kwargs",
            "config_kwargs",
        }
        unknown = set(options) - known
        if unknown:
            msg = f"unknown storage_options for s3://: {sorted(unknown)}"
            raise ConfigError(msg)
        self.options = dict(options)
        self.env = dict(env)
        self.request_concurrency = request_concurrency
        self.file_concurrency = file_concurrency
        self.lock = threading.Lock()
        self._client: Any = None
        self._manager: Any = None

    @property
    def client(self) -> Any:
        """
        The boto3 S3 client, created on first use (creation may query IMDS).
        """
        if self._client is None:
            self._create()
        return self._client

    @property
    def manager(self) -> Any:
        """
        The transfer manager that all threads share.
        """
        if self._manager is None:
            self._create()
        return self._manager

    def _create(self) -> None:
        import boto3.session
        import botocore.config
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        options, env = self.options, self.env
        with self.lock:
            if self._manager is not None:
                return
            session = boto3.session.Session(
                aws_access_key_id=options.get("key") or env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=options.get("secret")
                or env.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=options.get("token") or env.get("AWS_SESSION_TOKEN"),
                region_name=options.get("region_name")
                or env.get("AWS_REGION")
                or env.get("AWS_DEFAULT_REGION"),
                profile_name=env.get("AWS_PROFILE") or None,
            )
            config_kwargs: dict[str, Any] = {
                # Small objects go from Storage's own threads, large ones from
                # the transfer manager's: room for both at once.
                "max_pool_connections": self.request_concurrency
                + self.file_concurrency,
                "connect_timeout": 10,
                "read_timeout": 60,
                "retries": {"mode": "standard"},
            }
            config_kwargs.update(options.get("config_kwargs") or {})
            client_kwargs: dict[str, Any] = {
                "endpoint_url": options.get("endpoint_url")
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL")
                or None,
                "config": botocore.config.Config(**config_kwargs),
            }
            client_kwargs.update(options.get("client_kwargs") or {})
            client = session.client("s3", **client_kwargs)
            self._manager = create_transfer_manager(
                client,
                TransferConfig(
                    multipart_threshold=MULTIPART_THRESHOLD,
                    multipart_chunksize=MULTIPART_CHUNKSIZE,
                    max_concurrency=self.request_concurrency,
                    use_threads=True,
                ),
            )
            self._client = client

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int, str | None]]:
        out: list[tuple[str, int, str | None]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(
                (obj["Key"], obj["Size"], obj.get("ETag"))
                for obj in page.get("Contents", [])
            )
        return out

    def upload(
        self,
        local: str,
        bucket: str,
        key: str,
        content_encoding: str | None,
        content_type: str | None,
    ) -> None:
        extra: dict[str, str] = {}
        if content_encoding:
            extra["ContentEncoding"] = content_encoding
        if content_type:
            extra["ContentType"] = content_type
        if os.path.getsize(local) < MULTIPART_THRESHOLD:
            # One PUT straight from this thread: the transfer manager's own
            # threads and futures only add latency for a single request.
            with open(local, "rb") as body:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
            return
        self.manager.upload(local, bucket, key, extra_args=extra or None).result()

    def download(
        self, bucket: str, key: str, local: str, size: int, etag: str | None
    ) -> None:
        if size < MULTIPART_THRESHOLD:
            # One GET from this thread, into a temporary name, then renamed.
            # botocore checks the length (and checksum, when the object has
            # one) of what it reads.
            extra = {"IfMatch": etag} if etag else {}
            with _replacing(Path(local)) as tmp:
                body = self.client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
                with body, open(tmp, "wb") as out:
                    shutil.copyfileobj(body, out, _COPY_BUFFER)
            return
        # Sizes and ETags come from the listing, which spares a HEAD per object.
        # The manager writes to a temporary name beside ``local`` and renames it.
        self.manager.download(
            bucket, key, local, subscribers=[cast(Any, _KnownObject(size, etag))]
        ).result()

    def size(self, bucket: str, key: str) -> int:
        return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def classify(self, exc: BaseException, where: str) -> StorageError | None:
        import botocore.exceptions as bex

        if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
            return StoragePermissionError(
                f"no storage credentials for {where}: set AWS_ACCESS_KEY_ID and"
                f" AWS_SECRET_ACCESS_KEY (or a profile) ({exc})"
            )
        if isinstance(exc, bex.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _PERMISSION_CODES:
                return StoragePermissionError(
                    f"storage credentials were rejected for {where}: {code}"
                    f" {error.get('Message', '')}".rstrip()
                )
            if code == "PreconditionFailed":
                return StorageError(f"{where} changed while it was downloaded: {exc}")
            if code == "NoSuchBucket":
                return StorageNotFoundError(f"no such bucket for {where}: {exc}")
            if code in _NOT_FOUND_CODES:
                return StorageNotFoundError(f"no such object {where}: {exc}")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return None
            return StorageError(f"storage refused {where}: {exc}")
        if isinstance(exc, bex.ProfileNotFound):
            return StoragePermissionError(f"no storage credentials for {where}: {exc}")
        if isinstance(
            exc,
            bex.ParamValidationError | bex.InvalidRegionError | bex.NoRegionError,
        ):
            return StorageError(f"invalid request for {where}: {exc}")
        return None

    def close(self) -> None:
        with self.lock:
            if self._manager is not None:
                self._manager.shutdown()
                self._client.close()
            self._manager = self._client = None


class _KnownObject:
    """
    A transfer subscriber that tells the manager an object's size and ETag.
    """

    def __init__(self, size: int, etag: str | None) -> None:
        self.size = size
        self.etag = etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)
        if self.etag:
            future.meta.provide_object_etag(self.etag)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        return

    def on_done(self, future: Any, **kwargs: Any) -> None:
        return


# -- local files ---------------------------------------------------------------


class _LocalBackend:
    """
    A directory tree: bucket ``b`` is the directory ``root/b``.

    Writes go to a temporary name in the target directory, then ``os.replace``.
    Uploads create the bucket directory if needed; reads of a missing bucket
    directory are a not-found error.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, bucket: str, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if ".." in parts:
            msg = f"key {key!r} would leave the bucket"
            raise StorageError(msg)
        return self.root.joinpath(bucket, *parts)

    def _bucket(self, bucket: str) -> Path:
        path = self.root / bucket
        if not path.is_dir():
            msg = f"no such bucket directory {path}"
            raise FileNotFoundError(msg)
        return path

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int, str | None]]:
        base = self._bucket(bucket)
        # Walk the deepest directory that the prefix names, then filter.
        start = self._path(bucket, prefix.rpartition("/")[0]) if "/" in prefix else base
        out: list[tuple[str, int, str | None]] = []
        if not start.is_dir():
            return out
        for path, rel in _walk(start):
            key = (start.relative_to(base) / rel).as_posix()
            if key.startswith(prefix) and not path.name.startswith(".kelpie-"):
                out.append((key, path.stat().st_size, None))
        return out

    def upload(
        self,
        local: str,
        bucket: str,
        key: str,
        content_encoding: str | None,
        content_type: str | None,
    ) -> None:
        _atomic_copy(local, self._path(bucket, key))

    def download(
        self, bucket: str, key: str, local: str, size: int, etag: str | None
    ) -> None:
        self._bucket(bucket)
        _atomic_copy(os.fspath(self._path(bucket, key)), Path(local))

    def size(self, bucket: str, key: str) -> int:
        return self._path(bucket, key).stat().st_size

    def delete(self, bucket: str, key: str) -> None:
        self._bucket(bucket)
        with contextlib.suppress(FileNotFoundError):
            self._path(bucket, key).unlink()

    def classify(self, exc: BaseException, where: str) -> StorageError | None:
        if isinstance(exc, PermissionError):
            return StoragePermissionError(f"permission denied for {where}: {exc}")
        if isinstance(exc, FileNotFoundError):
            return StorageNotFoundError(f"not found: {where}: {exc}")
        if isinstance(exc, IsADirectoryError | NotADirectoryError):
            return StorageError(f"path conflict at {where}: {exc}")
        return None

    def close(self) -> None:
        return


def _temp_name(dest: Path) -> Path:
    """
    A fresh temporary name beside ``dest``, not created yet.

    Not ``mkstemp``: opening an existing empty file for writing truncates it,
    and ext4 (``auto_da_alloc``) then flushes the data on close, which halves
    the speed of large local copies.
    """
    return dest.with_name(f".kelpie-{dest.name}.{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """
    Yield a temporary path; rename it onto ``dest`` if the block succeeds.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_copy(source: str, dest: Path) -> None:
    """
    Copy a file to ``dest`` through a temporary name in the same directory.
    """
    with _replacing(dest) as tmp:
        shutil.copyfile(source, tmp)


# -- any other fsspec protocol ------------------------------------------------


class _FsspecBackend:
    """
    Any fsspec filesystem (``memory://``, ``gs://``, ``az://``...): bucket ``b``
    is the path ``<root>/b``.
    """

    def __init__(self, scheme: str, root: str, options: Mapping[str, Any]) -> None:
        import fsspec

        try:
            self.fs = fsspec.filesystem(scheme, **options)
        except (ImportError, ValueError) as exc:
            msg = f"storage protocol {scheme!r} is not available: {exc}"
            raise ConfigError(msg) from exc
        self.root = root
        self.lock = threading.Lock()

    def _path(self, bucket: str, key: str = "") -> str:
        return "/".join(p for p in (self.root, bucket, key) if p)

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int, str | None]]:
        base = self._path(bucket)
        if not self.fs.exists(base):
            msg = f"no such bucket {base}"
            raise FileNotFoundError(msg)
        start = self._path(bucket, prefix.rpartition("/")[0])
        out: list[tuple[str, int, str | None]] = []
        strip = self.fs._strip_protocol(base).rstrip("/") + "/"
        for path, info in self.fs.find(start, detail=True).items():
            if info.get("type") == "directory":
                continue
            rel = self.fs._strip_protocol(path)
            key = rel[len(strip) :] if rel.startswith(strip) else rel
            if key.startswith(prefix):
                out.append((key, int(info.get("size") or 0), None))
        return out

    def upload(
        self,
        local: str,
        bucket: str,
        key: str,
        content_encoding: str | None,
        content_type: str | None,
    ) -> None:
        self.fs.put_file(local, self._path(bucket, key))

    def download(
        self, bucket: str, key: str, local: str, size: int, etag: str | None
    ) -> None:
        with _replacing(Path(local)) as tmp:
            self.fs.get_file(self._path(bucket, key), os.fspath(tmp))

    def size(self, bucket: str, key: str) -> int:
        return int(self.fs.info(self._path(bucket, key))["size"])

    def delete(self, bucket: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(bucket, key))

    def classify(self, exc: BaseException, where: str) -> StorageError | None:
        if isinstance(exc, PermissionError):
            return StoragePermissionError(f"permission denied for {where}: {exc}")
        if isinstance(exc, FileNotFoundError):
            return StorageNotFoundError(f"not found: {where}: {exc}")
        return None

    def close(self) -> None:
        return
