"""
Backend-independent behaviour: defaults, policy, errors, signals, progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kelpie_sdk import checkpoint
from kelpie_sdk.checkpoint import (
    CheckpointCodecError,
    Checkpointer,
    CheckpointError,
    CheckpointStorageError,
    _checkpointer,
    _signals,
)


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A unique memory:// URL, removed afterwards."""
    import uuid

    import fsspec

    name = f"api-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _run(
    code: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_import_is_light() -> None:
    """Importing kelpie_sdk.checkpoint loads no HTTP, CLI, server, numpy or torch."""
    result = _run(
        """
        import sys
        from kelpie_sdk import checkpoint
        heavy = ("requests", "rich", "litestar", "sqlalchemy", "numpy", "torch",
                 "boto3", "s3fs", "kelpie_sdk.server", "kelpie_sdk.client")
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert "[]" == result.stdout.strip(), result.stderr


def test_import_has_no_side_effects() -> None:
    """Importing installs no signal handler or exit hook; a Checkpointer adds one."""
    result = _run(
        """
        import atexit, logging, signal
        before = signal.getsignal(signal.SIGTERM), atexit._ncallbacks()
        from kelpie_sdk import checkpoint
        after = signal.getsignal(signal.SIGTERM), atexit._ncallbacks()
        checkpoint.Checkpointer("memory://x")
        print(before == after, atexit._ncallbacks() - after[1])
        """
    )
    assert "True 1" == result.stdout.strip(), result.stderr


def test_default_url_is_read_at_call_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """KELPIE_CHECKPOINT_URL is the default location; without it, ./checkpoints."""
    monkeypatch.chdir(tmp_path)
    local = Checkpointer()
    assert str(tmp_path / "checkpoints") == local.url
    local.save(b"x", step=1, blocking=True)
    assert (tmp_path / "checkpoints" / "steps" / "000000000001").is_dir()
    monkeypatch.setenv("KELPIE_CHECKPOINT_URL", f"file://{tmp_path}/from-env")
    assert f"file://{tmp_path}/from-env" == Checkpointer().url


def test_unknown_protocol_is_a_storage_error() -> None:
    """A URL with no fsspec implementation raises CheckpointStorageError naming it."""
    with pytest.raises(CheckpointStorageError, match="nosuchproto://x") as info:
        Checkpointer("nosuchproto://x/y")
    assert info.value.__cause__ is not None


def test_unpicklable_state_is_a_codec_error(memory_url: str) -> None:
    """A state that cannot be pickled raises CheckpointCodecError from save()."""
    ckpt = Checkpointer(memory_url)
    with pytest.raises(CheckpointCodecError, match="pickle") as info:
        ckpt.save({"lock": threading.Lock()}, step=1)
    assert info.value.__cause__ is not None
    with pytest.raises(CheckpointCodecError, match="unknown codec"):
        ckpt.save(b"x", step=1, codec="zip")
    ckpt.close()


def test_missing_credentials_is_a_storage_error(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Saving to S3 without credentials raises CheckpointStorageError naming them."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    ckpt = Checkpointer(
        f"s3://{s3_bucket}/x", storage_options={"skip_instance_cache": True}
    )
    with pytest.raises(CheckpointStorageError, match="credentials") as info:
        ckpt.save(b"x", step=1, blocking=True)
    assert info.value.__cause__ is not None
    ckpt.close()


def test_should_save_every_steps(memory_url: str) -> None:
    """every_steps=5 says yes on multiples of 5, never at or below a saved step."""
    ckpt = Checkpointer(memory_url, every_steps=5)
    assert [5, 10] == [s for s in range(1, 12) if ckpt.should_save(s)]
    ckpt.save(b"x", step=10, blocking=True)
    assert not ckpt.should_save(10)
    assert ckpt.should_save(15)
    ckpt.close()


def test_should_save_every_seconds(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """every_seconds counts from the last save (with a fake clock)."""
    now = [1000.0]
    monkeypatch.setattr(_checkpointer.time, "monotonic", lambda: now[0])
    ckpt = Checkpointer(memory_url, every_seconds=60)
    assert not ckpt.should_save(1)
    now[0] += 60
    assert ckpt.should_save(1)
    ckpt.save(b"x", step=1, blocking=True)
    now[0] += 59
    assert not ckpt.should_save(2)
    now[0] += 1
    assert ckpt.should_save(2)
    ckpt.close()


def test_should_save_after_latest_step(memory_url: str) -> None:
    """A resumed run is never told to save the step it resumed from."""
    Checkpointer(memory_url).save(b"x", step=4, blocking=True)
    ckpt = Checkpointer(memory_url, every_steps=2)
    assert 4 == ckpt.latest_step()
    assert (False, True) == (ckpt.should_save(4), ckpt.should_save(6))
    ckpt.close()


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    """Restore SIGTERM's handler and clear the preemption flag afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    _signals._reset_preempted()
    yield
    signal.signal(signal.SIGTERM, previous)
    _signals._reset_preempted()


@pytest.mark.usefixtures("sigterm_restored")
def test_preemption_handler_sets_flag(memory_url: str) -> None:
    """After install_preemption_handler(), SIGTERM turns on preempted()."""
    ckpt = Checkpointer(memory_url, every_steps=1000)
    assert not checkpoint.preempted()
    assert not ckpt.should_save(3)
    checkpoint.install_preemption_handler()
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoint.preempted()
    assert ckpt.should_save(3)
    assert [] == ckpt.steps()
    ckpt.close()


def test_report_progress_is_a_noop_without_env(tmp_path: Path) -> None:
    """Without KELPIE_PROGRESS_FILE nothing is written."""
    checkpoint.report_progress(1, 10)
    assert [] == list(tmp_path.iterdir())


def test_report_progress_writes_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The record has step, total, fraction, a UTC time and the metrics."""
    path = tmp_path / "progress.json"
    monkeypatch.setenv("KELPIE_PROGRESS_FILE", str(path))
    checkpoint.report_progress(10, 100, loss=0.25)
    checkpoint.report_progress(20, 100, loss=0.125)
    record = json.loads(path.read_text())
    assert record["time"].endswith("Z")
    del record["time"]
    assert {"step": 20, "total": 100, "fraction": 0.2, "metrics": {"loss": 0.125}} == (
        record
    )
    assert ["progress.json"] == [p.name for p in tmp_path.iterdir()]
    with pytest.raises(CheckpointCodecError):
        checkpoint.report_progress(1, 2, loss=float("nan"))


def test_committed_save_notes_its_time_in_the_progress_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each committed step sets checkpoint_time/step; report_progress keeps them."""
    path = tmp_path / "progress.json"
    monkeypatch.setenv("KELPIE_PROGRESS_FILE", str(path))
    checkpoint.report_progress(1, 10)
    with Checkpointer(f"file://{tmp_path / 'ck'}") as ckpt:
        ckpt.save({"w": 1}, step=3, blocking=True)
    record = json.loads(path.read_text())
    assert (1, 3) == (record["step"], record["checkpoint_step"])
    assert record["checkpoint_time"].endswith("Z")
    noted = record["checkpoint_time"]
    checkpoint.report_progress(4, 10)
    record = json.loads(path.read_text())
    assert (4, 3, noted) == (
        record["step"],
        record["checkpoint_step"],
        record["checkpoint_time"],
    )


def test_report_progress_unwritable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A progress path in a missing directory raises CheckpointStorageError."""
    monkeypatch.setenv("KELPIE_PROGRESS_FILE", str(tmp_path / "no" / "p.json"))
    with pytest.raises(CheckpointStorageError):
        checkpoint.report_progress(1, 2)


def test_errors_are_reexported() -> None:
    """The Checkpoint* errors are importable from kelpie_sdk.checkpoint."""
    from kelpie_sdk import errors

    assert errors.CheckpointError is checkpoint.CheckpointError
    assert issubclass(checkpoint.CheckpointStorageError, CheckpointError)


def test_torch_tensors_keep_dtype_shape_and_grad(memory_url: str) -> None:
    """0-d, strided, bfloat16, bool, empty and requires_grad tensors round-trip."""
    state = {
        "scalar": torch.tensor(3.5),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
        "tuple": (torch.ones(1), 2),
    }
    ckpt = Checkpointer(memory_url)
    ckpt.save(state, step=1, blocking=True)
    loaded = ckpt.load(map_location="cpu")
    for key in ("scalar", "transposed", "bf16", "mask", "empty"):
        assert state[key].dtype == loaded[key].dtype
        assert torch.equal(state[key], loaded[key])
    assert loaded["param"].requires_grad
    assert (2,) == (loaded["tuple"][1],)
    ckpt.close()


def test_tensors_return_to_their_device(memory_url: str) -> None:
    """Tensors go back to the recorded device; map_location overrides it."""
    from kelpie_sdk.checkpoint import _manifest

    ckpt = Checkpointer(memory_url)
    ckpt.save({"w": torch.ones(3)}, step=1, blocking=True)
    assert "cpu" == str(ckpt.load()["w"].device)
    assert torch.equal(torch.ones(3), ckpt.load(map_location={"cpu": "cpu"})["w"])
    assert torch.equal(torch.ones(3), ckpt.load(map_location=lambda d: "cpu")["w"])
    # As if saved from a GPU this machine does not have.
    doc = dict(ckpt._manifest(1))
    doc["entries"][1]["meta"]["device"] = "cuda:0"
    path = ckpt._store.manifest_path(1)
    ckpt._store.fs.pipe_file(path, _manifest.encode(doc))
    fresh = Checkpointer(memory_url)
    with pytest.raises(CheckpointCodecError, match="map_location"):
        fresh.load(1)
    assert torch.equal(torch.ones(3), fresh.load(1, map_location="cpu")["w"])
    ckpt.close()


def test_numpy_special_arrays(memory_url: str) -> None:
    """Object and structured arrays fall back to pickle; datetimes stay raw."""
    state = {
        "obj": np.array([{"a": 1}, None], dtype=object),
        "rec": np.zeros(3, dtype=[("x", "i4"), ("y", "f8")]),
        "when": np.array(["2026-01-01"], dtype="datetime64[D]"),
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
    }
    ckpt = Checkpointer(memory_url)
    ckpt.save(state, step=1, blocking=True)
    loaded = ckpt.load()
    assert list(state["obj"]) == list(loaded["obj"])
    for key in ("rec", "when", "fortran"):
        np.testing.assert_array_equal(state[key], loaded[key])
    ckpt.close()


def test_pending_save_is_flushed_at_exit(tmp_path: Path) -> None:
    """A script that exits right after an async save() still commits that step."""
    url = f"file://{tmp_path}/ck"
    result = _run(
        f"""
        from kelpie_sdk.checkpoint import Checkpointer
        Checkpointer({url!r}).save(b"x" * 10_000_000, step=3)
        """
    )
    assert 0 == result.returncode, result.stderr
    assert b"x" * 10_000_000 == Checkpointer(url).load(3)


def test_failure_at_exit_is_reported(tmp_path: Path) -> None:
    """A save that fails during interpreter exit is logged to stderr, not lost."""
    url = f"file://{tmp_path}/ck"
    Checkpointer(url).save(b"first", step=3, blocking=True)
    result = _run(
        f"""
        from kelpie_sdk.checkpoint import Checkpointer
        Checkpointer({url!r}).save(b"second", step=3)
        """
    )
    assert "already committed" in result.stderr


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    """Retention deletes temporaries of killed local writers, but only old ones."""
    ckpt = Checkpointer(f"file://{tmp_path}/ck", keep_last=1)
    ckpt.save(b"one", step=1, blocking=True)
    chunk_dir = next((tmp_path / "ck" / "chunks").iterdir())
    old = chunk_dir / ("a" * 64 + ".tmp-1-deadbeef")
    new = chunk_dir / ("b" * 64 + ".tmp-2-deadbeef")
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    os.utime(old, (1_000_000, 1_000_000))
    ckpt.save(b"two", step=2, blocking=True)
    assert (False, True) == (old.exists(), new.exists())
    ckpt.close()


def test_closed_checkpointer_refuses_saves(memory_url: str) -> None:
    """save() after close() raises CheckpointError; close() twice is fine."""
    ckpt = Checkpointer(memory_url)
    ckpt.close()
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save(b"x", step=1)


@pytest.mark.parametrize(
    "kwargs", [{"keep_last": 0}, {"every_steps": 0}, {"chunk_size": 1}]
)
def test_bad_arguments(memory_url: str, kwargs: dict[str, int]) -> None:
    """Nonsense policy arguments raise ValueError."""
    with pytest.raises(ValueError):
        Checkpointer(memory_url, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step(memory_url: str, step: object) -> None:
    """A step that is not an int >= 0 raises ValueError."""
    ckpt = Checkpointer(memory_url)
    with pytest.raises(ValueError):
        ckpt.save(b"x", step=step)  # type: ignore[arg-type]
    ckpt.close()
