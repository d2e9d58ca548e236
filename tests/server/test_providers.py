"""
The SaladCloud provider against a loopback fake of its API, and the local
provider with stand-in worker processes.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kelpie_sdk.models import ScalingRule
from kelpie_sdk.server._providers import (
    GroupState,
    LocalProvider,
    ProviderError,
    SaladProvider,
)
from tests.salad_fake import FakeSalad, run_fake_salad

KEY = "salad-test-key"
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def rule(
    group: str = "g-1",
    *,
    name: str | None = "workers",
    org: str | None = "acme",
    project: str | None = "proj",
    low: int = 0,
    high: int = 10,
    idle: int = 60,
) -> ScalingRule:
    return ScalingRule(
        container_group_id=group,
        org_name=org,
        project_name=project,
        container_group_name=name,
        user_id="u",
        created=NOW,
        updated=NOW,
        min_replicas=low,
        max_replicas=high,
        idle_threshold_seconds=idle,
    )


@pytest.fixture
def fake() -> Iterator[FakeSalad]:
    with run_fake_salad(KEY) as server:
        server.add_group("acme", "proj", "workers", status="stopped", replicas=0)
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def salad(fake: FakeSalad, sleeps: list[float]) -> Iterator[SaladProvider]:
    provider = SaladProvider(KEY, base_url=fake.url, sleep=sleeps.append)
    yield provider
    provider.close()


def test_get_start_patch_stop_reallocate(fake: FakeSalad, salad: SaladProvider) -> None:
    """Each call hits the documented path with the key and the right body."""
    r = rule()
    assert GroupState(status="stopped", replicas=0) == salad.get_group(r)
    salad.start(r)
    salad.set_replicas(r, 3)
    assert GroupState(status="running", replicas=3) == salad.get_group(r)
    salad.reallocate(r, "inst-7", "too many failures")
    salad.stop(r)
    assert "stopped" == fake.group("acme", "proj", "workers")["status"]
    assert [("inst-7", "too many failures")] == fake.group("acme", "proj", "workers")[
        "reallocated"
    ]
    base = "/organizations/acme/projects/proj/containers/workers"
    assert [
        ("GET", base),
        ("POST", base + "/start"),
        ("PATCH", base),
        ("GET", base),
        ("POST", base + "/instances/inst-7/reallocate"),
        ("POST", base + "/stop"),
    ] == [(c.method, c.path) for c in fake.calls]
    assert all(KEY == c.headers["salad-api-key"] for c in fake.calls)
    patch = fake.calls[2]
    assert {"replicas": 3} == patch.body
    assert "application/merge-patch+json" == patch.headers["content-type"]
    assert "application/merge-patch+json" == patch.headers["accept"]


def test_missing_group_is_none(salad: SaladProvider) -> None:
    """A 404 on the group read means the group does not exist."""
    assert salad.get_group(rule(name="gone")) is None


def test_429_waits_for_retry_after_then_succeeds(
    fake: FakeSalad, salad: SaladProvider, sleeps: list[float]
) -> None:
    """A rate-limited call waits what Retry-After says, then goes through."""
    fake.scripted = [(429, {"Retry-After": "7"}), (429, {"Retry-After": "2"})]
    salad.set_replicas(rule(), 4)
    assert [7.0, 2.0] == sleeps
    assert 4 == fake.group("acme", "proj", "workers")["replicas"]
    assert 3 == len(fake.calls)


def test_5xx_is_retried_with_backoff(
    fake: FakeSalad, salad: SaladProvider, sleeps: list[float]
) -> None:
    """Server errors are retried (start is safe to repeat) with growing waits."""
    fake.scripted = [(500, {}), (503, {})]
    salad.start(rule())
    assert 2 == len(sleeps)
    assert 0 < sleeps[0] <= 0.5
    assert 0.5 * 0.75 <= sleeps[1] <= 1.0
    assert "running" == fake.group("acme", "proj", "workers")["status"]


def test_retries_run_out_with_a_clear_error(
    fake: FakeSalad, salad: SaladProvider, sleeps: list[float]
) -> None:
    """After its retries the provider says what failed."""
    fake.scripted = [(500, {})] * 4
    with pytest.raises(ProviderError, match="failed after retries: 500 PATCH"):
        salad.set_replicas(rule(), 2)
    assert 4 == len(fake.calls)
    assert 3 == len(sleeps)


def test_reallocate_is_not_repeated_after_a_5xx(
    fake: FakeSalad, salad: SaladProvider
) -> None:
    """A second reallocation could move the replacement too: no retry on 500."""
    fake.scripted = [(500, {})]
    with pytest.raises(ProviderError):
        salad.reallocate(rule(), "inst-1", "bad node")
    assert 1 == len(fake.calls)


def test_connection_errors_are_retried(sleeps: list[float]) -> None:
    """A refused connection is retried, then reported."""
    with run_fake_salad(KEY) as gone:
        url = gone.url
    provider = SaladProvider(KEY, base_url=url, sleep=sleeps.append, max_retries=2)
    with pytest.raises(ProviderError, match="cannot reach"):
        provider.start(rule())
    assert 2 == len(sleeps)


@pytest.mark.parametrize("status", [401, 403])
def test_bad_key_is_a_clear_error(
    fake: FakeSalad, sleeps: list[float], status: int
) -> None:
    """401 and 403 name the key and are not retried."""
    fake.scripted = [(status, {})]
    provider = SaladProvider(KEY, base_url=fake.url, sleep=sleeps.append)
    with pytest.raises(ProviderError, match=f"refused the API key \\({status}\\)"):
        provider.get_group(rule())
    assert [] == sleeps


def test_wrong_key_is_refused(fake: FakeSalad) -> None:
    """The fake checks the key, so the provider really sends it."""
    provider = SaladProvider("wrong", base_url=fake.url, sleep=lambda s: None)
    with pytest.raises(ProviderError, match="SALAD_API_KEY"):
        provider.start(rule())


def test_404_on_a_write_is_a_clear_error(salad: SaladProvider) -> None:
    """Writing to a group that does not exist names the path and what to check."""
    with pytest.raises(ProviderError, match=r"has no .*containers/nope \(404\)"):
        salad.set_replicas(rule(name="nope"), 1)


def test_rule_without_a_name_cannot_be_addressed(salad: SaladProvider) -> None:
    """The provider says which part of the group's address is missing."""
    with pytest.raises(ProviderError, match="container_group_name"):
        salad.get_group(rule(name=None))


def test_default_org_and_project(fake: FakeSalad) -> None:
    """Rules without org/project use the provider's defaults."""
    provider = SaladProvider(
        KEY, base_url=fake.url, organization="acme", project="proj"
    )
    assert provider.get_group(rule(org=None, project=None)) is not None


def test_no_key_is_refused() -> None:
    """A provider without a key says which variable to set."""
    with pytest.raises(ProviderError, match="SALAD_API_KEY"):
        SaladProvider("")


@attrs.define
class _Proc:
    """A stand-in worker: a real process that sleeps until signalled."""

    name: str
    log: list[str]
    popen: object = None

    def start(self) -> None:
        import subprocess

        self.popen = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"]
        )
        self.log.append(f"start {self.name}")

    def poll(self) -> int | None:
        return self.popen.poll()  # type: ignore[attr-defined]

    def signal(self, sig: signal.Signals) -> None:
        if self.poll() is None:
            self.popen.send_signal(sig)  # type: ignore[attr-defined]
            self.log.append(f"{sig.name} {self.name}")

    def wait(self, timeout: float) -> int | None:
        return self.popen.wait(timeout)  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def test_local_provider_starts_resizes_and_stops(tmp_path: Path) -> None:
    """Workers start with the group, follow the replica count, stop with it."""
    log: list[str] = []
    provider = LocalProvider(lambda i: _Proc(f"local-{i}", log), stop_timeout=10)
    r = rule()
    try:
        assert GroupState(status="stopped", replicas=0) == provider.get_group(r)
        provider.set_replicas(r, 2)
        assert 0 == provider.live()  # not started yet
        provider.start(r)
        assert GroupState(status="running", replicas=2) == provider.get_group(r)
        provider.set_replicas(r, 3)
        assert 3 == provider.live()
        provider.set_replicas(r, 1)  # the newest go first
        assert ["local-0"] == [w.name for w in provider.workers.values()]
        # A worker that dies shows as a missing replica and comes back.
        provider.workers[0].signal(signal.SIGKILL)
        provider.workers[0].wait(10)
        assert 0 == provider.get_group(r).replicas  # type: ignore[union-attr]
        provider.set_replicas(r, 1)
        assert 1 == provider.live()
        provider.reallocate(r, "local-0", "test")
        assert 1 == provider.live()
        provider.stop(r)
        assert GroupState(status="stopped", replicas=0) == provider.get_group(r)
    finally:
        provider.shutdown()
    assert [
        "start local-0",
        "start local-1",
        "start local-2",
        "SIGTERM local-1",
        "SIGTERM local-2",
        "SIGKILL local-0",
        "start local-0",
        "SIGTERM local-0",
        "start local-0",
        "SIGTERM local-0",
    ] == log
