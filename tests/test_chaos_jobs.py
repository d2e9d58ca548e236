"""
The chaos job kinds that run the examples (Monte Carlo with numpy, training with
PyTorch): killed and resumed as processes, they give the uninterrupted result;
they refuse a checkpoint that fails its check; an installed package (no
checkout) still runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kelpie_sdk import chaos_jobs, testing_faults
from kelpie_sdk.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def chaos_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fault filesystem with no faults, for checkpoints on chaos:// URLs."""
    ctl = tmp_path / "control"
    ctl.mkdir()
    monkeypatch.setenv("KELPIE_CHAOS_DIR", str(ctl))
    for name in ("KELPIE_CHAOS_FAIL_RATE", "KELPIE_CHAOS_STALL_RATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(testing_faults, "_settings", None)
    testing_faults.register()
    yield ctl
    monkeypatch.setattr(testing_faults, "_settings", None)


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KELPIE_CHECKPOINT_URL": f"chaos://{tmp_path / 'ck'}",
        "CHAOS_STEPS": "12",
        "CHAOS_EVERY": "3",
        "CHAOS_STEP_S": "0",
        "CHAOS_SEED": "t-1",
        "RESULT_DIR": str(tmp_path / "out"),
        chaos_jobs.EVENTS_ENV: str(tmp_path / "events.jsonl"),
        **extra,
    }


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _argv(kind: str) -> list[str]:
    return [sys.executable, "-m", "kelpie_sdk.chaos_jobs", kind]


def test_the_example_kinds_are_registered_and_can_run_here() -> None:
    """With numpy and torch installed (the test extras), both kinds are available."""
    for name in ("monte_carlo", "pytorch"):
        kind = chaos_jobs.JOB_KINDS[name]
        assert kind.available(), name
        assert kind.needs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["monte_carlo", "pytorch"])
def test_an_example_job_killed_mid_interval_resumes_to_the_uninterrupted_result(
    kind: str, chaos_env: Path, tmp_path: Path
) -> None:
    """
    SIGKILL after the checkpoint at step 9 (mid-epoch for the training job), then
    a second attempt: it resumes from step 9 and writes the uninterrupted result.
    """
    env = _job_env(tmp_path, CHAOS_STEP_S="0.3", KELPIE_ATTEMPT="1")
    proc = subprocess.Popen(_argv(kind), env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(e["e"] == "saved" and e["step"] == 9 for e in _events(tmp_path)):
            assert proc.poll() is None, f"the job exited {proc.returncode} early"
            assert time.monotonic() < deadline, "no checkpoint at step 9 in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    first = _events(tmp_path)
    assert not any(e["e"] == "done" for e in first)
    env.update(KELPIE_ATTEMPT="2", CHAOS_STEP_S="0")
    subprocess.run(_argv(kind), env=env, timeout=120, check=True)

    events = _events(tmp_path)
    assert [(1, 0), (2, 9)] == [
        (e["a"], e["step"]) for e in events if e["e"] == "start"
    ]
    assert [10, 11, 12] == [
        e["step"] for e in events if e["e"] == "step" and e["a"] == 2
    ]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    params = {k: v for k, v in env.items() if k.startswith("CHAOS_")}
    assert 2 == result["attempt"]
    assert chaos_jobs.JOB_KINDS[kind].expected(params) == result["result"]
    # The result is the example's own result.json text.
    summary = json.loads(result["result"])
    if kind == "pytorch":
        assert 12 == summary["steps"]
    else:
        assert 12 * 4000 == summary["paths"]  # 20 * CHAOS_WORK paths per batch


def test_the_example_kinds_results_depend_on_the_seed_and_the_steps() -> None:
    """Another seed or another length gives another result; the same inputs repeat it."""
    for name in ("monte_carlo", "pytorch"):
        expected = chaos_jobs.JOB_KINDS[name].expected
        base = expected({"CHAOS_SEED": "a", "CHAOS_STEPS": "4"})
        assert base == expected({"CHAOS_SEED": "a", "CHAOS_STEPS": "4"})
        assert base != expected({"CHAOS_SEED": "b", "CHAOS_STEPS": "4"})
        assert base != expected({"CHAOS_SEED": "a", "CHAOS_STEPS": "6"})


def test_an_example_job_refuses_a_state_that_does_not_match_its_digest(
    chaos_env: Path, tmp_path: Path
) -> None:
    """A checkpoint whose state was changed after its digest was taken: exit 3."""
    env = _job_env(tmp_path, CHAOS_STEPS="6", KELPIE_ATTEMPT="1")
    subprocess.run(_argv("monte_carlo"), env=env, timeout=60, check=True)
    with Checkpointer(env["KELPIE_CHECKPOINT_URL"]) as ckpt:
        saved = ckpt.load()
    assert 6 == saved["step"]
    assert chaos_jobs.state_digest(6, saved["state"]) == saved["digest"]
    saved["state"]["sum"] += 1e-9
    with Checkpointer(f"chaos://{tmp_path / 'tampered'}") as ckpt:
        ckpt.save(saved, step=6, blocking=True)
    env.update(
        KELPIE_CHECKPOINT_URL=f"chaos://{tmp_path / 'tampered'}",
        KELPIE_ATTEMPT="2",
        RESULT_DIR=str(tmp_path / "out2"),
    )
    proc = subprocess.run(
        _argv("monte_carlo"), env=env, timeout=60, capture_output=True, text=True
    )
    assert 3 == proc.returncode, proc.stderr
    assert "fails its own check: its state does not match its digest" in proc.stderr
    assert ("corrupt", 2, 6) == next(
        (e["e"], e["a"], e["step"]) for e in _events(tmp_path) if e["a"] == 2
    )
    assert not (tmp_path / "out2").exists()


def test_the_state_digest_sees_every_array_and_tensor_byte() -> None:
    """Equal states digest alike; one changed element, dtype or type changes it."""
    state = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "rng": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "py": (3, (1, 2), None),
        "lr": [0.1, True, "x"],
    }
    digest = chaos_jobs.state_digest(5, state)
    same = {
        "w": state["w"].clone(),
        "rng": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "py": (3, (1, 2), None),
        "lr": [0.1, True, "x"],
    }
    assert digest == chaos_jobs.state_digest(5, same)
    assert digest != chaos_jobs.state_digest(6, same)
    same["w"][1, 2] = 5.5
    assert digest != chaos_jobs.state_digest(5, same)
    same["w"] = state["w"].double()
    assert digest != chaos_jobs.state_digest(5, same)
    same = {**state, "lr": [0.1, 1, "x"]}
    assert digest != chaos_jobs.state_digest(5, same)
    with pytest.raises(TypeError, match="cannot digest a object"):
        chaos_jobs.state_digest(1, {"x": object()})


@pytest.mark.slow
def test_an_installed_package_runs_the_example_kinds_without_a_checkout(
    chaos_env: Path, tmp_path: Path
) -> None:
    """
    The package laid out as the wheel has it (the examples copied where
    pyproject.toml's force-include puts them), away from the checkout: the kinds
    are there and a Monte Carlo job runs from the copy.
    """
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "kelpie_sdk",
        site / "kelpie_sdk",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    copies = wheel["force-include"]
    assert {
        "examples/monte_carlo/monte_carlo.py",
        "examples/pytorch_training/train.py",
    } == set(copies)
    for source, target in copies.items():
        (site / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, site / target)
    env = _job_env(tmp_path, CHAOS_STEPS="4", KELPIE_ATTEMPT="1")
    env["PYTHONPATH"] = str(site)
    probe = (
        "from kelpie_sdk import chaos_jobs as c; "
        "print(c.__file__, c.example_path('monte_carlo.py'), "
        "c.example_path('train.py'), sorted(c.JOB_KINDS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split(" ", 3)
    assert [
        str(site / "kelpie_sdk" / "chaos_jobs.py"),
        str(site / "kelpie_sdk" / "_examples" / "monte_carlo.py"),
        str(site / "kelpie_sdk" / "_examples" / "train.py"),
        "['monte_carlo', 'pytorch', 'sum']\n",
    ] == out
    subprocess.run(_argv("monte_carlo"), env=env, cwd=tmp_path, timeout=60, check=True)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    params = {k: v for k, v in env.items() if k.startswith("CHAOS_")}
    assert chaos_jobs.JOB_KINDS["monte_carlo"].expected(params) == result["result"]
