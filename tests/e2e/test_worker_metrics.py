"""
The worker's Prometheus endpoint (--metrics-port) after a real job.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus

from .conftest import GROUP, StartWorker, StorageSetup, WorkerProc, wait_for

pytestmark = pytest.mark.slow


def _metrics_url(worker: WorkerProc) -> str | None:
    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", worker.log())
    return found.group(1) if found else None


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = requests.get(url, timeout=30)
    assert 200 == r.status_code
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_worker_metrics_show_a_job_run_and_the_bytes_it_moved(
    client: Client,
    start_worker: StartWorker,
    file_storage: StorageSetup,
    tmp_path: Path,
) -> None:
    """Inputs down, a checkpoint and outputs up: each shows on the worker's endpoint."""
    setup = file_storage
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(b"i" * 3000)
    setup.storage.upload_files([(src / "data.bin", "data.bin")], setup.bucket, "m/in/")
    worker = start_worker(storage_url=setup.url, KELPIE_METRICS_PORT="0")
    url = wait_for(lambda: _metrics_url(worker), timeout=30)
    script = (
        "import os, time\n"
        "assert os.path.getsize(os.path.join(os.environ['INPUT_DIR'], 'data.bin')) == 3000\n"
        "open(os.path.join(os.environ['CHECKPOINT_DIR'], 'ck.bin'), 'wb').write(b'c' * 5000)\n"
        "open(os.path.join(os.environ['OUTPUT_DIR'], 'out.bin'), 'wb').write(b'o' * 7000)\n"
        "time.sleep(2.5)\n"
    )
    job = client.submit_job(
        command=sys.executable,
        arguments=["-c", script],
        container_group_id=GROUP,
        input_bucket=setup.bucket,
        input_prefix="m/in/",
        checkpoint_bucket=setup.bucket,
        checkpoint_prefix="m/ckpt/",
        output_bucket=setup.bucket,
        output_prefix="m/out/",
        heartbeat_interval=1,
    )
    done = wait_for(
        lambda: (j := client.get_job(job.id)).status.finished and j, timeout=60
    )
    assert JobStatus.COMPLETED == done.status, done.last_error

    def counted() -> dict[Any, float] | None:
        samples = _scrape(url)
        finished = _value(samples, "kelpie_worker_jobs_total", outcome="completed")
        return samples if finished == 1 else None

    samples = wait_for(counted, timeout=30)
    assert 3000 == _value(
        samples,
        "kelpie_worker_transfer_bytes_total",
        direction="download",
        kind="input",
    )
    assert 7000 == _value(
        samples, "kelpie_worker_transfer_bytes_total", direction="upload", kind="output"
    )
    assert 5000 <= _value(
        samples,
        "kelpie_worker_transfer_bytes_total",
        direction="upload",
        kind="checkpoint",
    )
    uploads = sum(
        _value(samples, "kelpie_worker_checkpoint_upload_seconds_count", final=final)
        for final in ("true", "false")
    )
    assert uploads >= 1
    assert 1 == _value(samples, "kelpie_worker_claim_seconds_count", result="job")
    assert _value(samples, "kelpie_worker_heartbeats_total", result="ok") >= 1
    assert 0 == _value(samples, "kelpie_worker_jobs_running")


def test_worker_metrics_port_in_use_exits_2(
    start_worker: StartWorker,
) -> None:
    """A metrics port that cannot be bound is a configuration error, said clearly."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = start_worker(KELPIE_METRICS_PORT=str(port))
        assert 2 == worker.wait(timeout=60)
    assert "cannot serve the worker's metrics on 127.0.0.1:" in worker.log()
