"""
Manifests: the JSON document whose creation commits a step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kelpie_sdk.errors import CheckpointCorruptError, CheckpointFormatError

FORMAT_VERSION = 1
HASH_FIELD = "manifest_sha256"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode(body: dict[str, Any]) -> bytes:
    """
    Serialize a manifest body, adding the hash of the body itself.
    """
    out = dict(body)
    out[HASH_FIELD] = hashlib.sha256(_canonical(body)).hexdigest()
    return _canonical(out)


def decode(data: bytes, step: int, where: str) -> dict[str, Any]:
    """
    Parse and verify a manifest read from ``where`` for ``step``.

    Raises:
        CheckpointFormatError: It comes from a newer format version.
        CheckpointCorruptError: It is truncated, altered, or not a manifest.
    """
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CheckpointCorruptError(f"manifest {where} is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), int):
        raise CheckpointCorruptError(f"{where} is not a checkpoint manifest")
    version = doc["format"]
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"manifest {where} has format version {version}, but this kelpie_sdk "
            f"reads versions up to {FORMAT_VERSION}; upgrade kelpie_sdk"
        )
    claimed = doc.pop(HASH_FIELD, None)
    actual = hashlib.sha256(_canonical(doc)).hexdigest()
    if claimed != actual:
        raise CheckpointCorruptError(f"manifest {where} does not match its own hash")
    if doc.get("step") != step:
        raise CheckpointCorruptError(
            f"manifest {where} names step {doc.get('step')}, not {step}"
        )
    try:
        for entry in doc["entries"]:
            for digest, size in entry["chunks"]:
                if not (isinstance(digest, str) and isinstance(size, int)):
                    raise TypeError(digest)
        str(doc["codec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointCorruptError(f"manifest {where} is malformed: {exc}") from exc
    return doc


def chunk_digests(doc: dict[str, Any]) -> set[str]:
    """
    Return every chunk digest a manifest references.
    """
    return {digest for entry in doc["entries"] for digest, _ in entry["chunks"]}
