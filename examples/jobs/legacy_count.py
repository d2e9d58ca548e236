"""
An *unmodified legacy* Kelpie job: it knows nothing about kelpie_sdk.

It keeps its state in ``$CHECKPOINT_DIR/state.json`` (written to a temporary
dot-file and renamed, so the worker never uploads half a file), reads
``$INPUT_DIR/config.json`` for how far to count, and writes
``$OUTPUT_DIR/result.json`` at the end. The worker snapshots the checkpoint
directory to storage on every heartbeat and downloads it again on the next
attempt, so the job resumes where it left off.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def main() -> None:
    ckpt_dir = Path(os.environ["CHECKPOINT_DIR"])
    config = json.loads((Path(os.environ["INPUT_DIR"]) / "config.json").read_text())
    total, pause = int(config["count_to"]), float(config.get("step_seconds", 0.2))

    state_file = ckpt_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
    else:
        state = {"count": 0, "starts": []}
    state["starts"].append(state["count"])
    print(f"starting at {state['count']}", flush=True)

    while state["count"] < total:
        time.sleep(pause)
        state["count"] += 1
        tmp = ckpt_dir / ".state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)

    out = Path(os.environ["OUTPUT_DIR"]) / "result.json"
    out.write_text(json.dumps(state))
    print(f"done: {state}", flush=True)


if __name__ == "__main__":
    main()
