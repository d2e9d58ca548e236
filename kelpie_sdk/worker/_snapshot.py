"""
Snapshots of a local directory to storage: the changed files, on demand.

This replaces the original's file watcher. There is no watcher here: the
worker calls :meth:`DirSnapshot.sync` on each heartbeat tick and once after the
job exits. A file is "changed" when its ``(size, mtime_ns)`` differs from the
version last uploaded (or downloaded). On a tick, files modified within the
last ``settle_s`` seconds are left for the next tick, since they may still be
being written, but never twice in a row (a file rewritten all the time still
goes up every other tick); the final sync uploads everything. A file that
changes while it is being uploaded is uploaded again next time, so the latest
version always reaches storage in the end (the original could drop it, W-8).
Files deleted locally are deleted remotely, as the original's ``unlink``
handling did.
Names starting with ``.`` (at any depth) are skipped: jobs write temporary
files that way before renaming them into place.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from kelpie_sdk.storage import Storage

__all__ = ["DirSnapshot", "Signature", "SyncResult", "scan_dir"]

logger = logging.getLogger(__name__)

Signature = tuple[int, int]
#: "Storage holds some version of this file, maybe not the latest."
_STALE: Signature = (-1, -1)
#: Coarser than any file system's mtime granularity (Linux: one jiffy, <= 10 ms).
_MTIME_SLACK_S = 0.05


@attrs.frozen
class SyncResult:
    """
    What one sync moved.

    Attributes:
        uploaded: Files uploaded.
        deleted: Remote objects deleted.
        deferred: Files left for later because they were still being written.
        bytes: Bytes uploaded (compressed sizes when compressing).
    """

    uploaded: int = 0
    deleted: int = 0
    deferred: int = 0
    bytes: int = 0


def scan_dir(root: Path) -> Iterator[tuple[Path, str, os.stat_result]]:
    """
    Every regular file below ``root`` (symlinks to files followed), skipping
    names that start with ``.``.

    Yields:
        (path, path relative to ``root`` in POSIX form, stat result).
    """
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue  # vanished meanwhile
            if not os.path.isfile(path):
                continue
            yield path, path.relative_to(root).as_posix(), st


class DirSnapshot:
    """
    Keeps one local directory mirrored to a bucket prefix.

    Args:
        local_dir: The directory.
        bucket: The bucket.
        prefix: The prefix; file ``rel`` goes to ``prefix + rel``.
        pattern: Only relative paths this regular expression finds (``re.search``)
            are mirrored.
        compress: Upload gzipped with a ``.gz`` suffix (as the job's
            ``compression`` flag says); deletions use the same key.
        settle_s: On a non-final sync, files modified more recently than this
            are deferred.
        clock: Wall-clock time, comparable with file mtimes (for tests).
    """

    def __init__(
        self,
        local_dir: Path,
        bucket: str,
        prefix: str,
        *,
        pattern: str | None = None,
        compress: bool = False,
        settle_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local_dir = local_dir
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.pattern = re.compile(pattern) if pattern else None
        self.compress = compress
        self.settle_s = settle_s
        self._clock = clock
        self._known: dict[str, Signature] = {}
        self._deferred: set[str] = set()
        self._lock = threading.Lock()

    def _wanted(self, rel: str) -> bool:
        return self.pattern is None or self.pattern.search(rel) is not None

    def _current(self) -> dict[str, tuple[Path, Signature, float]]:
        return {
            rel: (path, (st.st_size, st.st_mtime_ns), st.st_mtime)
            for path, rel, st in scan_dir(self.local_dir)
            if self._wanted(rel)
        }

    def prime(self) -> int:
        """
        Take the directory's present files as already in storage (they were
        just downloaded from there).

        Returns:
            How many files were recorded.
        """
        with self._lock:
            self._known = {rel: sig for rel, (_, sig, _) in self._current().items()}
            return len(self._known)

    def pending(self) -> list[str]:
        """
        The relative paths that a final sync would upload right now.
        """
        with self._lock:
            return sorted(
                rel
                for rel, (_, sig, _) in self._current().items()
                if self._known.get(rel) != sig
            )

    def key(self, rel: str) -> str:
        """
        The object key of a relative path.
        """
        return self.prefix + rel + (".gz" if self.compress else "")

    def sync(self, storage: Storage, *, final: bool = False) -> SyncResult:
        """
        Upload the changed files and delete the remote copies of removed ones.

        Only one sync runs at a time; a second caller waits for the first, so a
        final sync also waits for a tick's upload in flight.

        Args:
            storage: Where to upload.
            final: Upload files even if they were modified just now.

        Returns:
            What was done.

        Raises:
            StorageError: An upload or delete failed after its retries; files
                that were uploaded before the failure stay recorded.
        """
        with self._lock:
            now = self._clock()
            current = self._current()
            upload: list[tuple[str, Path, Signature]] = []
            deferred: set[str] = set()
            for rel, (path, sig, mtime) in current.items():
                if self._known.get(rel) == sig:
                    continue
                fresh = now - mtime < self.settle_s
                if not final and fresh and rel not in self._deferred:
                    deferred.add(rel)
                    continue
                upload.append((rel, path, sig))
            # A file is deferred at most once in a row, so one that is rewritten
            # all the time still goes up on every other tick.
            self._deferred = deferred
            removed = sorted(set(self._known) - set(current))
            sent = 0
            if upload:
                sent = storage.upload_files(
                    [(path, rel) for rel, path, _ in upload],
                    self.bucket,
                    self.prefix,
                    compress=self.compress,
                    verify=True,
                ).bytes
                for rel, path, sig in upload:
                    try:
                        st = path.stat()
                    except OSError:
                        self._known[rel] = _STALE
                        continue
                    now_sig: Signature = (st.st_size, st.st_mtime_ns)
                    # If it changed while uploading, the next sync sends it
                    # again; _STALE still says that storage holds a copy. The
                    # same goes for a file modified within the file system's
                    # timestamp granularity: a same-size rewrite in that window
                    # would keep its (size, mtime_ns), so it is sent once more.
                    recent = self._clock() - st.st_mtime < _MTIME_SLACK_S
                    self._known[rel] = sig if now_sig == sig and not recent else _STALE
            for rel in removed:
                storage.delete(self.bucket, self.key(rel))
                del self._known[rel]
            if upload or removed:
                logger.debug(
                    "synced %s -> %s/%s: %d uploaded, %d deleted, %d deferred",
                    self.local_dir,
                    self.bucket,
                    self.prefix,
                    len(upload),
                    len(removed),
                    len(deferred),
                )
            return SyncResult(
                uploaded=len(upload),
                deleted=len(removed),
                deferred=len(deferred),
                bytes=sent,
            )
