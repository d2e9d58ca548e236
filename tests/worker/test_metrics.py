"""
The worker's metrics settings and hooks (the endpoint itself: tests/e2e).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.worker import WorkerConfig, build_parser, config_from_args
from kelpie_sdk.worker._metrics import WorkerMetrics

BASE = {"SALAD_CONTAINER_GROUP_ID": "cg", "SALAD_MACHINE_ID": "m1"}


def test_metrics_are_off_by_default_and_bind_loopback() -> None:
    """No port, no server; the address defaults to 127.0.0.1."""
    config = WorkerConfig.from_env(BASE)
    assert (None, "127.0.0.1") == (config.metrics_port, config.metrics_host)
    assert not WorkerMetrics.from_config(config).enabled


def test_metrics_settings_from_environment_and_flags() -> None:
    """KELPIE_METRICS_PORT/HOST are read; --metrics-port/--metrics-host win."""
    env = {**BASE, "KELPIE_METRICS_PORT": "9100", "KELPIE_METRICS_HOST": "10.1.2.3"}
    config = WorkerConfig.from_env(env)
    assert (9100, "10.1.2.3") == (config.metrics_port, config.metrics_host)
    args = build_parser().parse_args(["--metrics-port", "0", "--metrics-host", "::1"])
    config = config_from_args(args, env)
    assert (0, "::1") == (config.metrics_port, config.metrics_host)


@pytest.mark.parametrize("value", ["abc", "-1", "70000"])
def test_bad_metrics_ports_are_rejected(value: str) -> None:
    """A port that is not 0..65535 is a configuration error naming the setting."""
    with pytest.raises(ConfigError, match="KELPIE_METRICS_PORT"):
        WorkerConfig.from_env({**BASE, "KELPIE_METRICS_PORT": value})


def test_disabled_hooks_do_nothing() -> None:
    """With metrics off every hook is a no-op, and closing is harmless."""
    metrics = WorkerMetrics(enabled=False)
    metrics.note_job_started()
    metrics.note_job_finished("completed")
    metrics.note_bytes("download", "input", 10)
    metrics.note_checkpoint_upload(0.1, 10, final=True)
    metrics.note_claim(0.1, "job")
    metrics.note_heartbeat("ok")
    metrics.serve("127.0.0.1", 0)
    assert metrics.port is None
    metrics.close()


def test_enabled_hooks_count() -> None:
    """Each hook moves its own series."""
    metrics = WorkerMetrics(enabled=True)
    metrics.note_job_started()
    metrics.note_job_finished("failed")
    metrics.note_bytes("download", "input", 10)
    metrics.note_checkpoint_upload(0.2, 30, final=False)
    metrics.note_heartbeat("failed")
    get = metrics.registry.get_sample_value
    assert 1 == get("kelpie_worker_jobs_total", {"outcome": "failed"})
    assert 0 == get("kelpie_worker_jobs_total", {"outcome": "completed"})
    assert 0 == get("kelpie_worker_jobs_running")
    assert 10 == get(
        "kelpie_worker_transfer_bytes_total", {"direction": "download", "kind": "input"}
    )
    assert 30 == get(
        "kelpie_worker_transfer_bytes_total",
        {"direction": "upload", "kind": "checkpoint"},
    )
    assert 1 == get("kelpie_worker_checkpoint_upload_seconds_count", {"final": "false"})
    assert 1 == get("kelpie_worker_heartbeats_total", {"result": "failed"})


def test_client_checkpoint_and_idle_worker_do_not_import_prometheus_client() -> None:
    """prometheus_client is loaded only where metrics are served."""
    code = """
        import sys
        import kelpie_sdk.checkpoint, kelpie_sdk.client, kelpie_sdk.worker
        from kelpie_sdk.worker import Worker, WorkerConfig
        Worker(WorkerConfig.from_env({"SALAD_CONTAINER_GROUP_ID": "cg"}))
        print("prometheus_client" in sys.modules)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    assert "False" == result.stdout.strip(), result.stderr
