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
    # Each machine wrote its jobs' files on its own disk, never into another's.
    run = tmp_path / "run"
    assert not (run / "local").exists()
    machines = {p.parts[-3] for p in run.glob("workers/*/local/job-*")}
    assert len(machines) > 4  # the 4 first machines and their replacements


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
    assert re.search(r"Faults injected:\s+3 process faults", out), out
    assert "Goodput:" in out
    assert "Wall time:" in out
    assert "All checks held." in out


@pytest.mark.timeout(320)
def test_the_example_jobs_survive_faults(tmp_path: Path) -> None:
    """Monte Carlo and PyTorch jobs, killed also mid-save and mid-upload: all checks hold."""
    proc = _kelpie(
        "chaos",
        "--kinds",
        "monte_carlo,pytorch",
        "--jobs",
        "4",
        "--workers",
        "2",
        "--faults",
        "4",
        "--seed",
        "1",
        "--storage",
        str(tmp_path / "run"),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert 0 == proc.returncode, out
    assert "All checks held." in out
    assert "4/4 completed (monte_carlo 2, pytorch 2)" in out
    assert int(_figure(r"Faults injected:\s+(\d+) process faults", out)) >= 4
    assert re.search(r"\bkill-save [1-9]", out), out
    assert int(_figure(r"max (\d+)", out)) <= 3


# Without numpy and torch: what `pip install '.[all]'` alone gives.
_WITHOUT_EXTRAS = (
    "import sys; sys.modules.update(numpy=None, torch=None); "
    "from kelpie_sdk.cli import main; sys.exit(main())"
)


@pytest.mark.timeout(200)
def test_demo_without_numpy_and_torch_says_so_and_runs_the_pure_python_jobs(
    tmp_path: Path,
) -> None:
    """`--kinds all` skips the kinds whose extras are missing, with a note each."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_EXTRAS,
            *[
                "demo",
                "--jobs",
                "2",
                "--workers",
                "1",
                "--faults",
                "0",
                "--steps",
                "4",
                "--step-seconds",
                "0.1",
            ],
            *("--storage", str(tmp_path / "demo")),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert 0 == proc.returncode, out
    assert "Skipping job kind 'monte_carlo': it needs numpy (pip install numpy)." in out
    assert (
        "Skipping job kind 'pytorch': it needs torch and numpy "
        "(pip install torch numpy)." in out
    )
    assert "2/2 completed (sum 2)" in out
    assert "All checks held." in out


def test_chaos_refuses_a_named_kind_whose_extras_are_missing() -> None:
    """Naming a kind that cannot run here is a usage error (exit 2), up front."""
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, "chaos", "--kinds", "sum,pytorch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 2 == proc.returncode, proc.stdout + proc.stderr
    assert (
        "Error: job kind 'pytorch' cannot run here: it needs torch and numpy "
        "(pip install torch numpy); install them or choose other --kinds\n"
    ) in proc.stderr
    assert "" == proc.stdout


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


def test_report_counts_jobs_by_kind_and_shows_where_an_output_differs() -> None:
    """The jobs line says how many jobs of each kind ran; a wrong output, where."""
    from collections import Counter

    from kelpie_sdk.cli._chaos import _difference

    report = ChaosReport(jobs=3, completed=3, kinds=Counter(sum=2, pytorch=1))
    assert (
        "Jobs:                  3/3 completed (sum 2, pytorch 1)\n" in report.summary()
    )
    got, expected = '{"price": 7.125, "x": 1}', '{"price": 7.25, "x": 1}'
    assert "at character 12: '125, \"x\": 1}'... != '25, \"x\": 1}'..." == (
        _difference(got, expected)
    )
    assert "at character 2: ''... != 'c'..." == _difference("ab", "abc")


def _checked(
    tmp_path: Path, events: list[dict[str, object]], *, final: int, stored: int
) -> ChaosReport:
    """Run one job's checks on hand-made events (interval 3, 0.2 s steps)."""
    import json

    from rich.console import Console

    from kelpie_sdk.cli._chaos import ChaosConfig, _JobSpec, _Run

    run = _Run(ChaosConfig(every=3, step_s=0.2, heartbeat=1), tmp_path, Console())
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"result": "abc", "attempt": stored}))
    spec = _JobSpec("job-0000", "sum", {}, "abc", tmp_path / "events", result)
    report = ChaosReport()
    run._check_job(spec, final, events, report, 7.0, [])
    return report


def _steps(attempt: int, first: int, last: int, t0: float) -> list[dict[str, object]]:
    start = [{"e": "start", "a": attempt, "t": t0, "step": first - 1}]
    return start + [
        {"e": "step", "a": attempt, "t": t0 + 0.2 * i, "step": s}
        for i, s in enumerate(range(first, last + 1), 1)
    ]


def test_checks_measure_lost_work_against_the_next_attempt(tmp_path: Path) -> None:
    """Steps redone after a resume are lost work; more than an interval fails."""
    done = [{"e": "done", "a": 2, "t": 99.0}]
    ok = _checked(
        tmp_path,
        _steps(1, 1, 8, 0.0) + _steps(2, 7, 12, 10.0) + done,
        final=2,
        stored=2,
    )
    assert [2] == ok.lost_steps
    assert [] == ok.failures
    assert 14 == ok.computed_steps
    bad = _checked(
        tmp_path,
        _steps(1, 1, 8, 0.0) + _steps(2, 1, 12, 10.0) + done,
        final=2,
        stored=2,
    )
    assert [8] == bad.lost_steps
    assert [
        "job-0000: attempt 1 lost 8 steps (it reached step 8, attempt 2 resumed "
        "from step 0); the checkpoint interval is 3"
    ] == bad.failures


def test_checks_allow_work_lost_while_the_old_holder_learns_it(tmp_path: Path) -> None:
    """Steps an old attempt computed after the next one started count as detection."""
    done = [{"e": "done", "a": 2, "t": 99.0}]
    # Attempt 2 starts at t=1.0 from step 3; attempt 1 runs on until step 9 (t=1.8).
    report = _checked(
        tmp_path, _steps(1, 1, 9, 0.0) + _steps(2, 4, 10, 1.0) + done, final=2, stored=2
    )
    assert [6] == report.lost_steps
    assert [] == report.failures


def test_checks_catch_corruption_and_a_stale_output(tmp_path: Path) -> None:
    """A corrupt load, an output from another attempt and a late attempt all fail."""
    events = [
        *_steps(1, 1, 3, 0.0),
        {"e": "corrupt", "a": 2, "t": 5.0, "step": 3},
        *_steps(3, 4, 6, 6.0),
        {"e": "done", "a": 3, "t": 9.0},
        {"e": "start", "a": 4, "t": 10.0, "step": 6},
    ]
    report = _checked(tmp_path, events, final=3, stored=2)
    text = "\n".join(report.failures)
    assert "attempt 2 read back a bad checkpoint (corrupt at step 3)" in text
    assert "the stored output is from attempt 2, but attempt 3 completed" in text
    assert "attempts [4] ran after attempt 3 completed" in text


def test_a_failed_check_shows_what_each_attempt_of_the_job_did() -> None:
    """One line per attempt: machine, start, saves, first and last step, done."""
    from kelpie_sdk.cli._chaos import _timeline

    events = [
        {"e": "start", "a": 1, "m": "chaos-0-1", "t": 100.0, "step": 0},
        {"e": "step", "a": 1, "m": "chaos-0-1", "t": 100.2, "step": 1},
        {"e": "step", "a": 1, "m": "chaos-0-1", "t": 100.6, "step": 3},
        {"e": "saved", "a": 1, "m": "chaos-0-1", "t": 100.7, "step": 3},
        {"e": "start", "a": 2, "m": "chaos-1-5", "t": 104.0, "step": 3},
        {"e": "done", "a": 2, "m": "chaos-1-5", "t": 105.5},
    ]
    assert [
        "job-0003 attempt 1 on chaos-0-1: start 0 @10.0s; saved 3 @10.7s; "
        "steps 1-3 @10.2-10.6s",
        "job-0003 attempt 2 on chaos-1-5: start 3 @14.0s; done @15.5s",
    ] == _timeline("job-0003", events, 90.0)
    report = ChaosReport(failures=["job-0003: broken"], timelines=["line a"])
    assert "What the attempts of those jobs did:\n  line a" in report.summary()
