"""
A loopback stand-in for SaladCloud's instance metadata service (IMDS) that
records every call it receives.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs


@attrs.frozen
class Call:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeImds:
    """
    Answers ``PUT /v1/deletion-cost``, ``POST /v1/reallocate`` and
    ``GET /v1/token`` on 127.0.0.1 (an ephemeral port).

    Attributes:
        jwt: What ``GET /v1/token`` returns.
        status: Status of every answer (set e.g. 503 to make it fail).
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.jwt = "header.e30.signature"
        self.status = 200
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake._lock:
                    fake.calls.append(
                        Call(self.command, self.path, dict(self.headers), body)
                    )
                    status = fake.status
                    jwt = fake.jwt
                known = {
                    ("PUT", "/v1/deletion-cost"),
                    ("POST", "/v1/reallocate"),
                    ("GET", "/v1/token"),
                }
                if (self.command, self.path) not in known:
                    status = 404
                if self.headers.get("Metadata") != "true":
                    status = 400
                answer: dict[str, Any] = {}
                if status == 200 and self.path == "/v1/token":
                    answer = {"jwt": jwt}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def deletion_costs(self) -> list[int]:
        """The values of every ``PUT /v1/deletion-cost``, in order."""
        return [
            c.body["deletion_cost"]
            for c in self.snapshot()
            if c.path == "/v1/deletion-cost"
        ]

    def reallocations(self) -> list[str]:
        """The reasons of every ``POST /v1/reallocate``, in order."""
        return [c.body["reason"] for c in self.snapshot() if c.path == "/v1/reallocate"]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fake_imds() -> Iterator[FakeImds]:
    """Body of the ``imds`` fixtures."""
    fake = FakeImds()
    try:
        yield fake
    finally:
        fake.close()
