"""
What a job is given: its checkpoint location and its directory variables.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk.models import Job, JobStatus, SyncSpec
from kelpie_sdk.worker._agent import Worker, _JobRun, _Slot
from kelpie_sdk.worker._config import WorkerConfig

LEGACY_DIRS = ("INPUT_DIR", "OUTPUT_DIR", "CHECKPOINT_DIR")


def _job(job_id: str, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": job_id,
        "user_id": "u",
        "status": JobStatus.RUNNING,
        "created": dt.datetime.now(dt.UTC),
        "command": "true",
        "container_group_id": "g",
        "attempt": 1,
        "sync": SyncSpec(),
    }
    values.update(fields)
    return Job(**values)


def _run(tmp_path: Path, storage_url: str, job: Job) -> _JobRun:
    config = WorkerConfig(
        machine_id="m",
        container_group_id="g",
        storage_url=storage_url,
        state_file=tmp_path / "home" / "state.json",
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
    )
    worker = Worker(config)
    run = _JobRun(_Slot(worker, config.slot(0)), job)
    run.plan = run.make_plan()
    return run


@pytest.fixture(autouse=True)
def _worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The worker itself runs with the legacy directory variables set."""
    for name in LEGACY_DIRS:
        monkeypatch.setenv(name, str(tmp_path / f"worker-{name}"))
    monkeypatch.delenv("KELPIE_CHECKPOINT_URL", raising=False)


def test_jobs_get_their_own_durable_checkpoint_location(tmp_path: Path) -> None:
    """With a storage root, each job gets <root>/kelpie-checkpoints/<job id>/."""
    root = f"file://{tmp_path}/store"
    urls = {
        _run(tmp_path, root, _job(i)).environment()["KELPIE_CHECKPOINT_URL"]
        for i in ("job-1", "job-2")
    }
    assert {
        f"file://{tmp_path}/store/kelpie-checkpoints/job-1/",
        f"file://{tmp_path}/store/kelpie-checkpoints/job-2/",
    } == urls
    run = _run(tmp_path, "s3://shared/kelpie", _job("job-3"))
    assert (
        "s3://shared/kelpie/kelpie-checkpoints/job-3/"
        == run.environment()["KELPIE_CHECKPOINT_URL"]
    )
    assert run.plan.checkpoint_warning is None


@pytest.mark.parametrize("storage_url", ["s3://", "memory://root", "file:///"])
def test_without_durable_storage_jobs_get_a_private_directory_and_a_warning(
    tmp_path: Path, storage_url: str
) -> None:
    """No durable root: a per-job directory on the node, and a warning that says so."""
    runs = [_run(tmp_path, storage_url, _job(i)) for i in ("job-1", "job-2")]
    urls = [r.environment()["KELPIE_CHECKPOINT_URL"] for r in runs]
    assert [
        (tmp_path / "home" / "kelpie-checkpoints" / i).as_uri()
        for i in ("job-1", "job-2")
    ] == urls
    warning = runs[0].plan.checkpoint_warning or ""
    assert "will not survive" in warning
    assert storage_url in warning


def test_job_ids_cannot_escape_the_checkpoint_directory(tmp_path: Path) -> None:
    """A job id is one path component, whatever it contains."""
    run = _run(tmp_path, "s3://", _job("../../etc"))
    assert run.plan.private_checkpoints is not None
    assert tmp_path / "home" / "kelpie-checkpoints" == (
        run.plan.private_checkpoints.parent
    )


def test_the_jobs_own_checkpoint_location_wins(tmp_path: Path) -> None:
    """A checkpoint prefix, or KELPIE_CHECKPOINT_URL in the job's environment, is kept."""
    root = f"file://{tmp_path}/store"
    legacy = _job(
        "job-1",
        sync=None,
        input_bucket="b",
        input_prefix="in/",
        checkpoint_bucket="b",
        checkpoint_prefix="ck/",
        output_bucket="b",
        output_prefix="out/",
    )
    assert (
        f"file://{tmp_path}/store/b/ck/"
        == _run(tmp_path, root, legacy).environment()["KELPIE_CHECKPOINT_URL"]
    )
    own = _job("job-2", environment={"KELPIE_CHECKPOINT_URL": "memory://mine"})
    run = _run(tmp_path, "s3://", own)
    assert "memory://mine" == run.environment()["KELPIE_CHECKPOINT_URL"]
    assert run.plan.checkpoint_warning is None


def test_sync_mode_jobs_get_no_directories_that_nobody_moves(tmp_path: Path) -> None:
    """INPUT_DIR, OUTPUT_DIR and CHECKPOINT_DIR are legacy-mode only."""
    root = f"file://{tmp_path}/store"
    env = _run(tmp_path, root, _job("job-1")).environment()
    assert not set(LEGACY_DIRS) & set(env)
    chosen = _job("job-2", environment={"OUTPUT_DIR": "/mine"})
    assert "/mine" == _run(tmp_path, root, chosen).environment()["OUTPUT_DIR"]
    legacy = _job(
        "job-3",
        sync=None,
        input_bucket="b",
        input_prefix="in/",
        checkpoint_bucket="b",
        checkpoint_prefix="ck/",
        output_bucket="b",
        output_prefix="out/",
    )
    env = _run(tmp_path, root, legacy).environment()
    assert [str(tmp_path / d) for d in ("in", "out", "ckpt")] == [
        env[name] for name in LEGACY_DIRS
    ]
