"""
The worker end to end: real server, workers as subprocesses, real storage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kelpie_sdk.client import Client
from kelpie_sdk.models import Job, JobStatus, SyncConfig, SyncDirection, SyncSpec
from kelpie_sdk.worker import EXIT_IDLE, EXIT_MAX_FAILURES

from .conftest import EXAMPLES, GROUP, StartWorker, StorageSetup, wait_for

pytestmark = pytest.mark.slow

PY = sys.executable


def _finished(client: Client, job_id: str) -> Job | None:
    job = client.get_job(job_id)
    return job if job.status.finished else None


def _read(setup: StorageSetup, key: str) -> bytes | None:
    """One object's bytes, or None if it is not there."""
    prefix, _, rel = key.rpartition("/")
    if rel not in dict(setup.storage.list(setup.bucket, prefix + "/")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        setup.storage.download_prefix(
            setup.bucket, prefix + "/", tmp, pattern=f"^{re.escape(rel)}$"
        )
        return (Path(tmp) / rel).read_bytes()


def test_job_without_storage_completes(
    client: Client, start_worker: StartWorker
) -> None:
    """A `"sync": {}` job just runs its command and is reported completed."""
    start_worker()
    job = client.submit_job(
        command=PY,
        arguments=["-c", "print('hello from the job')"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    done = wait_for(lambda: _finished(client, job.id))
    assert JobStatus.COMPLETED == done.status
    assert (0, 1) == (done.num_failures, done.attempt)


def test_sigkilled_worker_job_resumes_elsewhere(
    client: Client, start_worker: StartWorker, storage: StorageSetup, tmp_path: Path
) -> None:
    """A worker killed mid-job: another resumes from the last checkpoint and finishes."""
    sync = SyncSpec(
        during=[
            SyncConfig(
                bucket=storage.bucket,
                prefix="count/ckpt/",
                local_path=str(tmp_path / "unused-ckpt"),
                direction=SyncDirection.UPLOAD,
            )
        ],
        after=[
            SyncConfig(
                bucket=storage.bucket,
                prefix="count/out/",
                local_path=str(tmp_path / "result"),
                direction=SyncDirection.UPLOAD,
            )
        ],
    )
    first = start_worker("a", storage_url=storage.url)
    job = client.submit_job(
        command=PY,
        arguments=[str(EXAMPLES / "count.py")],
        environment={
            "COUNT_TO": "24",
            "STEP_SECONDS": "0.15",
            "RESULT_DIR": str(tmp_path / "result"),
        },
        container_group_id=GROUP,
        sync=sync,
        heartbeat_interval=1,
    )

    def progressed() -> bool:
        progress = client.get_job(job.id).progress or {}
        return int(progress.get("step") or 0) >= 6

    wait_for(progressed)
    first.kill()
    start_worker("b", storage_url=storage.url)
    done = wait_for(lambda: _finished(client, job.id), timeout=60)
    assert JobStatus.COMPLETED == done.status
    assert 0 == done.num_failures
    assert 2 == done.attempt
    result = json.loads(_read(storage, "count/out/result.json") or b"null")
    assert 24 == result["count"]
    assert 2 == len(result["starts"])
    assert result["starts"][1] >= 6


def test_legacy_job_resumes_from_checkpoint_dir(
    client: Client, start_worker: StartWorker, storage: StorageSetup, tmp_path: Path
) -> None:
    """A job that only writes CHECKPOINT_DIR resumes after its worker is killed."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"count_to": 24, "step_seconds": 0.15}))
    storage.storage.upload_files(
        [(config, "config.json")], storage.bucket, "legacy/in/"
    )
    first = start_worker("a", storage_url=storage.url)
    job = client.submit_job(
        command=PY,
        arguments=[str(EXAMPLES / "legacy_count.py")],
        container_group_id=GROUP,
        input_bucket=storage.bucket,
        input_prefix="legacy/in/",
        checkpoint_bucket=storage.bucket,
        checkpoint_prefix="legacy/ckpt/",
        output_bucket=storage.bucket,
        output_prefix="legacy/out/",
        heartbeat_interval=1,
    )

    def checkpointed() -> bool:
        data = _read(storage, "legacy/ckpt/state.json")
        return data is not None and json.loads(data)["count"] >= 6

    wait_for(checkpointed)
    first.kill()
    start_worker("b", storage_url=storage.url)
    done = wait_for(lambda: _finished(client, job.id), timeout=60)
    assert JobStatus.COMPLETED == done.status
    result = json.loads(_read(storage, "legacy/out/result.json") or b"null")
    assert 24 == result["count"]
    assert 2 == len(result["starts"])
    assert result["starts"][1] >= 6


def test_cancel_stops_the_job_within_one_heartbeat(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """After a cancel the job's process is gone within one heartbeat interval."""
    pidfile = tmp_path / "pid"
    start_worker()
    script = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
        "time.sleep(120)"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=2,
    )
    wait_for(lambda: pidfile.exists() and pidfile.read_text())
    pid = int(pidfile.read_text())
    canceled_at = time.monotonic()
    client.cancel(job.id)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=10)
    assert time.monotonic() - canceled_at < 2 + 1.0
    assert JobStatus.CANCELED == client.get_job(job.id).status


def test_outputs_are_in_storage_before_completed_is_visible(
    client: Client, start_worker: StartWorker, storage: StorageSetup
) -> None:
    """Whenever the job reads completed, its (large) output is already stored."""
    start_worker(storage_url=storage.url)
    script = (
        "import os; p = os.path.join(os.environ['OUTPUT_DIR'], 'big.bin'); "
        "open(p, 'wb').write(os.urandom(8 * 1024 * 1024))"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        input_bucket=storage.bucket,
        input_prefix="out-test/in/",
        checkpoint_bucket=storage.bucket,
        checkpoint_prefix="out-test/ckpt/",
        output_bucket=storage.bucket,
        output_prefix="out-test/out/",
        heartbeat_interval=1,
    )
    seen: list[JobStatus] = []

    def completed_and_checked() -> bool:
        status = client.get_job(job.id).status
        seen.append(status)
        if status is JobStatus.COMPLETED:
            listing = dict(storage.storage.list(storage.bucket, "out-test/out/"))
            assert 8 * 1024 * 1024 == listing.get("big.bin")
            return True
        assert not status.finished, status
        return False

    wait_for(completed_and_checked, timeout=60, interval=0.01)
    assert JobStatus.RUNNING in seen


def test_failures_are_counted_and_machines_banned(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Each failure bans its machine; at max_failures the job is failed."""
    runs = tmp_path / "runs.txt"
    script = (
        "import os, sys; "
        f"open({str(runs)!r}, 'a').write(os.environ['SALAD_MACHINE_ID'] + '\\n'); "
        "print('something broke', file=sys.stderr); sys.exit(3)"
    )
    start_worker("a")
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        max_failures=2,
        heartbeat_interval=1,
    )
    first = wait_for(lambda: (j := client.get_job(job.id)).num_failures == 1 and j)
    assert JobStatus.PENDING == first.status
    assert "exit code 3" in (first.last_error or "")
    assert "something broke" in (first.last_error or "")
    time.sleep(1.5)  # machine a is banned: it must not take the job again
    assert ["machine-a"] == runs.read_text().split()
    start_worker("b")
    done = wait_for(lambda: _finished(client, job.id))
    assert JobStatus.FAILED == done.status
    assert 2 == done.num_failures
    assert ["machine-a", "machine-b"] == runs.read_text().split()


def test_worker_restart_releases_its_job_at_once(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A restarted worker hands back the job its state file names, without waiting."""
    starts = tmp_path / "starts.txt"
    script = (
        f"import os, time; open({str(starts)!r}, 'a').write("
        "os.environ['KELPIE_ATTEMPT'] + '\\n'); time.sleep(120)"
    )
    first = start_worker("a")
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=60,  # the lease alone would hold the job for 2 minutes
    )
    wait_for(lambda: starts.exists() and starts.read_text())
    first.kill()
    restarted_at = time.monotonic()
    start_worker("a", home=first.home)
    wait_for(lambda: starts.read_text().split() == ["1", "2"], timeout=30)
    assert time.monotonic() - restarted_at < 15
    again = client.get_job(job.id)
    assert (JobStatus.RUNNING, 2, 0) == (
        again.status,
        again.attempt,
        again.num_failures,
    )
    assert 1 == again.num_interruptions


def test_exit_85_reschedules_without_a_failure(
    client: Client, start_worker: StartWorker
) -> None:
    """Exit code 85 releases the job; it is retried and not counted as failed."""
    start_worker()
    script = (
        "import os, sys; sys.exit(85 if os.environ['KELPIE_ATTEMPT'] == '1' else 0)"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        max_failures=1,
        heartbeat_interval=1,
    )
    done = wait_for(lambda: _finished(client, job.id))
    assert (JobStatus.COMPLETED, 0, 2) == (done.status, done.num_failures, done.attempt)


def test_sigterm_to_worker_releases_the_job(
    client: Client, start_worker: StartWorker, storage: StorageSetup
) -> None:
    """SIGTERM: the job gets SIGTERM, its last checkpoint is stored, it is released."""
    worker = start_worker(storage_url=storage.url, KELPIE_KILL_GRACE_S="5")
    storage.storage.upload_files(
        [(EXAMPLES / "count.py", "x.py")], storage.bucket, "term/in/"
    )
    script = (
        "import os, signal, sys, time\n"
        "def bye(*a):\n"
        "    open(os.path.join(os.environ['CHECKPOINT_DIR'], 'last.txt'), 'w')"
        ".write('saved on SIGTERM')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "open(os.path.join(os.environ['OUTPUT_DIR'], 'started'), 'w').write('x')\n"
        "time.sleep(120)\n"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        input_bucket=storage.bucket,
        input_prefix="term/in/",
        checkpoint_bucket=storage.bucket,
        checkpoint_prefix="term/ckpt/",
        output_bucket=storage.bucket,
        output_prefix="term/out/",
        heartbeat_interval=30,
    )
    wait_for(lambda: (worker.home / "output" / "started").exists())
    worker.terminate()
    assert 0 == worker.wait(timeout=30)
    after = client.get_job(job.id)
    assert (JobStatus.PENDING, 0) == (after.status, after.num_failures)
    assert b"saved on SIGTERM" == _read(storage, "term/ckpt/last.txt")
    assert [] == storage.storage.list(storage.bucket, "term/out/")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"command": "/no/such/program"}, "command not found"),
        ({"input_bucket": "no-such-bucket"}, "could not be downloaded"),
    ],
    ids=["missing-command", "missing-bucket"],
)
def test_bad_jobs_fail_clearly_and_the_worker_goes_on(
    client: Client,
    start_worker: StartWorker,
    file_storage: StorageSetup,
    kwargs: dict[str, str],
    message: str,
) -> None:
    """A bad job fails with a clear reason, and the next job still runs."""
    setup = file_storage
    setup.storage.upload_files(
        [(EXAMPLES / "count.py", "x.py")], setup.bucket, "good/in/"
    )
    start_worker(storage_url=setup.url)
    fields = {
        "command": PY,
        "input_bucket": setup.bucket,
        "input_prefix": "good/in/",
        "checkpoint_bucket": setup.bucket,
        "checkpoint_prefix": "c/",
        "output_bucket": setup.bucket,
        "output_prefix": "o/",
        **kwargs,
    }
    bad = client.submit_job(
        arguments=["-c", "print('never')"],
        container_group_id=GROUP,
        max_failures=1,
        heartbeat_interval=1,
        **fields,  # type: ignore[arg-type]
    )
    good = client.submit_job(
        command=PY,
        arguments=["-c", "pass"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    failed = wait_for(lambda: _finished(client, bad.id))
    assert JobStatus.FAILED == failed.status
    assert message in (failed.last_error or "")
    assert JobStatus.COMPLETED == wait_for(lambda: _finished(client, good.id)).status


def test_empty_input_prefix_runs_the_command_with_a_warning(
    client: Client, start_worker: StartWorker, file_storage: StorageSetup
) -> None:
    """A legacy job with no input objects runs (Monte Carlo jobs have none)."""
    setup = file_storage
    worker = start_worker(storage_url=setup.url)
    script = (
        "import os; open(os.path.join(os.environ['OUTPUT_DIR'], 'n.txt'), 'w')"
        ".write(str(len(os.listdir(os.environ['INPUT_DIR']))))"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        input_bucket=setup.bucket,
        input_prefix="nothing-here/",
        checkpoint_bucket=setup.bucket,
        checkpoint_prefix="mc/ckpt/",
        output_bucket=setup.bucket,
        output_prefix="mc/out/",
        heartbeat_interval=1,
    )
    done = wait_for(lambda: _finished(client, job.id))
    assert (JobStatus.COMPLETED, None) == (done.status, done.last_error)
    assert b"0" == _read(setup, "mc/out/n.txt")
    assert "nothing-here/ is empty; running the command without inputs" in (
        worker.log()
    )


def test_checkpoints_that_will_not_survive_the_node_are_announced(
    client: Client, start_worker: StartWorker
) -> None:
    """Without durable storage the job's last_error and the log say so while it runs."""
    worker = start_worker(storage_url="memory://nowhere")
    job = client.submit_job(
        command=PY,
        arguments=["-c", "import time; time.sleep(60)"],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    running = wait_for(
        lambda: (j := client.get_job(job.id)).last_error and j, timeout=30
    )
    assert JobStatus.RUNNING == running.status
    assert "will not survive the loss of the node" in (running.last_error or "")
    assert "will not survive the loss of the node" in worker.log()
    private = worker.home / "kelpie-checkpoints" / job.id
    assert private.is_dir()
    client.cancel(job.id)
    # The job cannot come back to this node: its directory goes.
    wait_for(lambda: not private.exists(), timeout=30)


def test_wrong_api_key_exits_2_at_start(start_worker: StartWorker) -> None:
    """A key the server refuses stops the worker with one clear line."""
    worker = start_worker(KELPIE_API_KEY="not-the-key")
    assert 2 == worker.wait(timeout=30)
    errors = [line for line in worker.log().splitlines() if " ERROR " in line]
    assert 1 == len(errors), errors
    assert "refused this worker's credentials" in errors[0]


def test_misspelled_storage_url_exits_2_at_start(start_worker: StartWorker) -> None:
    """An unknown storage protocol stops the worker before it claims anything."""
    worker = start_worker(storage_url="fiel:///tmp/x")
    assert 2 == worker.wait(timeout=30)
    assert "unknown protocol 'fiel://'" in worker.log()


def test_progress_reaches_the_server(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """The record report_progress writes travels with the heartbeats."""
    start_worker()
    script = (
        "import time\nfrom kelpie_sdk import checkpoint\n"
        "checkpoint.report_progress(3, 10, loss=0.5)\ntime.sleep(30)\n"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
    )
    progress = wait_for(lambda: client.get_job(job.id).progress)
    assert (3, 10, {"loss": 0.5}) == (
        progress["step"],
        progress["total"],
        progress["metrics"],
    )
    client.cancel(job.id)


def test_max_job_failures_exits_with_its_code(
    client: Client, start_worker: StartWorker
) -> None:
    """After MAX_JOB_FAILURES failures the worker exits 3 for replacement."""
    worker = start_worker(MAX_JOB_FAILURES="2")
    for _ in range(3):
        client.submit_job(
            command=PY,
            arguments=["-c", "raise SystemExit(1)"],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=1,
        )
    assert EXIT_MAX_FAILURES == worker.wait(timeout=60)
    pending = [j for j in client.list_jobs() if j.status is JobStatus.PENDING]
    assert 1 <= len(pending)


def test_idle_limit_exits_with_its_code(start_worker: StartWorker) -> None:
    """With MAX_TIME_WITH_NO_WORK_S set, an idle worker exits 4."""
    worker = start_worker(MAX_TIME_WITH_NO_WORK_S="1", KELPIE_LONG_POLL_S="0.5")
    started = time.monotonic()
    assert EXIT_IDLE == worker.wait(timeout=30)
    assert time.monotonic() - started < 15


def test_idle_limit_shortens_the_long_poll(start_worker: StartWorker) -> None:
    """The idle limit is kept even when it is shorter than the long poll."""
    worker = start_worker(MAX_TIME_WITH_NO_WORK_S="2", KELPIE_LONG_POLL_S="30")
    started = time.monotonic()
    assert EXIT_IDLE == worker.wait(timeout=60)
    # Python start-up and the first claim included; the long poll alone is 30 s.
    assert time.monotonic() - started < 15


def test_slots_run_jobs_side_by_side_with_their_own_gpus(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Two slots run two jobs at once, each with its own directories and GPU."""
    seen = tmp_path / "seen"
    seen.mkdir()
    start_worker(KELPIE_SLOTS="2", KELPIE_SLOT_GPUS="3,5")
    script = (
        "import json, os, time\n"
        "start = time.time(); time.sleep(1.5)\n"
        f"path = os.path.join({str(seen)!r}, os.environ['KELPIE_JOB_ID'])\n"
        "json.dump({'gpu': os.environ['CUDA_VISIBLE_DEVICES'], "
        "'ckpt': os.environ['KELPIE_CHECKPOINT_URL'], "
        "'state': os.environ['KELPIE_STATE_FILE'], "
        "'start': start, 'end': time.time()}, open(path, 'w'))\n"
    )
    jobs = [
        client.submit_job(
            command=PY,
            arguments=["-c", script],
            container_group_id=GROUP,
            sync={},
            heartbeat_interval=1,
        )
        for _ in range(2)
    ]
    for job in jobs:
        assert (
            JobStatus.COMPLETED
            == wait_for(lambda j=job: _finished(client, j.id)).status
        )
    runs = [json.loads((seen / j.id).read_text()) for j in jobs]
    assert {"3", "5"} == {r["gpu"] for r in runs}
    assert 2 == len({r["ckpt"] for r in runs})
    assert 2 == len({r["state"] for r in runs})
    first, second = sorted(runs, key=lambda r: r["start"])
    assert second["start"] < first["end"]


@pytest.mark.s3
def test_missing_storage_credentials_fail_the_job(
    client: Client, start_worker: StartWorker, s3_storage: StorageSetup
) -> None:
    """A worker without S3 credentials fails the job with a clear reason; no run."""
    setup = s3_storage
    setup.storage.upload_files([(EXAMPLES / "count.py", "x.py")], setup.bucket, "in/")
    start_worker(
        storage_url=setup.url,
        unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_EC2_METADATA_DISABLED="true",
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", "print('never')"],
        container_group_id=GROUP,
        input_bucket=setup.bucket,
        input_prefix="in/",
        checkpoint_bucket=setup.bucket,
        checkpoint_prefix="ck/",
        output_bucket=setup.bucket,
        output_prefix="out/",
        max_failures=1,
        heartbeat_interval=1,
    )
    failed = wait_for(lambda: _finished(client, job.id))
    assert JobStatus.FAILED == failed.status
    assert "no storage credentials" in (failed.last_error or "")


@pytest.mark.s3
def test_output_upload_failure_is_not_completed(
    client: Client, start_worker: StartWorker, s3_storage: StorageSetup
) -> None:
    """Exit 0 but the outputs cannot be stored: the job fails, never completes."""
    setup = s3_storage
    setup.storage.upload_files([(EXAMPLES / "count.py", "x.py")], setup.bucket, "in/")
    start_worker(storage_url=setup.url)
    script = (
        "import os; open(os.path.join(os.environ['OUTPUT_DIR'], 'r.txt'), 'w')"
        ".write('result')"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        input_bucket=setup.bucket,
        input_prefix="in/",
        checkpoint_bucket=setup.bucket,
        checkpoint_prefix="ck/",
        output_bucket="no-such-bucket-for-outputs",
        output_prefix="out/",
        max_failures=1,
        heartbeat_interval=1,
    )
    failed = wait_for(lambda: _finished(client, job.id))
    assert JobStatus.FAILED == failed.status
    assert "outputs could not be uploaded" in (failed.last_error or "")


def test_sync_patterns_and_compression(
    client: Client,
    start_worker: StartWorker,
    file_storage: StorageSetup,
    tmp_path: Path,
) -> None:
    """`before` honours its pattern; with compression, .gz in and out."""
    setup = file_storage
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    (src / "b.bin").write_text("beta")
    setup.storage.upload_files(
        [(src / "a.txt", "a.txt"), (src / "b.bin", "b.bin")],
        setup.bucket,
        "sync/in/",
        compress=True,
    )
    start_worker(storage_url=setup.url)
    inp, out = tmp_path / "job-in", tmp_path / "job-out"
    script = (
        "import os, sys\n"
        f"names = sorted(os.listdir({str(inp)!r}))\n"
        f"data = open(os.path.join({str(inp)!r}, 'a.txt')).read()\n"
        f"open(os.path.join({str(out)!r}, 'res.txt'), 'w').write(','.join(names) + ':' + data)\n"
    )
    sync = SyncSpec(
        before=[
            SyncConfig(
                bucket=setup.bucket,
                prefix="sync/in/",
                local_path=str(inp),
                direction=SyncDirection.DOWNLOAD,
                pattern=r"\.txt(\.gz)?$",
            )
        ],
        after=[
            SyncConfig(
                bucket=setup.bucket,
                prefix="sync/out/",
                local_path=str(out),
                direction=SyncDirection.UPLOAD,
            )
        ],
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync=sync,
        compression=True,
        heartbeat_interval=1,
    )
    done = wait_for(lambda: _finished(client, job.id))
    assert JobStatus.COMPLETED == done.status, done.last_error
    assert ["res.txt.gz"] == [
        k for k, _ in setup.storage.list(setup.bucket, "sync/out/")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        setup.storage.download_prefix(setup.bucket, "sync/out/", tmp, decompress=True)
        assert "a.txt:alpha" == (Path(tmp) / "res.txt").read_text()


def test_progress_is_visible_within_seconds_with_30s_heartbeats(
    client: Client, start_worker: StartWorker
) -> None:
    """A progress record reaches GET /jobs/{id} within about 2 s, long before the next 30 s heartbeat."""
    start_worker()
    script = (
        "import time\nfrom kelpie_sdk import checkpoint\n"
        "time.sleep(3)\n"
        "checkpoint.report_progress(1, 10, written_at=time.time())\n"
        "time.sleep(120)\n"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=30,
    )
    progress = wait_for(lambda: client.get_job(job.id).progress, timeout=20)
    latency = time.time() - progress["metrics"]["written_at"]
    assert 1 == progress["step"]
    # About 2 s on a quiet machine; the margin is for loaded CI machines.
    assert latency < 2 + 3.0
    client.cancel(job.id)


def test_cancel_stops_the_job_within_seconds_with_30s_heartbeats(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A cancel reaches the worker through its long poll: the process is gone within about 2 s, not at the next 30 s heartbeat."""
    pidfile = tmp_path / "pid"
    start_worker()
    script = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
        "time.sleep(120)"
    )
    job = client.submit_job(
        command=PY,
        arguments=["-c", script],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=30,
    )
    wait_for(lambda: pidfile.exists() and pidfile.read_text())
    pid = int(pidfile.read_text())
    time.sleep(1.0)  # past the first heartbeat, sent as the job starts
    canceled_at = time.monotonic()
    client.cancel(job.id)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=20)
    # About 2 s on a quiet machine; the margin is for loaded CI machines.
    assert time.monotonic() - canceled_at < 2 + 3.0
    assert JobStatus.CANCELED == client.get_job(job.id).status


def test_sigusr1_stops_claiming_and_lets_the_job_finish(
    client: Client, start_worker: StartWorker, tmp_path: Path
) -> None:
    """SIGUSR1: the running job finishes, no other job is claimed, the worker exits 0."""
    marker = tmp_path / "claims-stopped"
    worker = start_worker(KELPIE_CLAIMS_STOPPED_FILE=str(marker), KELPIE_SLOTS="2")
    go = tmp_path / "go"
    script = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.05)\n"
    )
    first = client.submit_job(
        command=PY, arguments=["-c", script], container_group_id=GROUP, sync={}
    )
    wait_for(lambda: client.get_job(first.id).status is JobStatus.RUNNING)
    time.sleep(0.5)  # the idle slot is back in its long poll
    worker.popen.send_signal(signal.SIGUSR1)
    wait_for(marker.exists, timeout=30)
    second = client.submit_job(
        command=PY, arguments=["-c", "pass"], container_group_id=GROUP, sync={}
    )
    go.write_text("x")
    assert 0 == worker.wait(timeout=60)
    assert JobStatus.COMPLETED == client.get_job(first.id).status
    after = client.get_job(second.id)
    assert (JobStatus.PENDING, 0) == (after.status, after.attempt)
    assert "stopped claiming" in worker.log()
