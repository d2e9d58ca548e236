"""
Fixtures for the checkpoint tests: one store URL per backend, and Checkpointers.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.checkpoint import Checkpointer

BACKENDS = ["memory", "file", "s3"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty checkpoint URL on each backend (memory, local files, moto S3)."""
    if request.param == "memory":
        import fsspec

        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
    elif request.param == "file":
        yield f"file://{tmp_path}/ckpt"
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/run-1/ckpt"


@pytest.fixture
def make(store_url: str) -> Iterator[Callable[..., Checkpointer]]:
    """Build Checkpointers on the current backend; all are closed afterwards."""
    made: list[Checkpointer] = []

    def factory(**kwargs: Any) -> Checkpointer:
        ckpt = Checkpointer(store_url, **kwargs)
        made.append(ckpt)
        return ckpt

    yield factory
    for ckpt in made:
        with contextlib.suppress(Exception):
            ckpt.close()
