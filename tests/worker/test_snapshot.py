"""
Checkpoint snapshots: changed files by (size, mtime_ns), settle time, deletions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kelpie_sdk.errors import StorageError
from kelpie_sdk.storage import Storage
from kelpie_sdk.worker._snapshot import DirSnapshot, scan_dir


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    """Local file storage under tmp_path/store."""
    root = tmp_path / "store"
    (root / "b").mkdir(parents=True)
    return Storage(f"file://{root}")


def _old(path: Path, text: str) -> None:
    """Write a file and date it 10 s back, so it counts as settled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def _remote(tmp_path: Path) -> dict[str, str]:
    base = tmp_path / "store" / "b" / "ck"
    if not base.exists():
        return {}
    return {
        p.relative_to(base).as_posix(): p.read_text()
        for p in base.rglob("*")
        if p.is_file()
    }


def test_changed_files_are_uploaded_once(tmp_path: Path, storage: Storage) -> None:
    """New files go up; an unchanged file is not uploaded again."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    _old(local / "sub" / "b.txt", "2")
    snap = DirSnapshot(local, "b", "ck/")
    assert 2 == snap.sync(storage).uploaded
    assert {"a.txt": "1", "sub/b.txt": "2"} == _remote(tmp_path)
    assert 0 == snap.sync(storage).uploaded


def test_modified_file_is_uploaded_again(tmp_path: Path, storage: Storage) -> None:
    """A new size or mtime means a new upload of the latest content."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    snap = DirSnapshot(local, "b", "ck")
    snap.sync(storage)
    _old(local / "a.txt", "22")
    assert 1 == snap.sync(storage).uploaded
    assert {"a.txt": "22"} == _remote(tmp_path)


def test_fresh_files_wait_for_the_next_tick(tmp_path: Path, storage: Storage) -> None:
    """A file written just now is deferred on a tick but sent by the final sync."""
    local = tmp_path / "ck"
    local.mkdir()
    (local / "hot.bin").write_text("partial")
    snap = DirSnapshot(local, "b", "ck/", settle_s=60)
    result = snap.sync(storage)
    assert (0, 1) == (result.uploaded, result.deferred)
    assert 1 == snap.sync(storage, final=True).uploaded
    assert {"hot.bin": "partial"} == _remote(tmp_path)


def test_primed_files_are_not_uploaded(tmp_path: Path, storage: Storage) -> None:
    """Files just downloaded from storage are not sent back."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    snap = DirSnapshot(local, "b", "ck/")
    assert 1 == snap.prime()
    assert [] == snap.pending()
    assert 0 == snap.sync(storage, final=True).uploaded


def test_deleted_files_are_deleted_remotely(tmp_path: Path, storage: Storage) -> None:
    """Removing a local file removes its object, as the original's unlink did."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    _old(local / "b.txt", "2")
    snap = DirSnapshot(local, "b", "ck/")
    snap.sync(storage)
    (local / "a.txt").unlink()
    assert 1 == snap.sync(storage).deleted
    assert {"b.txt": "2"} == _remote(tmp_path)


def test_compression_uses_gz_keys_for_upload_and_delete(
    tmp_path: Path, storage: Storage
) -> None:
    """With compression both the upload and the delete use the .gz key (W-25)."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    snap = DirSnapshot(local, "b", "ck/", compress=True)
    snap.sync(storage)
    assert ["a.txt.gz"] == sorted(
        p.name for p in (tmp_path / "store" / "b" / "ck").iterdir()
    )
    (local / "a.txt").unlink()
    snap.sync(storage)
    assert [] == list((tmp_path / "store" / "b" / "ck").iterdir())


def test_pattern_and_hidden_files(tmp_path: Path, storage: Storage) -> None:
    """Only paths the pattern finds are mirrored; dot-files never are."""
    local = tmp_path / "ck"
    _old(local / "model.pt", "m")
    _old(local / "log.txt", "l")
    _old(local / ".tmp-model.pt", "t")
    snap = DirSnapshot(local, "b", "ck/", pattern=r"\.pt$")
    snap.sync(storage)
    assert {"model.pt": "m"} == _remote(tmp_path)


def test_missing_directory_is_empty(tmp_path: Path, storage: Storage) -> None:
    """A directory that does not exist has nothing to upload."""
    assert [] == list(scan_dir(tmp_path / "nope"))
    assert 0 == DirSnapshot(tmp_path / "nope", "b", "ck/").sync(storage).uploaded


def test_upload_errors_propagate(tmp_path: Path) -> None:
    """A failing upload raises StorageError and the file stays pending."""
    local = tmp_path / "ck"
    _old(local / "a.txt", "1")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "b").write_text("a file where the bucket should be")
    broken = Storage(f"file://{tmp_path / 'store'}", max_retries=0)
    snap = DirSnapshot(local, "b", "ck/")
    with pytest.raises(StorageError):
        snap.sync(broken)
    assert ["a.txt"] == snap.pending()


def test_constantly_rewritten_file_is_not_starved(
    tmp_path: Path, storage: Storage
) -> None:
    """A file that is always fresh is deferred once, then uploaded anyway."""
    local = tmp_path / "ck"
    local.mkdir()
    snap = DirSnapshot(local, "b", "ck/", settle_s=60)
    uploaded = []
    for text in ("1", "22", "333", "4444"):
        (local / "state.json").write_text(text)
        uploaded.append(snap.sync(storage).uploaded)
    assert [0, 1, 0, 1] == uploaded
    assert {"state.json": "4444"} == _remote(tmp_path)


_NAMES = st.sampled_from(["a", "b", "sub/c", "sub/deeper/d"])
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _NAMES, st.binary(max_size=3)),
        st.tuples(st.just("delete"), _NAMES, st.just(b"")),
        st.tuples(st.just("sync"), st.just(""), st.just(b"")),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops=_OPS)
def test_final_sync_mirrors_the_directory(ops: list[tuple[str, str, bytes]]) -> None:
    """Whatever the job writes, deletes and however the ticks fall, storage ends
    up equal to the directory after the final sync (same-size rewrites included)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "store" / "b").mkdir(parents=True)
        storage = Storage(f"file://{root / 'store'}")
        local = root / "ck"
        local.mkdir()
        snap = DirSnapshot(local, "b", "ck/", settle_s=0.0)
        for op, name, data in ops:
            path = local / name
            if op == "write":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            elif op == "delete":
                path.unlink(missing_ok=True)
            else:
                snap.sync(storage)
        snap.sync(storage, final=True)
        expected = {
            p.relative_to(local).as_posix(): p.read_bytes()
            for p in local.rglob("*")
            if p.is_file()
        }
        base = root / "store" / "b" / "ck"
        actual = (
            {
                p.relative_to(base).as_posix(): p.read_bytes()
                for p in base.rglob("*")
                if p.is_file()
            }
            if base.exists()
            else {}
        )
        assert expected == actual
        storage.close()
