"""
The worker's Prometheus metrics, served on ``--metrics-port`` (off by default).

The agent calls the small ``note_*`` hooks below; with no port configured they
do nothing, and ``prometheus_client`` (the ``metrics`` extra) is not imported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kelpie_sdk.errors import ConfigError

if TYPE_CHECKING:
    from kelpie_sdk.worker._config import WorkerConfig

__all__ = ["WorkerMetrics"]

logger = logging.getLogger(__name__)

#: From a quick claim to a long poll held for its full 60 s.
_CLAIM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: From a small checkpoint to one of several gigabytes.
_UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """
    The worker's counters and histograms, and the HTTP server that shows them.

    Args:
        enabled: Count (and be able to serve); when false every hook is a no-op.

    Raises:
        ConfigError: Enabled, but ``prometheus_client`` is not installed.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.port: int | None = None
        self._server: Any = None
        self._thread: Any = None
        if not enabled:
            return
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise ConfigError(
                "--metrics-port (KELPIE_METRICS_PORT) needs prometheus_client; "
                "install kelpie-sdk[metrics]"
            ) from None
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._jobs = Counter(
            "kelpie_worker_jobs",
            "Jobs this worker ran to an end, by outcome",
            labelnames=["outcome"],
            registry=registry,
        )
        self._busy = Gauge(
            "kelpie_worker_jobs_running",
            "Jobs running on this worker now",
            registry=registry,
        )
        self._bytes = Counter(
            "kelpie_worker_transfer_bytes",
            "Bytes moved to and from storage (compressed sizes when compressing), "
            "by direction and kind",
            labelnames=["direction", "kind"],
            registry=registry,
        )
        self._uploads = Histogram(
            "kelpie_worker_checkpoint_upload_seconds",
            "Time to upload one checkpoint snapshot (periodic or final)",
            labelnames=["final"],
            buckets=_UPLOAD_BUCKETS,
            registry=registry,
        )
        self._claims = Histogram(
            "kelpie_worker_claim_seconds",
            "Time of one GET /work call (a long poll's includes its wait), by result",
            labelnames=["result"],
            buckets=_CLAIM_BUCKETS,
            registry=registry,
        )
        self._heartbeats = Counter(
            "kelpie_worker_heartbeats",
            "Heartbeats sent, by result: ok, lost (the job is not ours now), "
            "or failed (the API did not answer)",
            labelnames=["result"],
            registry=registry,
        )
        # Every label value from the start, so that rates have a zero to begin at.
        for outcome in ("completed", "failed", "released", "canceled", "unreported"):
            self._jobs.labels(outcome)
        for direction, kind in (
            ("download", "input"),
            ("upload", "output"),
            ("upload", "checkpoint"),
        ):
            self._bytes.labels(direction, kind)
        for result in ("ok", "lost", "failed"):
            self._heartbeats.labels(result)

    @classmethod
    def from_config(cls, config: WorkerConfig) -> WorkerMetrics:
        """
        Metrics that are enabled when the configuration names a port.
        """
        return cls(enabled=config.metrics_port is not None)

    # -- serving ----------------------------------------------------------------

    def serve(self, host: str, port: int) -> None:
        """
        Serve ``/metrics`` (any path, in fact) on ``host:port``; 0 picks a port.

        Raises:
            ConfigError: The address cannot be bound.
        """
        if not self.enabled:
            return
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the worker's metrics on {host}:{port} "
                f"(--metrics-host/--metrics-port): {exc}"
            ) from None
        self.port = int(self._server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """
        Stop serving.
        """
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- hooks -------------------------------------------------------------------

    def note_job_started(self) -> None:
        if self.enabled:
            self._busy.inc()

    def note_job_finished(self, outcome: str) -> None:
        if self.enabled:
            self._busy.dec()
            self._jobs.labels(outcome).inc()

    def note_bytes(self, direction: str, kind: str, count: int) -> None:
        if self.enabled:
            self._bytes.labels(direction, kind).inc(count)

    def note_checkpoint_upload(
        self, seconds: float, count: int, *, final: bool
    ) -> None:
        if self.enabled:
            self._uploads.labels("true" if final else "false").observe(seconds)
            self._bytes.labels("upload", "checkpoint").inc(count)

    def note_claim(self, seconds: float, result: str) -> None:
        if self.enabled:
            self._claims.labels(result).observe(seconds)

    def note_heartbeat(self, result: str) -> None:
        if self.enabled:
            self._heartbeats.labels(result).inc()
