"""
The placement simulation (benchmarks/placement_sim.py) runs, is deterministic per
seed, and the policy only reorders claims: the same fleet, the same jobs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "placement_sim.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("placement_sim", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["placement_sim"] = module
    spec.loader.exec_module(module)
    return module


def test_same_seed_same_result_and_every_job_finishes() -> None:
    """A seed fixes the run; both runs finish the same jobs on the same fleet."""
    sim = _module()
    a = sim.simulate(3, policy=True, machines=12, jobs=120)
    assert a == sim.simulate(3, policy=True, machines=12, jobs=120)
    b = sim.simulate(3, policy=False, machines=12, jobs=120)
    assert (120.0, 120.0) == (a["finished"], b["finished"])
    assert a["lost_hours"] > 0
    assert b["lost_hours"] > 0
    assert a != b  # the policy changed who ran what


def test_flaky_rule_matches_the_server_defaults() -> None:
    """The simulated rule is the server's default one."""
    from kelpie_sdk.server import ReputationPolicy

    sim = _module()
    policy = ReputationPolicy()
    assert (
        policy.flaky_interruptions,
        policy.flaky_rate,
        policy.placement_window,
    ) == (sim.FLAKY_INTERRUPTIONS, sim.FLAKY_RATE, sim.WINDOW)


def test_the_script_writes_its_figures(tmp_path: Path) -> None:
    """The command prints both policies and writes the JSON summary."""
    out = tmp_path / "placement.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--seeds", "2", "--machines", "12",
         "--jobs", "120", "--json", str(out)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "lost compute with the policy" in run.stdout
    data = json.loads(out.read_text())
    assert {"fifo", "policy", "lost_change", "seeds_better"} <= set(data)
