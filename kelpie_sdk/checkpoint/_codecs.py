"""
Codecs: turn a state into named byte buffers plus JSON metadata, and back.

A snapshot is taken in the caller's thread (one in-memory copy, so the caller may
change the state as soon as ``save()`` returns); hashing and uploading happen later.
numpy and torch are imported only when the state holds their objects.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
from typing import Any

import attrs

from kelpie_sdk.errors import CheckpointCodecError

CODECS = ("raw", "json", "pickle", "arrays")

SKELETON = "__skeleton__"


@attrs.define
class Entry:
    """
    One named buffer of a snapshot.

    Attributes:
        name: A readable name, unique within the snapshot.
        data: The bytes (anything exposing the buffer protocol, C-contiguous).
        meta: JSON-able facts needed to decode it (dtype, shape, device...).
    """

    name: str
    data: Any
    meta: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Snapshot:
    """
    A state captured in memory, ready to be chunked and uploaded.
    """

    codec: str
    entries: list[Entry]
    kind: str = "state"


class _Ref:
    """
    Stands for the array or tensor number ``index`` inside a pickled skeleton.

    Stored checkpoints pickle this by its import path: keep its name and module.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[type[_Ref], tuple[int]]:
        return (_Ref, (self.index,))


def _np() -> Any:
    return sys.modules.get("numpy")


def _torch() -> Any:
    return sys.modules.get("torch")


def _is_ndarray(obj: object) -> bool:
    np = _np()
    return np is not None and isinstance(obj, np.ndarray)


def _is_tensor(obj: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _raw_ndarray(arr: Any) -> bool:
    return not arr.dtype.hasobject and arr.dtype.fields is None


def _raw_tensor(t: Any) -> bool:
    torch = _torch()
    return bool(t.layout == torch.strided and not t.is_quantized and not t.is_meta)


def _has_arrays(obj: object, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if _is_ndarray(obj) or _is_tensor(obj):
        return True
    if isinstance(obj, dict):
        return any(_has_arrays(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_arrays(v, depth + 1) for v in obj)
    return False


def choose_codec(state: object) -> str:
    """
    Pick a codec from the state's type.

    bytes-like -> ``raw``; arrays or tensors (alone or nested in dicts, lists and
    tuples) -> ``arrays``; JSON that round-trips unchanged -> ``json``; else ``pickle``.
    """
    if isinstance(state, bytes | bytearray | memoryview):
        return "raw"
    if _has_arrays(state):
        return "arrays"
    try:
        if json.loads(json.dumps(state, allow_nan=False)) == state:
            return "json"
    except (TypeError, ValueError, RecursionError):
        pass
    return "pickle"


def _pickle(obj: object, what: str) -> bytes:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise CheckpointCodecError(
            f"cannot pickle the {what}: {type(exc).__name__}: {exc}"
        ) from exc


def snapshot(state: object, codec: str | None = None) -> Snapshot:
    """
    Capture ``state`` in memory with the given codec (or one chosen by type).

    Raises:
        CheckpointCodecError: Unknown codec, or the state does not fit it.
    """
    name = codec or choose_codec(state)
    if name == "raw":
        if not isinstance(state, bytes | bytearray | memoryview):
            raise CheckpointCodecError(
                f"codec 'raw' needs bytes, not {type(state).__name__}"
            )
        return Snapshot("raw", [Entry("data", bytes(state))])
    if name == "json":
        try:
            data = json.dumps(state, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointCodecError(f"state is not JSON-able: {exc}") from exc
        return Snapshot("json", [Entry("data", data)])
    if name == "pickle":
        return Snapshot("pickle", [Entry("data", _pickle(state, "state"))])
    if name == "arrays":
        return _snapshot_arrays(state)
    raise CheckpointCodecError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")


def _snapshot_arrays(state: object) -> Snapshot:
    entries: list[Entry] = []

    def leaf(obj: Any, path: str) -> Any:
        if _is_ndarray(obj) and _raw_ndarray(obj):
            np = _np()
            arr = np.array(obj, copy=True, order="C")
            entries.append(
                Entry(
                    path or "array",
                    arr.reshape(-1).view(np.uint8),
                    {"type": "numpy", "dtype": arr.dtype.str, "shape": list(arr.shape)},
                )
            )
            return _Ref(len(entries) - 1)
        if _is_tensor(obj) and _raw_tensor(obj):
            torch = _torch()
            device = str(obj.device)
            t = obj.detach().to(
                device="cpu", memory_format=torch.contiguous_format, copy=True
            )
            try:
                buf = t.reshape(-1).view(torch.uint8).numpy()
            except (RuntimeError, TypeError) as exc:  # pragma: no cover
                raise CheckpointCodecError(
                    f"cannot read tensor {path!r} as bytes (is numpy installed?): {exc}"
                ) from exc
            entries.append(
                Entry(
                    path or "tensor",
                    buf,
                    {
                        "type": "torch",
                        "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": list(t.shape),
                        "device": device,
                        "requires_grad": bool(obj.requires_grad),
                    },
                )
            )
            return _Ref(len(entries) - 1)
        return obj

    def walk(obj: Any, path: str, depth: int) -> Any:
        if depth > 64:
            return obj
        if isinstance(obj, dict):
            # copy.copy keeps the mapping's type and attributes (a torch state dict
            # is an OrderedDict with a _metadata attribute).
            new = copy.copy(obj)
            for key, value in obj.items():
                new[key] = walk(value, f"{path}/{key}" if path else str(key), depth + 1)
            return new
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            items = [walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(obj)]
            if hasattr(obj, "_fields"):
                return type(obj)(*items)
            return type(obj)(items) if type(obj) is not tuple else tuple(items)
        return leaf(obj, path)

    skeleton = walk(state, "", 0)
    names: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.name in names or entry.name == SKELETON:
            entry.name = f"{entry.name}#{index}"
        names.add(entry.name)
    # Everything that is not a raw array (optimizer hyper-parameters, step counters,
    # RNG states...) is pickled now, as part of the snapshot.
    head = Entry(SKELETON, _pickle(skeleton, "non-array part of the state"))
    return Snapshot("arrays", [head, *entries])


def decode(
    codec: str, buffers: list[tuple[dict[str, Any], bytearray]], map_location: Any
) -> Any:
    """
    Rebuild a state from its codec name and its (entry metadata, bytes) pairs.

    Raises:
        CheckpointCodecError: The data cannot be decoded here.
    """
    if codec == "raw":
        return bytes(buffers[0][1])
    if codec == "json":
        try:
            return json.loads(bytes(buffers[0][1]))
        except ValueError as exc:
            raise CheckpointCodecError(f"cannot decode JSON state: {exc}") from exc
    if codec == "pickle":
        return _unpickle(buffers[0][1])
    if codec == "arrays":
        skeleton = _unpickle(buffers[0][1])
        arrays = [_decode_array(meta, data, map_location) for meta, data in buffers[1:]]
        return _fill(skeleton, arrays, 0)
    raise CheckpointCodecError(f"unknown codec {codec!r} in manifest")


def _unpickle(data: bytearray) -> Any:
    try:
        return pickle.loads(data)  # noqa: S301 - the store is trusted, like torch.load
    except Exception as exc:
        raise CheckpointCodecError(
            f"cannot unpickle the state: {type(exc).__name__}: {exc}"
        ) from exc


def _decode_array(meta: dict[str, Any], data: bytearray, map_location: Any) -> Any:
    kind = meta.get("type")
    if kind == "numpy":
        import numpy as np

        return np.frombuffer(data, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])
    if kind == "torch":
        try:
            import torch
        except ImportError as exc:
            raise CheckpointCodecError(
                "this checkpoint holds torch tensors, but torch is not installed"
            ) from exc
        dtype = getattr(torch, meta["dtype"])
        if len(data):
            t = torch.frombuffer(data, dtype=torch.uint8).view(dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        t = t.reshape(meta["shape"])
        device = _target_device(meta.get("device", "cpu"), map_location)
        if device != "cpu":
            try:
                t = t.to(device)
            except (RuntimeError, AssertionError) as exc:
                raise CheckpointCodecError(
                    f"cannot place a tensor on {device!r} ({exc}); "
                    "pass map_location='cpu' to load() to load it on the CPU"
                ) from exc
        if meta.get("requires_grad"):
            t.requires_grad_(True)
        return t
    raise CheckpointCodecError(f"unknown array type {kind!r} in manifest")


def _target_device(saved: str, map_location: Any) -> str:
    if map_location is None:
        return saved
    if isinstance(map_location, dict):
        return str(map_location.get(saved, saved))
    if callable(map_location):
        return str(map_location(saved))
    return str(map_location)


def _fill(obj: Any, arrays: list[Any], depth: int) -> Any:
    if isinstance(obj, _Ref):
        return arrays[obj.index]
    if depth > 64:
        return obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _fill(value, arrays, depth + 1)
        return obj
    if isinstance(obj, list):
        return [_fill(v, arrays, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        items = [_fill(v, arrays, depth + 1) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items) if type(obj) is not tuple else tuple(items)
    return obj
