# %% [markdown]
# # A 1,000-job parameter sweep
#
# Submit one Monte Carlo pricing job (``examples/monte_carlo``) per strike price and
# seed, in batches, then wait for all of them with a progress bar.
#
# The file is a notebook written as cells (``# %%``): run it top to bottom with
# ``python examples/batch_submit.py``, or cell by cell in an editor that knows the
# format (VS Code, PyCharm, Jupytext). ``examples/notebook.ipynb`` is the same in
# Jupyter. Settings come from the environment:
#
# | Variable | Default | Meaning |
# |---|---|---|
# | ``KELPIE_API_URL``, ``KELPIE_API_KEY`` | | the server, as for every client |
# | ``SWEEP_JOBS`` | 1000 | jobs in the sweep |
# | ``SWEEP_CONTAINER_GROUP`` | ``local`` | the queue (``kelpie up`` serves ``local``) |
# | ``SWEEP_BUCKET`` | ``local`` | bucket for checkpoints and results |
# | ``SWEEP_NAME`` | ``sweep-<time>`` | prefix of this sweep's objects |
# | ``SWEEP_COMMAND`` | the example | the command; each job adds its parameters |
# | ``SWEEP_BATCH_SIZE`` | 100 | jobs per submit request (at most 1000) |
# | ``SWEEP_TIMEOUT`` | 3600 | seconds to wait |
#
# With a local cluster (``kelpie up``) and its ``KELPIE_API_URL``/``KELPIE_API_KEY``
# exported, the defaults work as they are.

# %%
from __future__ import annotations

import collections
import itertools
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from kelpie_sdk import APIConnectionError, Client, Job, JobStatus

EXAMPLE = Path(__file__).resolve().parent / "monte_carlo" / "monte_carlo.py"
stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")

JOBS = int(os.environ.get("SWEEP_JOBS", "1000"))
GROUP = os.environ.get("SWEEP_CONTAINER_GROUP", "local")
BUCKET = os.environ.get("SWEEP_BUCKET", "local")
NAME = os.environ.get("SWEEP_NAME", f"sweep-{stamp}")
COMMAND = shlex.split(
    os.environ.get("SWEEP_COMMAND", f"{sys.executable} {EXAMPLE} --batches 20")
)
BATCH_SIZE = int(os.environ.get("SWEEP_BATCH_SIZE", "100"))
TIMEOUT = float(os.environ.get("SWEEP_TIMEOUT", "3600"))

# %% [markdown]
# ## The sweep
#
# 50 strike prices from 80 to 129, each with 20 seeds. Every job checkpoints to its
# own prefix (the worker passes it to the job as ``KELPIE_CHECKPOINT_URL``) and
# uploads the ``result.json`` it writes into its ``after`` directory.

# %%
strikes = [80 + k for k in range(50)]
seeds = range(20)
grid = list(itertools.islice(itertools.product(strikes, seeds), JOBS))
if len(grid) < JOBS:
    raise SystemExit(f"the grid has {len(grid)} points; set SWEEP_JOBS at most that")


def submission(index: int, strike: float, seed: int) -> dict[str, Any]:
    """
    The job for one point of the grid, as the API takes it.
    """
    # Directories on the worker; it empties them before and after the job.
    local = f"{tempfile.gettempdir()}/{NAME}/{index:04d}"
    return {
        "command": COMMAND[0],
        "arguments": [
            *COMMAND[1:],
            f"--strike={strike}",
            f"--seed={seed}",
            f"--output={local}/out",
        ],
        "container_group_id": GROUP,
        "sync": {
            "during": [
                {
                    "bucket": BUCKET,
                    "prefix": f"{NAME}/{index:04d}/ckpt/",
                    "local_path": f"{local}/ckpt",
                    "direction": "upload",
                }
            ],
            "after": [
                {
                    "bucket": BUCKET,
                    "prefix": f"{NAME}/{index:04d}/out/",
                    "local_path": f"{local}/out",
                    "direction": "upload",
                }
            ],
        },
    }


submissions = [submission(i, k, s) for i, (k, s) in enumerate(grid)]
print(f"{len(submissions)} jobs for container group {GROUP!r}, prefix {NAME}/")

# %% [markdown]
# ## Submit, in batches
#
# ``submit_jobs`` splits what it is given into requests of up to 1,000 jobs; each
# request is all or nothing. Smaller batches here show progress as they go.


# %%
def progress_bar() -> Progress:
    """
    A bar with the count done and the time taken.
    """
    return Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


client = Client()  # KELPIE_API_URL, KELPIE_API_KEY
jobs: list[Job] = []
with progress_bar() as progress:
    task = progress.add_task("submitting", total=len(submissions))
    for start in range(0, len(submissions), BATCH_SIZE):
        jobs += client.submit_jobs(submissions[start : start + BATCH_SIZE])
        progress.update(task, completed=len(jobs))

# %% [markdown]
# ## Wait, with a progress bar
#
# One request lists the container group's jobs (up to 1,000 a page) and counts ours
# that are finished (``completed``, ``failed`` or ``canceled``: these never change
# again). The jobs live in the server's database, so the loop simply waits while the
# server is unreachable. ``client.wait(jobs)`` would also wait, with one request per
# unfinished job and no progress on the way.


# %%
def finished_jobs(ids: set[str]) -> dict[str, Job]:
    """
    Our jobs that are finished now, by id.
    """
    listing = client.list_jobs(container_group_id=GROUP, page_size=1000, asc=True)
    return {job.id: job for job in listing if job.id in ids and job.finished}


ids = {job.id for job in jobs}
began = time.monotonic()
done: dict[str, Job] = {}
with progress_bar() as progress:
    task = progress.add_task("running", total=len(ids))
    while len(done) < len(ids):
        if time.monotonic() - began > TIMEOUT:
            raise SystemExit(
                f"{len(ids) - len(done)} jobs unfinished after {TIMEOUT} s"
            )
        time.sleep(0.5)
        try:
            done = finished_jobs(ids)
        except APIConnectionError:  # the server is restarting: keep waiting
            progress.update(task, description="no server")
            continue
        progress.update(task, completed=len(done), description="running")
elapsed = time.monotonic() - began
client.close()

# %% [markdown]
# ## Summary

# %%
by_status = collections.Counter(job.status.value for job in done.values())
interrupted = sum(job.num_interruptions or 0 for job in done.values())
print(
    f"{len(done)} jobs finished in {elapsed:.1f} s: "
    + ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    + f"; {interrupted} interruption(s) survived"
)
for job in [j for j in done.values() if j.status is not JobStatus.COMPLETED][:5]:
    print(f"  {job.id} {job.status.value}: {job.last_error}")
print(f"results: bucket {BUCKET!r}, prefix {NAME}/<index>/out/result.json")
if by_status.get("completed", 0) != len(ids):
    sys.exit(1)
