"""
The state file: atomic writes, read back after a restart, bounded history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kelpie_sdk.worker._state import (
    HISTORY_LIMIT,
    HeldJob,
    StateFile,
    atomic_write_json,
)


def _held(job_id: str = "j1") -> HeldJob:
    return HeldJob(
        id=job_id,
        attempt=2,
        machine_id="m",
        container_group_id="cg",
        phase="running",
        start="2026-01-01T00:00:00.000+00:00",
        pid=123,
    )


def test_held_job_survives_a_restart(tmp_path: Path) -> None:
    """A job recorded by one run is read back by the next."""
    path = tmp_path / "state.json"
    first = StateFile(path, machine_id="m")
    first.start()
    first.hold(_held())
    held, history = StateFile(path, machine_id="m").read_previous()
    assert _held() == held
    assert [] == history


def test_finish_moves_the_job_to_history(tmp_path: Path) -> None:
    """Finishing clears the held job and appends an outcome record."""
    state = StateFile(tmp_path / "s.json", machine_id="m")
    state.start()
    state.hold(_held())
    state.finish("completed", exit_code=0)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["job"] is None
    assert ["j1", "completed", 0] == [
        doc["history"][0]["id"],
        doc["history"][0]["outcome"],
        doc["history"][0]["exit_code"],
    ]


def test_history_is_capped(tmp_path: Path) -> None:
    """The history never grows beyond HISTORY_LIMIT entries (W-23)."""
    state = StateFile(tmp_path / "s.json", machine_id="m")
    state.start()
    for i in range(HISTORY_LIMIT + 5):
        state.hold(_held(f"j{i}"))
        state.finish("completed")
    history = state.history
    assert HISTORY_LIMIT == len(history)
    assert f"j{HISTORY_LIMIT + 4}" == history[-1]["id"]


def test_update_changes_the_held_job(tmp_path: Path) -> None:
    """update() edits fields of the held job only."""
    state = StateFile(tmp_path / "s.json", machine_id="m")
    state.start()
    state.update(phase="ignored")
    assert state.job is None
    state.hold(_held())
    state.update(phase="uploading", pid=None)
    held, _ = StateFile(tmp_path / "s.json", machine_id="m").read_previous()
    assert held is not None
    assert ("uploading", None) == (held.phase, held.pid)


@pytest.mark.parametrize(
    "content", ["", "{not json", "[]", '{"job": {"id": 1}}'], ids=str
)
def test_unreadable_state_is_ignored(tmp_path: Path, content: str) -> None:
    """A corrupt or foreign file yields no held job instead of crashing."""
    path = tmp_path / "s.json"
    path.write_text(content)
    assert (None, []) == StateFile(path, machine_id="m").read_previous()


def test_missing_state_file(tmp_path: Path) -> None:
    """No file means nothing to recover."""
    assert (None, []) == StateFile(
        tmp_path / "none.json", machine_id="m"
    ).read_previous()


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    """Only the target remains after a write; readers see complete JSON."""
    target = tmp_path / "sub" / "f.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert ["f.json"] == os.listdir(tmp_path / "sub")
    assert {"a": 2} == json.loads(target.read_text())


def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    """If serialising fails, the previous document is untouched."""
    target = tmp_path / "f.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert {"ok": True} == json.loads(target.read_text())
    assert ["f.json"] == os.listdir(tmp_path)


def test_write_errors_do_not_raise(tmp_path: Path) -> None:
    """A state file that cannot be written is logged, not fatal."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    state = StateFile(blocker / "s.json", machine_id="m")
    state.start()
    state.hold(_held())
    assert "j1" == (state.job or {}).get("id")
