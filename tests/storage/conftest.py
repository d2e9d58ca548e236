"""
Fixtures for the storage tests: storages on file://, memory:// and moto S3, and
a fault-injecting proxy in front of moto.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie_sdk.storage import Storage
from tests.storage.proxy import S3FaultProxy, proxy_context

#: botocore retries nothing itself, so that every retry seen is Storage's own.
NO_BOTOCORE_RETRIES = {"retries": {"total_max_attempts": 1}}


@pytest.fixture
def sleeps() -> list[float]:
    """The backoff delays that a storage asked for, in order."""
    return []


@pytest.fixture
def file_storage(tmp_path: Path, sleeps: list[float]) -> Iterator[Storage]:
    """A storage rooted at a fresh directory, with one bucket ``bkt`` in it."""
    (tmp_path / "store" / "bkt").mkdir(parents=True)
    with Storage(f"file://{tmp_path / 'store'}", sleep=sleeps.append) as storage:
        yield storage


@pytest.fixture
def s3_storage(s3_bucket: str, sleeps: list[float]) -> Iterator[Storage]:
    """A storage on moto S3 (through the AWS variables the fixture sets)."""
    with Storage(sleep=sleeps.append) as storage:
        yield storage


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[S3FaultProxy]:
    """The fault proxy in front of moto; forwards everything until told otherwise."""
    yield from proxy_context(moto_endpoint)


@pytest.fixture
def proxied(
    proxy: S3FaultProxy, s3_bucket: str, sleeps: list[float]
) -> Iterator[Storage]:
    """A storage that reaches moto through the fault proxy, retrying 3 times."""
    with Storage(
        "s3://",
        storage_options={
            "endpoint_url": proxy.endpoint,
            "config_kwargs": NO_BOTOCORE_RETRIES,
        },
        max_retries=3,
        sleep=sleeps.append,
    ) as storage:
        yield storage


@pytest.fixture(params=["file", "s3", "memory"])
def any_storage(
    request: pytest.FixtureRequest, tmp_path: Path, sleeps: list[float]
) -> Iterator[tuple[Storage, str]]:
    """The same tests on each backend: (storage, an existing bucket)."""
    if request.param == "file":
        (tmp_path / "store" / "bkt").mkdir(parents=True)
        storage = Storage(f"file://{tmp_path / 'store'}", sleep=sleeps.append)
        bucket = "bkt"
    elif request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        storage = Storage("s3://", sleep=sleeps.append)
    else:
        import fsspec

        root = f"kelpie-test-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("memory").mkdir(f"/{root}/bkt")
        storage = Storage(f"memory://{root}", sleep=sleeps.append)
        bucket = "bkt"
    with storage:
        yield storage, bucket


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A nested local tree of small files, with different sizes and depths."""
    root = tmp_path / "tree"
    files = {
        "a.txt": b"alpha",
        "empty.bin": b"",
        "sub/b.json": b'{"b": 1}',
        "sub/deeper/c.csv": b"x,y\n1,2\n" * 100,
        "sub/deeper/.hidden": b"h",
        "other/d.txt.gz": os.urandom(3000),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
