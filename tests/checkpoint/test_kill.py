"""
Crash safety: a writer SIGKILLed at random instants never leaves a bad latest step.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kelpie_sdk.checkpoint import Checkpointer

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kelpie_sdk.checkpoint import Checkpointer

    def state_for(step):
        rng = np.random.default_rng(step)
        return {
            "frozen": np.arange(100_000, dtype=np.int64),
            "moving": rng.standard_normal(100_000),
            "meta": {"step": step, "tag": "s" * (step % 7)},
        }

    ckpt = Checkpointer(sys.argv[1], keep_last=3, chunk_size=64 * 1024)
    step = ckpt.latest_step() + 1
    print("ready", flush=True)
    while True:
        ckpt.save(state_for(step), step=step)
        step += 1
    """
)


def state_for(step: int) -> dict[str, object]:
    """The state the writer saves at ``step`` (same code as in WRITER)."""
    rng = np.random.default_rng(step)
    return {
        "frozen": np.arange(100_000, dtype=np.int64),
        "moving": rng.standard_normal(100_000),
        "meta": {"step": step, "tag": "s" * (step % 7)},
    }


@pytest.mark.slow
def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    """After each of 50 SIGKILLs the latest step is complete and loads exactly."""
    url = f"file://{tmp_path}/ckpt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    Checkpointer(url).save(state_for(0), step=0, blocking=True)
    rng = random.Random(1234)
    previous = 0
    for _ in range(50):
        proc = subprocess.Popen(
            [sys.executable, str(script), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        assert b"ready\n" == proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        reader = Checkpointer(url)
        latest = reader.latest_step()
        assert latest is not None
        assert latest >= previous
        loaded = reader.load(latest)
        expected = state_for(latest)
        np.testing.assert_array_equal(expected["frozen"], loaded["frozen"])
        np.testing.assert_array_equal(expected["moving"], loaded["moving"])
        assert expected["meta"] == loaded["meta"]
        previous = latest
        reader.close()
    # The writers made progress, so kills landed during real saves.
    assert previous >= 10
