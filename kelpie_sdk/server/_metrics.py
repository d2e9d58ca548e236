"""
The server's Prometheus metrics: ``GET /metrics``.

Counters and histograms live in memory, per server process: with several
processes behind one database, each counts what it handled and a scraper sums
them. The number of jobs by status is read from the database at scrape time,
so every process reports the same totals.

Webhooks are not delivered yet; their deliveries belong here once they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import sqlalchemy as sa
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kelpie_sdk.models import JobStatus
from kelpie_sdk.server._db import JOBS, USERS

__all__ = ["METRICS_PATH", "MetricsMiddleware", "ServerMetrics"]

#: Where the metrics are served.
METRICS_PATH = "/metrics"

#: Request durations from 1 ms to a full long poll (60 s).
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _JobsCollector(Collector):
    """
    ``kelpie_jobs``: jobs by user, container group and status, from one grouped
    query at scrape time.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kelpie_jobs",
            "Jobs in the database by user, container group and status",
            labels=["user", "container_group_id", "status"],
        )
        query = (
            sa.select(
                USERS.c.username,
                JOBS.c.container_group_id,
                JOBS.c.status,
                sa.func.count(),
            )
            .select_from(JOBS.join(USERS, USERS.c.id == JOBS.c.user_id))
            .group_by(USERS.c.username, JOBS.c.container_group_id, JOBS.c.status)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        seen: set[tuple[str, str]] = set()
        for user, group, status, count in rows:
            family.add_metric([user, group, status], int(count))
            seen.add((user, group))
        # Every status of a queue is shown, zeros included, so that a
        # dashboard's line drops to 0 instead of vanishing.
        counted = {(u, g, s) for u, g, s, _ in rows}
        for user, group in sorted(seen):
            for status in JobStatus:
                if (user, group, status.value) not in counted:
                    family.add_metric([user, group, status.value], 0)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class ServerMetrics:
    """
    The metrics of one server process, in their own registry.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        registry.register(_JobsCollector(engine))
        self.claims = Counter(
            "kelpie_job_claims",
            "Jobs handed to a machine by GET /work",
            registry=registry,
        )
        self.lease_expiries = Counter(
            "kelpie_job_lease_expiries",
            "Claims that took over a running job whose lease had run out "
            "(an interruption without a report)",
            registry=registry,
        )
        self.releases = Counter(
            "kelpie_job_releases",
            "Jobs handed back by their holder (an interruption with a report)",
            registry=registry,
        )
        self.failures = Counter(
            "kelpie_job_failures",
            "Failures reported by a job's holder (requeued or final)",
            registry=registry,
        )
        self.completions = Counter(
            "kelpie_job_completions",
            "Jobs reported completed by their holder",
            registry=registry,
        )
        self.cancels = Counter(
            "kelpie_job_cancels",
            "Jobs canceled by a user (DELETE /jobs/{id})",
            registry=registry,
        )
        self.long_polls = Gauge(
            "kelpie_long_polls_in_flight",
            "Long polls waiting now, by endpoint",
            labelnames=["endpoint"],
            registry=registry,
        )
        for endpoint in ("work", "status"):
            self.long_polls.labels(endpoint)
        self.requests = Histogram(
            "kelpie_http_request_duration_seconds",
            "Time to answer an HTTP request (a long poll's includes its wait), "
            "by route template, method and status class",
            labelnames=["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def render(self) -> bytes:
        """
        The metrics in the Prometheus text format.
        """
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsMiddleware:
    """
    Time every HTTP request into ``kelpie_http_request_duration_seconds``.

    The route label is the route's template (``/jobs/{job_id}``), never
    the path itself, so that job ids do not become labels; a path that
    matches no route is labelled ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # Litestar's router writes the matched template into the scope.
            seen = cast(dict[str, Any], scope)
            route = seen.get("path_template") or "unmatched"
            self.metrics.requests.labels(
                route,
                seen.get("method", "-"),
                "none" if status is None else f"{status // 100}xx",
            ).observe(time.perf_counter() - start)
