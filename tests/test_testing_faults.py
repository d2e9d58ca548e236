"""
The fault-injecting ``chaos://`` filesystem and the chaos jobs, in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from kelpie_sdk import chaos_jobs, testing_faults
from kelpie_sdk.checkpoint import Checkpointer
from kelpie_sdk.storage import Storage


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A control directory, faults off, and fresh per-process fault settings."""
    ctl = tmp_path / "control"
    ctl.mkdir()
    monkeypatch.setenv("KELPIE_CHAOS_DIR", str(ctl))
    monkeypatch.setenv("KELPIE_CHAOS_HOLD_S", "0.5")
    monkeypatch.setenv("SALAD_MACHINE_ID", "m-1")
    for name in ("KELPIE_CHAOS_FAIL_RATE", "KELPIE_CHAOS_STALL_RATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(testing_faults, "_settings", None)
    testing_faults.register()
    yield ctl
    monkeypatch.setattr(testing_faults, "_settings", None)


def test_paths_with_and_without_the_protocol_are_local_paths() -> None:
    """chaos:///a/b, chaos://a/b and a/b all name /a/b."""
    strip = testing_faults.FaultFileSystem._strip_protocol
    assert "/a/b" == strip("chaos:///a/b/")
    assert "/a/b" == strip("chaos://a/b")
    assert "/a/b" == strip("a/b")
    assert "/" == strip("chaos:///")


def test_checkpoints_round_trip_through_chaos_urls(
    control: Path, tmp_path: Path
) -> None:
    """The checkpoint library saves, lists and loads on chaos:// like on file://."""
    url = f"chaos://{tmp_path / 'ck'}"
    with Checkpointer(url, keep_last=1) as ckpt:
        ckpt.save({"a": 1}, step=1, blocking=True)
        ckpt.save({"a": 2}, step=2, blocking=True)
    again = Checkpointer(url)
    assert 2 == again.latest_step()
    assert {"a": 2} == again.load()
    assert [2] == again.steps()
    again.close()


def test_create_mode_is_exclusive(control: Path, tmp_path: Path) -> None:
    """A second create of the same object fails with FileExistsError."""
    fs = fsspec.filesystem("chaos")
    path = str(tmp_path / "x" / "manifest.json")
    fs.pipe_file(path, b"one", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"two", mode="create")
    assert b"one" == fs.cat_file(path)
    assert [] == [p for p in os.listdir(tmp_path / "x") if ".tmp-" in p]


def test_failures_and_stalls_are_injected_and_logged(
    control: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At rate 1 every data request stalls, then fails; both go to the log."""
    monkeypatch.setenv("KELPIE_CHAOS_FAIL_RATE", "1")
    monkeypatch.setenv("KELPIE_CHAOS_STALL_RATE", "1")
    monkeypatch.setenv("KELPIE_CHAOS_STALL_S", "0.2")
    fs = fsspec.filesystem("chaos")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="injected failure"):
        fs.pipe_file(str(tmp_path / "f"), b"data")
    assert time.monotonic() - started >= 0.2
    assert not (tmp_path / "f").exists()
    kinds = [
        json.loads(line)["kind"]
        for line in (control / "storage-faults.jsonl").read_text().splitlines()
    ]
    assert ["stall", "fail"] == kinds


def test_worker_storage_retries_injected_failures(
    control: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's Storage goes through chaos:// and retries what fails there."""
    monkeypatch.setenv("KELPIE_CHAOS_FAIL_RATE", "0.3")
    (tmp_path / "root" / "b").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_text(str(i))
    with Storage(
        f"chaos://{tmp_path / 'root'}", max_retries=20, sleep=lambda s: None
    ) as storage:
        storage.upload_dir(src, "b", "p/")
        assert 10 == len(storage.list("b", "p/"))
        storage.download_prefix("b", "p/", tmp_path / "back")
    assert "7" == (tmp_path / "back" / "f7").read_text()
    assert (control / "storage-faults.jsonl").exists()


def test_an_armed_kill_point_announces_the_hit_and_holds(
    control: Path, tmp_path: Path
) -> None:
    """The first upload into out/ claims the arm, names its machine and waits."""
    fs = fsspec.filesystem("chaos")
    (control / "arm-upload").touch()
    local = tmp_path / "local"
    local.write_text("result")
    target = tmp_path / "b" / "job" / "out" / "result.json"
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (fs.put_file(str(local), str(target)), done.set())
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not list(control.glob("hit-upload-*.json")):
        assert time.monotonic() < deadline, "no hit announced"
        time.sleep(0.01)
    hit = json.loads(next(control.glob("hit-upload-*.json")).read_text())
    assert not target.exists(), "the write must wait while the harness acts"
    assert not done.is_set()
    thread.join(10)
    assert "result" == target.read_text()
    assert {"kind": "upload", "machine": "m-1", "path": str(target)} == {
        k: hit[k] for k in ("kind", "machine", "path")
    }
    assert not (control / "arm-upload").exists()
    # The arm is spent: the next upload does not hold.
    started = time.monotonic()
    fs.put_file(str(local), str(target))
    assert time.monotonic() - started < 0.4


def test_the_sum_job_resumes_exactly_from_its_checkpoint(
    control: Path, tmp_path: Path
) -> None:
    """A run of 4 steps, then one of 7 resuming from it, gives the 7-step chain."""
    env = {
        **os.environ,
        "KELPIE_CHECKPOINT_URL": f"chaos://{tmp_path / 'ck'}",
        "CHAOS_STEPS": "4",
        "CHAOS_EVERY": "2",
        "CHAOS_STEP_S": "0",
        "CHAOS_WORK": "3",
        "CHAOS_SEED": "s",
        "RESULT_DIR": str(tmp_path / "out"),
        chaos_jobs.EVENTS_ENV: str(tmp_path / "events.jsonl"),
        "KELPIE_ATTEMPT": "1",
    }
    argv = [sys.executable, "-m", "kelpie_sdk.chaos_jobs", "sum"]
    subprocess.run(argv, env=env, timeout=60, check=True)
    env.update(KELPIE_ATTEMPT="2", CHAOS_STEPS="7")
    subprocess.run(argv, env=env, timeout=60, check=True)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert {"result": chaos_jobs.sum_chain("s", 7, 3), "attempt": 2} == result
    events = [
        json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()
    ]
    assert [(1, 0), (2, 4)] == [
        (e["a"], e["step"]) for e in events if e["e"] == "start"
    ]
    assert [5, 6, 7] == [e["step"] for e in events if e["e"] == "step" and e["a"] == 2]


def test_the_sum_job_refuses_a_checkpoint_that_fails_its_check(
    control: Path, tmp_path: Path
) -> None:
    """A checkpoint whose state does not match its digest is reported, not used."""
    url = f"chaos://{tmp_path / 'ck'}"
    with Checkpointer(url) as ckpt:
        ckpt.save({"step": 2, "value": "00", "digest": "bad"}, step=2, blocking=True)
    env = {
        **os.environ,
        "KELPIE_CHECKPOINT_URL": url,
        "CHAOS_STEP_S": "0",
        "RESULT_DIR": str(tmp_path / "out"),
        chaos_jobs.EVENTS_ENV: str(tmp_path / "events.jsonl"),
        "KELPIE_ATTEMPT": "2",
    }
    argv = [sys.executable, "-m", "kelpie_sdk.chaos_jobs", "sum"]
    proc = subprocess.run(argv, env=env, timeout=60, capture_output=True, text=True)
    assert 3 == proc.returncode
    assert "fails its own check" in proc.stderr
    event = json.loads((tmp_path / "events.jsonl").read_text())
    assert ("corrupt", 2) == (event["e"], event["step"])
    assert not (tmp_path / "out").exists()


def test_sum_chain_depends_on_every_input() -> None:
    """Seed, length and work each change the result; the same inputs repeat it."""
    base = chaos_jobs.sum_chain("a", 5, 2)
    assert base == chaos_jobs.sum_chain("a", 5, 2)
    assert len({base, chaos_jobs.sum_chain("b", 5, 2)}) == 2
    assert len({base, chaos_jobs.sum_chain("a", 6, 2)}) == 2
    assert len({base, chaos_jobs.sum_chain("a", 5, 3)}) == 2
