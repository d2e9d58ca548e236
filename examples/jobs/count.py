"""
A job that counts to COUNT_TO, one step every STEP_SECONDS, and survives
interruptions: it saves a checkpoint after every step with
``kelpie_sdk.checkpoint`` (to ``KELPIE_CHECKPOINT_URL``, which the worker sets)
and reports its progress, which ``kelpie jobs list`` shows.

When done it prints its state, the count and the step each attempt started
from, e.g. ``{"count": 30, "starts": [0, 12]}`` after one interruption at step
12, and writes it as ``result.json`` into ``RESULT_DIR`` (else ``OUTPUT_DIR``,
which legacy-mode jobs get) when one of them is set.

Submit it with, for example::

    kelpie submit --container-group-id local -- python examples/jobs/count.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kelpie_sdk import checkpoint


def main() -> None:
    total = int(os.environ.get("COUNT_TO", "20"))
    pause = float(os.environ.get("STEP_SECONDS", "0.2"))
    out = os.environ.get("RESULT_DIR") or os.environ.get("OUTPUT_DIR")

    ckpt = checkpoint.Checkpointer(every_steps=1, keep_last=2)
    start = ckpt.latest_step()
    if start is None:
        state = {"count": 0, "starts": []}
        start = 0
    else:
        state = ckpt.load()
    state["starts"].append(start)
    print(f"attempt {os.environ.get('KELPIE_ATTEMPT')}: starting at step {start}")

    for step in range(start, total):
        time.sleep(pause)  # one step of "work"
        state["count"] = step + 1
        if ckpt.should_save(step + 1):
            ckpt.save(state, step=step + 1, blocking=True)
        checkpoint.report_progress(step + 1, total, count=state["count"])
    ckpt.close()

    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(state))
    print(f"done: {json.dumps(state)}")


if __name__ == "__main__":
    main()
