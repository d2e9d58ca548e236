"""
The Monte Carlo and PyTorch examples run unchanged as jobs of ``kelpie worker``:
their worker is SIGKILLed mid-run, another worker resumes them, and the results are
bit-identical to uninterrupted runs.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kelpie_sdk import Client
from kelpie_sdk.models import Job, JobStatus
from kelpie_sdk.testing import run_server
from tests.examples.helpers import EXAMPLES, load_example, start_worker, stop_workers

GROUP = "examples"
BUCKET = "bkt"


def _sync(name: str, tmp_path: Path) -> dict[str, Any]:
    """Checkpoints to <name>/ckpt/ (KELPIE_CHECKPOINT_URL); outputs to <name>/out/."""
    return {
        "during": [
            {
                "bucket": BUCKET,
                "prefix": f"{name}/ckpt/",
                "local_path": str(tmp_path / f"{name}-ckpt"),
                "direction": "upload",
            }
        ],
        "after": [
            {
                "bucket": BUCKET,
                "prefix": f"{name}/out/",
                "local_path": str(tmp_path / f"{name}-out"),
                "direction": "upload",
            }
        ],
    }


def _wait(client: Client, job_id: str, done: Any, timeout: float = 90.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {job}")
        time.sleep(0.1)


def _step(job: Job) -> int:
    return int((job.progress or {}).get("step") or 0)


@pytest.mark.slow
def test_examples_survive_the_loss_of_their_worker(tmp_path: Path) -> None:
    """Both examples, killed with their worker, finish elsewhere with exact results."""
    mc = load_example("monte_carlo/monte_carlo.py")
    train = load_example("pytorch_training/train.py")
    mc_params = mc.Params(batches=40, paths_per_batch=20_000, seed=4)
    config = train.Config(epochs=3, samples=512, batch_size=32, seed=4)
    mc_expected = mc.dumps(mc.expected_result(mc_params))
    train_expected, weights = train.expected_result(config)
    store = tmp_path / "store"
    (store / BUCKET).mkdir(parents=True)
    with run_server() as server, Client(server.url, server.admin_key) as client:
        common = {
            "command": sys.executable,
            "container_group_id": GROUP,
            "heartbeat_interval": 1,
        }
        train_job = client.submit_job(
            arguments=[
                str(EXAMPLES / "pytorch_training" / "train.py"),
                "--epochs=3",
                "--samples=512",
                "--batch-size=32",
                "--seed=4",
                "--every=4",
                "--pause=0.1",
                f"--output={tmp_path / 'train-out'}",
            ],
            sync=_sync("train", tmp_path),
            **common,
        )
        workers = []
        try:
            start = functools.partial(
                start_worker,
                api_url=server.url,
                api_key=server.admin_key,
                group=GROUP,
                storage_url=f"file://{store}",
                slots=2,
            )
            workers.append(start(tmp_path / "a"))
            # Importing torch takes seconds: the Monte Carlo job goes in once the
            # training runs, so that the kill finds both in the middle.
            _wait(client, train_job.id, lambda j: _step(j) >= 2)
            mc_job = client.submit_job(
                arguments=[
                    str(EXAMPLES / "monte_carlo" / "monte_carlo.py"),
                    "--batches=40",
                    "--paths=20000",
                    "--seed=4",
                    "--every=4",
                    "--pause=0.08",
                    f"--output={tmp_path / 'mc-out'}",
                ],
                sync=_sync("mc", tmp_path),
                **common,
            )
            _wait(client, mc_job.id, lambda j: _step(j) >= 6)
            workers[0].kill()
            workers[0].wait(timeout=10)
            for job in (mc_job, train_job):
                now = client.get_job(job.id)
                assert JobStatus.RUNNING == now.status, f"too short a run: {now}"
            workers.append(start(tmp_path / "b"))
            finished = [
                _wait(client, job.id, lambda j: j.finished)
                for job in (mc_job, train_job)
            ]
        finally:
            stop_workers(workers)
    logs = "\n".join(
        p.read_text(errors="replace") for p in sorted(tmp_path.glob("*/worker.log"))
    )
    for job in finished:
        assert JobStatus.COMPLETED == job.status, (job, logs)
        assert 2 == job.attempt, (job, logs)
        assert 0 == job.num_failures, (job, logs)
    out = store / BUCKET
    assert mc_expected == (out / "mc" / "out" / "result.json").read_text()
    assert (
        train.dumps(train_expected)
        == (out / "train" / "out" / "result.json").read_text()
    )
    resumed = torch.load(out / "train" / "out" / "model.pt", weights_only=True)
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed[name]), name
    # The second attempts resumed from checkpoints, not from the start.
    mc_start = re.search(rf"\[{mc_job.id}\] starting at batch (\d+) .*attempt 2", logs)
    assert mc_start is not None, logs
    assert 4 <= int(mc_start[1]), logs
    train_start = re.search(
        rf"\[{train_job.id}\] starting at step (\d+) .*attempt 2", logs
    )
    assert train_start is not None, logs
    assert 4 <= int(train_start[1]), logs
