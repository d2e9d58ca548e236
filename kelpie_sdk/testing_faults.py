"""
A fault-injecting local file system for fsspec, used by ``kelpie chaos``.

``chaos:///some/dir`` is a directory on the local disk, like ``file://``, seen
through an fsspec filesystem that misbehaves on purpose. Every process that
should see it calls :func:`register` first (the chaos harness does so in its
workers and jobs). Its behaviour comes from the environment, so that a worker
and the jobs it starts share it:

==============================  ==================================================
``KELPIE_CHAOS_DIR``            the control directory (arms, hits, fault log);
                                without it the filesystem injects nothing
``KELPIE_CHAOS_FAIL_RATE``      the fraction of data requests (reads and writes
                                of whole files) that fail with a ConnectionError
``KELPIE_CHAOS_STALL_RATE``     the fraction of data requests that stall first
``KELPIE_CHAOS_STALL_S``        how long a stall lasts (default 0.5 s)
``KELPIE_CHAOS_HOLD_S``         how long a write waits at an armed kill point
                                (default 5 s)
==============================  ==================================================

**Kill points.** The harness *arms* a point by creating ``arm-save`` or
``arm-upload`` in the control directory. The next checkpoint write
(``pipe_file``, as :mod:`kelpie_sdk.checkpoint` writes chunks and manifests) or
the next output upload (``put_file`` into an ``out/`` prefix, as the worker
uploads a job's outputs) claims the arm with an atomic rename, writes a *hit*
file ``hit-<kind>-<pid>.json`` naming the machine (``SALAD_MACHINE_ID``) and
the path, and then waits ``KELPIE_CHAOS_HOLD_S`` seconds before writing, so
that the harness can kill the machine in the middle of the save or upload.

Writes are atomic (a temporary name, then a rename or an exclusive link), as on
an object store: a killed writer leaves no partial object behind.

Only the standard library and fsspec are imported here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import threading
import time
import uuid
from typing import Any

from fsspec.spec import AbstractFileSystem

__all__ = [
    "PROTOCOL",
    "FaultFileSystem",
    "FaultSettings",
    "append_json_line",
    "register",
]

#: The URL scheme this filesystem serves.
PROTOCOL = "chaos"

_ENV_DIR = "KELPIE_CHAOS_DIR"
_FAULT_LOG = "storage-faults.jsonl"
_lock = threading.Lock()


def register() -> None:
    """
    Make ``chaos://`` URLs open a :class:`FaultFileSystem` in this process.
    """
    import fsspec

    fsspec.register_implementation(PROTOCOL, FaultFileSystem, clobber=True)


def append_json_line(path: str, record: dict[str, Any]) -> None:
    """
    Append ``record`` as one JSON line, in one ``write`` on an ``O_APPEND``
    file, so that lines from several processes do not interleave.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _rate(name: str, default: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


class FaultSettings:
    """
    The fault settings of this process, read once from the environment.

    Attributes:
        control: The control directory, or None for no faults at all.
        fail_rate: The fraction of data requests that fail.
        stall_rate: The fraction of data requests that stall first.
        stall_s: How long a stall lasts.
        hold_s: How long a write waits at an armed kill point.
    """

    def __init__(self) -> None:
        control = os.environ.get(_ENV_DIR, "").strip()
        self.control: str | None = control or None
        self.fail_rate = _rate("KELPIE_CHAOS_FAIL_RATE")
        self.stall_rate = _rate("KELPIE_CHAOS_STALL_RATE")
        self.stall_s = _rate("KELPIE_CHAOS_STALL_S", 0.5)
        self.hold_s = _rate("KELPIE_CHAOS_HOLD_S", 5.0)
        self.machine = os.environ.get("SALAD_MACHINE_ID", "")
        self.random = random.Random()  # seeded from os.urandom: per process

    def _log(self, kind: str, op: str, path: str) -> None:
        if self.control is None:
            return
        append_json_line(
            os.path.join(self.control, _FAULT_LOG),
            {"kind": kind, "op": op, "path": path, "machine": self.machine},
        )

    def request(self, op: str, path: str) -> None:
        """
        Maybe stall, maybe fail one data request.

        Raises:
            ConnectionError: This request was chosen to fail.
        """
        if self.control is None:
            return
        with _lock:
            stall = self.random.random() < self.stall_rate
            fail = self.random.random() < self.fail_rate
        if stall:
            self._log("stall", op, path)
            time.sleep(self.stall_s)
        if fail:
            self._log("fail", op, path)
            raise ConnectionError(f"chaos: injected failure of {op} {path}")

    def kill_point(self, kind: str, path: str) -> None:
        """
        If ``kind`` is armed, claim the arm, announce the hit and hold.
        """
        if self.control is None:
            return
        arm = os.path.join(self.control, f"arm-{kind}")
        claimed = os.path.join(
            self.control, f".claim-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        try:
            os.rename(arm, claimed)
        except FileNotFoundError:
            return
        hit = os.path.join(self.control, f"hit-{kind}-{os.getpid()}.json")
        with open(claimed, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "kind": kind,
                    "machine": self.machine,
                    "pid": os.getpid(),
                    "path": path,
                },
                handle,
            )
        os.replace(claimed, hit)
        time.sleep(self.hold_s)


_settings: FaultSettings | None = None


def _faults() -> FaultSettings:
    global _settings  # one per process, read lazily
    if _settings is None:
        _settings = FaultSettings()
    return _settings


def _write_atomic(path: str, write: Any, exclusive: bool) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        write(tmp)
        if exclusive:
            os.link(tmp, path)  # fails with EEXIST: an exclusive create
        else:
            os.replace(tmp, path)
            tmp = ""
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class FaultFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """
    A local directory tree behind fsspec that fails, stalls and holds on
    purpose (see the module docstring). Paths are absolute local paths.
    """

    protocol = PROTOCOL
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path)
        if text.startswith(f"{PROTOCOL}://"):
            text = text[len(PROTOCOL) + 3 :]
        text = "/" + text.lstrip("/")
        return text.rstrip("/") or "/"

    # -- metadata: never faulty ------------------------------------------------

    def _entry(self, path: str) -> dict[str, Any]:
        st = os.stat(path)
        is_dir = os.path.isdir(path)
        return {
            "name": path,
            "size": 0 if is_dir else st.st_size,
            "type": "directory" if is_dir else "file",
            "mtime": st.st_mtime,
        }

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        return self._entry(self._strip_protocol(path))

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        if not os.path.isdir(path):
            entry = self._entry(path)
            return [entry] if detail else [entry["name"]]
        out = []
        for name in sorted(os.listdir(path)):
            if name.startswith(".") and ".tmp-" in name:
                continue  # a write in flight
            full = os.path.join(path, name)
            with contextlib.suppress(FileNotFoundError):
                out.append(self._entry(full) if detail else full)
        return out

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        os.makedirs(self._strip_protocol(path), exist_ok=True)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        os.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rm_file(self, path: Any) -> None:
        os.unlink(self._strip_protocol(path))

    def _rm(self, path: Any) -> None:
        path = self._strip_protocol(path)
        if os.path.isdir(path):
            os.rmdir(path)
        else:
            os.unlink(path)

    def rmdir(self, path: Any) -> None:
        os.rmdir(self._strip_protocol(path))

    # -- data: may fail, stall or hold -----------------------------------------

    def cat_file(
        self, path: Any, start: int | None = None, end: int | None = None, **kw: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        _faults().request("read", path)
        with open(path, "rb") as handle:
            if start:
                handle.seek(start if start >= 0 else os.path.getsize(path) + start)
            data = handle.read() if end is None else handle.read(end - (start or 0))
        return data

    def pipe_file(
        self, path: Any, value: bytes, mode: str = "overwrite", **kwargs: Any
    ) -> None:
        path = self._strip_protocol(path)
        faults = _faults()
        faults.kill_point("save", path)
        faults.request("write", path)

        def write(tmp: str) -> None:
            with open(tmp, "xb") as handle:
                handle.write(value)

        try:
            _write_atomic(path, write, exclusive=mode == "create")
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "already exists", path) from exc
            raise

    def put_file(self, lpath: Any, rpath: Any, **kwargs: Any) -> None:
        path = self._strip_protocol(rpath)
        faults = _faults()
        if "/out/" in path:
            faults.kill_point("upload", path)
        faults.request("write", path)
        _write_atomic(path, lambda tmp: shutil.copyfile(lpath, tmp), exclusive=False)

    def get_file(self, rpath: Any, lpath: Any, **kwargs: Any) -> None:
        path = self._strip_protocol(rpath)
        _faults().request("read", path)
        shutil.copyfile(path, lpath)

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            return open(path, mode)  # the caller closes it
        raise NotImplementedError("chaos:// writes whole files (pipe_file, put_file)")
