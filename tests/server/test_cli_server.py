"""
``kelpie server`` as a real process.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def kelpie_server(
    db: pathlib.Path, env: dict[str, str], *args: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelpie_sdk",
            "server",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{db}",
            *args,
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                requests.get(url + "/health", timeout=1)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_server_serves_with_the_given_admin_key(tmp_path: pathlib.Path) -> None:
    """KELPIE_ADMIN_KEY is the admin's key; the process stops cleanly on SIGINT."""
    with kelpie_server(tmp_path / "a.db", {"KELPIE_ADMIN_KEY": "sekrit"}) as (
        url,
        proc,
    ):
        me = requests.get(
            url + "/users/me", headers={"X-Kelpie-Key": "sekrit"}, timeout=5
        )
        assert "admin" == me.json()["username"]
    assert 0 == proc.returncode
    assert "Generated" not in proc.stderr.read()  # type: ignore[union-attr]


@pytest.mark.slow
def test_server_generates_the_admin_key_once(tmp_path: pathlib.Path) -> None:
    """Without KELPIE_ADMIN_KEY a key is generated, printed once, and kept."""
    db = tmp_path / "b.db"
    with kelpie_server(db, {}) as (url, proc):
        pass
    first = proc.stderr.read()  # type: ignore[union-attr]
    match = re.search(r"Generated the admin API key \(shown only once\): (\S+)", first)
    assert match is not None, first
    with kelpie_server(db, {}) as (url, proc):
        me = requests.get(
            url + "/users/me", headers={"X-Kelpie-Key": match.group(1)}, timeout=5
        )
        assert 200 == me.status_code
    assert "Generated" not in proc.stderr.read()  # type: ignore[union-attr]


_ACCESS_LINE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3}) '
    r"(?P<ms>\d+\.\d) ms"
)


@pytest.mark.slow
def test_access_log_shows_each_request_with_status_and_duration(
    tmp_path: pathlib.Path,
) -> None:
    """--access-log logs one line per request: method, path, status, duration, id."""
    with kelpie_server(tmp_path / "c.db", {}, "--access-log") as (url, proc):
        requests.get(url + "/health", headers={"X-Request-Id": "probe-42"}, timeout=5)
        requests.get(url + "/jobs?status=running", timeout=5)
        requests.get(url + "/nowhere", headers={"X-Kelpie-Key": "x"}, timeout=5)
    err = proc.stderr.read()  # type: ignore[union-attr]
    logged = [(m["method"], m["path"], m["status"]) for m in _ACCESS_LINE.finditer(err)]
    assert ("GET", "/health", "200") in logged
    assert re.search(r'"GET /health HTTP/1\.1" 200 \d+\.\d ms id=probe-42', err), err
    assert ("GET", "/jobs?status=running", "401") in logged
    assert ("GET", "/nowhere", "404") in logged


@pytest.mark.slow
def test_access_log_is_off_by_default(tmp_path: pathlib.Path) -> None:
    """Without --access-log requests are not logged."""
    with kelpie_server(tmp_path / "d.db", {}) as (url, proc):
        requests.get(url + "/health", timeout=5)
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert "/health" not in err, err


@pytest.mark.slow
def test_metrics_public_flag_serves_metrics_without_a_key(
    tmp_path: pathlib.Path,
) -> None:
    """--metrics-public opens GET /metrics; without it a key is needed."""
    with kelpie_server(tmp_path / "e.db", {}, "--metrics-public") as (url, _):
        r = requests.get(url + "/metrics", timeout=5)
        assert 200 == r.status_code
        assert "kelpie_job_claims_total" in r.text
    with kelpie_server(tmp_path / "e.db", {}) as (url, _):
        assert 401 == requests.get(url + "/metrics", timeout=5).status_code


def test_log_limit_bounds_each_attempts_output(tmp_path: pathlib.Path) -> None:
    """--log-limit 2K keeps about the last 2 KiB of an attempt's lines."""
    headers = {"X-Kelpie-Key": "sekrit"}
    with kelpie_server(
        tmp_path / "l.db", {"KELPIE_ADMIN_KEY": "sekrit"}, "--log-limit", "2K"
    ) as (url, _):
        job = requests.post(
            url + "/jobs",
            json={"command": "x", "container_group_id": "g", "sync": {}},
            headers=headers,
            timeout=5,
        ).json()
        requests.get(
            url + "/work",
            params={"machine_id": "m", "container_group_id": "g"},
            headers=headers,
            timeout=5,
        )
        lines = [
            {"stream": "stdout", "time": 0, "line": f"{i:04d}" + "x" * 95}
            for i in range(30)
        ]
        r = requests.post(
            f"{url}/jobs/{job['id']}/logs",
            json={"machine_id": "m", "attempt": 1, "offset": 0, "lines": lines},
            headers=headers,
            timeout=5,
        )
        assert 200 == r.status_code, r.text
        kept = requests.get(
            f"{url}/jobs/{job['id']}/logs", headers=headers, timeout=5
        ).json()["lines"]
    assert [f"{i:04d}" for i in range(10, 30)] == [x["line"][:4] for x in kept]


def test_log_limit_must_be_a_size() -> None:
    """A bad --log-limit is a usage error that shows what is expected."""
    proc = subprocess.run(
        [sys.executable, "-m", "kelpie_sdk", "server", "--log-limit", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 2 == proc.returncode
    assert "expected a size in bytes such as 1048576 or 1M, got 'lots'" in proc.stderr


def _login_cookie_flags(url: str, key: str, **headers: str) -> list[str]:
    r = requests.post(
        url + "/ui/login",
        data={"key": key},
        headers=headers,
        allow_redirects=False,
        timeout=5,
    )
    assert 303 == r.status_code
    return [a.strip().lower() for a in r.headers["set-cookie"].split(";")]


@pytest.mark.slow
def test_dashboard_cookie_is_secure_behind_https(tmp_path: pathlib.Path) -> None:
    """The session cookie is Secure over https (a local proxy's X-Forwarded-Proto), or always with --secure-cookie."""
    env = {"KELPIE_ADMIN_KEY": "sekrit"}
    with kelpie_server(tmp_path / "c.db", env) as (url, _):
        assert "secure" not in _login_cookie_flags(url, "sekrit")
        flags = _login_cookie_flags(url, "sekrit", **{"X-Forwarded-Proto": "https"})
        assert "secure" in flags
    with kelpie_server(tmp_path / "c.db", env, "--secure-cookie") as (url, _):
        assert "secure" in _login_cookie_flags(url, "sekrit")
