"""
The storage contract: every test here runs on memory://, file:// and s3:// (moto).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from kelpie_sdk.checkpoint import (
    CheckpointConflictError,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointFormatError,
    CheckpointNotFoundError,
    _manifest,
)

Make = Callable[..., Checkpointer]


def _corrupt(ckpt: Checkpointer, path: str, data: bytes) -> None:
    fs = ckpt._store.fs
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)


def _chunk_of(ckpt: Checkpointer, step: int, index: int = -1) -> str:
    doc = ckpt._manifest(step)
    return str(doc["entries"][index]["chunks"][0][0])


def test_fresh_store_is_empty(make: Make) -> None:
    """A store with nothing committed has no latest step, no steps, and no load."""
    ckpt = make()
    assert None is ckpt.latest_step()
    assert [] == ckpt.steps()
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load()


@pytest.mark.parametrize(
    "state",
    [
        b"\x00raw bytes\xff",
        {"step": 3, "loss": [0.5, 0.25], "name": "run"},
        {"fraction": Fraction(1, 3), "a set": {1, 2}},
    ],
    ids=["raw", "json", "pickle"],
)
def test_round_trip_simple_codecs(make: Make, state: object) -> None:
    """bytes, JSON and pickled states come back equal."""
    ckpt = make()
    ckpt.save(state, step=7, blocking=True)
    assert state == ckpt.load()
    assert 7 == ckpt.loaded_step


def test_round_trip_numpy_and_torch(make: Make) -> None:
    """numpy arrays and torch tensors nested in a dict come back bit for bit."""
    ckpt = make(chunk_size=4096)
    rng = np.random.default_rng(0)
    state = {
        "weights": rng.standard_normal((64, 33)).astype(np.float32),
        "ints": np.arange(10_000, dtype=np.int64),
        "model": {"w": torch.randn(17, 5), "b": torch.zeros(5, dtype=torch.bfloat16)},
        "step": 12,
    }
    ckpt.save(state, step=1)
    ckpt.wait()
    loaded = ckpt.load()
    np.testing.assert_array_equal(state["weights"], loaded["weights"])
    np.testing.assert_array_equal(state["ints"], loaded["ints"])
    assert torch.equal(state["model"]["w"], loaded["model"]["w"])
    assert torch.equal(state["model"]["b"], loaded["model"]["b"])
    assert 12 == loaded["step"]


def test_save_snapshots_before_returning(make: Make) -> None:
    """Changing the state right after an async save() does not change what is saved."""
    ckpt = make()
    arr = np.zeros(100_000)
    ckpt.save({"a": arr}, step=1)
    arr[:] = 1.0
    ckpt.wait()
    assert 0.0 == float(ckpt.load()["a"].sum())


def test_latest_step_and_steps(make: Make) -> None:
    """latest_step() and steps() list committed steps; a new Checkpointer sees them."""
    ckpt = make()
    for step in (5, 10, 15):
        ckpt.save({"s": step}, step=step)
    ckpt.close()
    other = make()
    assert [5, 10, 15] == other.steps()
    assert 15 == other.latest_step()
    assert {"s": 10} == other.load(10)


def test_corrupt_newest_manifest_falls_back(make: Make) -> None:
    """A truncated newest manifest is skipped: the previous step is latest and loads."""
    ckpt = make()
    ckpt.save({"s": 1}, step=1)
    ckpt.save({"s": 2}, step=2, blocking=True)
    path = ckpt._store.manifest_path(2)
    good = ckpt._store.get(path)
    fresh = make()
    _corrupt(fresh, path, good[: len(good) // 2])
    assert 1 == fresh.latest_step()
    assert {"s": 1} == fresh.load()
    assert 1 == fresh.loaded_step


def test_altered_manifest_is_rejected(make: Make) -> None:
    """A manifest whose body no longer matches its own hash does not count."""
    ckpt = make()
    ckpt.save({"s": 1}, step=1)
    ckpt.save({"s": 2}, step=2, blocking=True)
    path = ckpt._store.manifest_path(2)
    doc = json.loads(ckpt._store.get(path))
    doc["codec"] = "pickle"
    fresh = make()
    _corrupt(fresh, path, json.dumps(doc).encode())
    assert 1 == fresh.latest_step()
    with pytest.raises(CheckpointCorruptError):
        fresh.load(2)


def test_missing_chunk_falls_back(make: Make) -> None:
    """A newest step with a missing chunk is partial: latest_step() skips it."""
    ckpt = make()
    ckpt.save(b"one", step=1)
    ckpt.save(b"two", step=2, blocking=True)
    ckpt._store.fs.rm_file(ckpt._store.chunk_path(_chunk_of(ckpt, 2)))
    fresh = make()
    assert 1 == fresh.latest_step()
    assert b"one" == fresh.load()
    with pytest.raises(CheckpointCorruptError):
        fresh.load(2)


def test_flipped_chunk_is_never_returned(make: Make) -> None:
    """A chunk with the right size but wrong bytes makes load(step) raise."""
    ckpt = make()
    ckpt.save(b"first", step=1)
    ckpt.save(b"other", step=2, blocking=True)
    _corrupt(ckpt, ckpt._store.chunk_path(_chunk_of(ckpt, 2)), b"OTHER")
    fresh = make()
    with pytest.raises(CheckpointCorruptError):
        fresh.load(2)
    assert b"first" == fresh.load()
    assert 1 == fresh.loaded_step


def test_two_writers_cannot_commit_the_same_step(make: Make) -> None:
    """The second writer of a step gets CheckpointConflictError; the first one wins."""
    first, second = make(), make()
    first.save(b"first", step=3, blocking=True)
    with pytest.raises(CheckpointConflictError) as info:
        second.save(b"second", step=3, blocking=True)
    assert isinstance(info.value.__cause__, FileExistsError)
    assert b"first" == second.load(3)


def test_concurrent_writers_race_for_one_step(make: Make) -> None:
    """Four writers racing to commit step 9 at once: exactly one wins."""
    import threading

    writers = [make() for _ in range(4)]
    barrier = threading.Barrier(len(writers))
    outcomes: list[str] = []

    def race(index: int) -> None:
        barrier.wait()
        try:
            writers[index].save(f"writer {index}".encode(), step=9, blocking=True)
            outcomes.append("won")
        except CheckpointConflictError:
            outcomes.append("lost")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ["lost", "lost", "lost", "won"] == sorted(outcomes)
    assert make().load(9).startswith(b"writer ")


def test_background_failure_is_raised_by_next_save(make: Make) -> None:
    """An async save that failed raises on the next save(), once."""
    first, second = make(), make()
    first.save(b"a", step=1, blocking=True)
    second.save(b"b", step=1)
    with pytest.raises(CheckpointConflictError):
        second.save(b"c", step=2)
    second.save(b"c", step=2, blocking=True)
    assert [1, 2] == second.steps()


def test_background_failure_is_raised_by_wait_and_close(make: Make) -> None:
    """An async save that failed raises on wait() and, if not waited, on close()."""
    first, second = make(), make()
    first.save(b"a", step=1, blocking=True)
    second.save(b"b", step=1)
    with pytest.raises(CheckpointConflictError):
        second.wait()
    second.save(b"b", step=1)
    with pytest.raises(CheckpointConflictError):
        second.close()


def test_newer_format_is_refused(make: Make) -> None:
    """A manifest from a newer format version raises an error naming both versions."""
    ckpt = make()
    body = {"format": 99, "step": 4, "codec": "raw", "kind": "state", "entries": []}
    _corrupt(ckpt, ckpt._store.manifest_path(4), _manifest.encode(body))
    with pytest.raises(CheckpointFormatError, match=r"version 99.*up to 1"):
        ckpt.latest_step()
    with pytest.raises(CheckpointFormatError):
        ckpt.load(4)


def test_retention_keeps_last_and_every(make: Make) -> None:
    """keep_last=2, keep_every=3 keeps steps 3, 6, 7 of 1..7 and just their chunks."""
    ckpt = make(keep_last=2, keep_every=3, chunk_size=1024)
    for step in range(1, 8):
        ckpt.save({"a": np.full(1000, step, dtype=np.int32)}, step=step)
    ckpt.wait()
    assert [3, 6, 7] == ckpt.steps()
    for step in (3, 6, 7):
        np.testing.assert_array_equal(np.full(1000, step), make().load(step)["a"])
    needed = set().union(
        *(_manifest.chunk_digests(ckpt._manifest(s)) for s in (3, 6, 7))
    )
    assert needed == ckpt._store.list_chunks()


def test_retention_failure_is_reported_and_deletes_nothing(make: Make) -> None:
    """A manifest retention cannot read stops it; the error names the committed step."""
    ckpt = make(keep_last=1)
    ckpt.save(b"one", step=1, blocking=True)
    body = {"format": 99, "step": 0, "codec": "raw", "kind": "state", "entries": []}
    _corrupt(ckpt, ckpt._store.manifest_path(0), _manifest.encode(body))
    with pytest.raises(CheckpointFormatError, match="step 2 was committed"):
        ckpt.save(b"two", step=2, blocking=True)
    assert [0, 1, 2] == ckpt._store.list_steps()
    assert b"one" == make().load(1)
    assert b"two" == make().load(2)


def test_retention_keeps_shared_chunks(make: Make) -> None:
    """Deleting an old step keeps the chunks a kept step shares with it."""
    ckpt = make(keep_last=1, chunk_size=1024)
    frozen = np.arange(4096, dtype=np.int64)
    for step in range(1, 4):
        ckpt.save({"frozen": frozen, "head": np.full(8, step)}, step=step)
    ckpt.wait()
    assert [3] == ckpt.steps()
    np.testing.assert_array_equal(frozen, make().load()["frozen"])


def test_incremental_save_uploads_only_changed_chunks(make: Make) -> None:
    """After changing 10% of a state's bytes, the next save uploads at most 15%."""
    ckpt = make(chunk_size=64 * 1024)
    rng = np.random.default_rng(1)
    state = {f"layer{i}": rng.standard_normal(64 * 1024) for i in range(8)}  # 4 MiB
    ckpt.save(state, step=1, blocking=True)
    total = ckpt.last_stats.bytes_total
    assert total == ckpt.last_stats.bytes_uploaded
    # 10%: a contiguous slice of one array and a few scattered elements elsewhere.
    state["layer3"][: 52 * 1024] += 1.0
    state["layer6"][[5, 60_000]] = 0.0
    ckpt.save(state, step=2, blocking=True)
    stats = ckpt.last_stats
    assert stats.bytes_uploaded <= 0.15 * total
    assert stats.bytes_uploaded >= 0.10 * total
    fresh = make()
    np.testing.assert_array_equal(state["layer3"], fresh.load(2)["layer3"])


def test_new_writer_does_not_reupload_existing_chunks(make: Make) -> None:
    """A new process saving the same data uploads nothing but the manifest."""
    state = {"a": np.arange(50_000)}
    make().save(state, step=1, blocking=True)
    ckpt = make()
    ckpt.save(state, step=2, blocking=True)
    assert 0 == ckpt.last_stats.bytes_uploaded


def test_save_dir_and_restore_dir(make: Make, tmp_path: Path) -> None:
    """A directory tree (nested, empty file, empty dir) is restored file for file."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(5000))
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    ckpt = make(chunk_size=1024)
    ckpt.save_dir(src, step=1, blocking=True)
    dst = tmp_path / "dst"
    assert 1 == make().restore_dir(dst)
    for path in src.rglob("*"):
        twin = dst / path.relative_to(src)
        assert path.is_dir() == twin.is_dir()
        if path.is_file():
            assert path.read_bytes() == twin.read_bytes()
    assert 0o755 == (dst / "run.sh").stat().st_mode & 0o777
    with pytest.raises(Exception, match="restore_dir"):
        make().load(1)


def test_manifest_records_job_and_attempt(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest names the job id and attempt read from the environment."""
    ckpt = make()
    monkeypatch.setenv("KELPIE_JOB_ID", "job-123")
    monkeypatch.setenv("KELPIE_ATTEMPT", "2")
    ckpt.save(b"x", step=1, blocking=True)
    doc = make()._manifest(1)
    assert ("job-123", "2", 1, "raw") == (
        doc["job_id"],
        doc["attempt"],
        doc["format"],
        doc["codec"],
    )
