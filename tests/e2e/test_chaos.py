"""
`kelpie chaos` and `kelpie demo`: many jobs while workers, the server and the
storage fail; the harness's checks hold on a sound run and fail on a broken one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kelpie_sdk.cli._chaos import ChaosReport, _plan_faults

pytestmark = pytest.mark.slow


def _kelpie(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kelpie_sdk", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _figure(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not in:\n{text}"
    return match.group(1)


@pytest.mark.timeout(600)
def test_fifty_jobs_survive_twenty_faults(tmp_path: Path) -> None:
    """50 jobs on 4 workers, 20 kills and restarts plus storage faults: all checks hold."""
    proc = _kelpie(
        "chaos",
        "--jobs",
        "50",
        "--workers",
        "4",
        "--faults",
        "20",
        "--seed",
        "12",
        "--storage",
        str(tmp_path / "run"),
        "--timeout",
        "480",
        timeout=560,
    )
    out = proc.stdout + proc.stderr
    assert 0 == proc.returncode, out
    assert "All checks held." in out
    assert "50/50 completed" in out
    assert int(_figure(r"Faults injected:\s+(\d+) process faults", out)) >= 20
    for kind in ("kill-save", "kill-upload", "server"):
        assert re.search(rf"\b{kind} [1-9]", out), f"no {kind} fault in:\n{out}"
    lost_max = int(_figure(r"max (\d+)", out))
    assert lost_max <= 3  # the checkpoint interval (--every, default 3)
    assert float(_figure(r"Goodput:\s+([\d.]+)%", out)) > 50


@pytest.mark.timeout(320)
def test_a_job_that_does_not_resume_fails_the_run(tmp_path: Path) -> None:
    """Jobs that ignore their checkpoint lose more than an interval: exit 1."""
    proc = _kelpie(
        "chaos",
        "--jobs",
        "4",
        "--workers",
        "2",
        "--faults",
        "4",
        "--seed",
        "3",
        "--storage-fail-rate",
        "0",
        "--sabotage",
        "no-resume",
        "--storage",
        str(tmp_path / "run"),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert 1 == proc.returncode, out
    assert "FAILED:" in out
    assert re.search(r"lost \d+ steps .*the checkpoint interval is 3", out), out


@pytest.mark.timeout(320)
def test_a_wrong_result_after_an_interruption_fails_the_run(tmp_path: Path) -> None:
    """An output that differs from the uninterrupted computation: exit 1."""
    proc = _kelpie(
        "chaos",
        "--jobs",
        "3",
        "--workers",
        "2",
        "--faults",
        "3",
        "--seed",
        "5",
        "--sabotage",
        "wrong-result",
        "--storage",
        str(tmp_path / "run"),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert 1 == proc.returncode, out
    assert "the output differs from an uninterrupted run" in out


@pytest.mark.timeout(320)
def test_demo_shows_jobs_finishing_while_machines_die(tmp_path: Path) -> None:
    """`kelpie demo`, small: a live table, faults, checked results, a summary, exit 0."""
    proc = _kelpie(
        "demo",
        "--jobs",
        "4",
        "--workers",
        "2",
        "--faults",
        "3",
        "--steps",
        "10",
        "--storage",
        str(tmp_path / "demo"),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert 0 == proc.returncode, out
    for column in ("Job", "Status", "Step", "Attempts", "Interruptions"):
        assert column in out
    assert "4/4 completed" in out
    assert "Goodput:" in out
    assert "Wall time:" in out
    assert "All checks held." in out


def test_demo_rejects_nonsense_sizes() -> None:
    """Zero workers is a usage error (exit 2), before anything starts."""
    proc = _kelpie("demo", "--workers", "0", timeout=60)
    assert 2 == proc.returncode
    assert "--workers must be at least 1" in proc.stderr


def test_fault_plan_mixes_every_kind() -> None:
    """Twenty faults include server restarts, mid-save and mid-upload kills."""
    import random

    plan = _plan_faults(20, random.Random(1))
    assert 20 == len(plan)
    assert {"kill": 9, "kill-save": 5, "kill-upload": 4, "server": 2} == {
        k: plan.count(k) for k in set(plan)
    }
    assert [] == _plan_faults(0, random.Random(1))
    assert ["kill"] == _plan_faults(1, random.Random(1))


def test_report_summarises_lost_work_and_failures() -> None:
    """Percentiles of lost work, goodput, and each failed check on its own line."""
    report = ChaosReport(
        jobs=2,
        completed=2,
        lost_steps=[0, 1, 2, 3],
        useful_steps=20,
        computed_steps=25,
        step_s=0.5,
        failures=["job-0001: broken"],
    )
    text = report.summary()
    assert "p50 1, p90 3, max 3" in text
    assert "Goodput:               80.0%" in text
    assert "6 steps (~3.0 s of compute)" in text
    assert "  - job-0001: broken" in text
    assert not report.ok
