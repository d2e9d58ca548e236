"""
A scripted HTTP server on 127.0.0.1 that replays canned replies, for testing
retries, timeouts and error mapping over real sockets.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import attrs
import pytest


@attrs.frozen(kw_only=True)
class Reply:
    """
    One scripted answer.

    Attributes:
        status: The HTTP status.
        body: Bytes or text as is; anything else is sent as JSON.
        headers: Extra response headers.
        delay: Seconds to wait before answering at all.
        body_delay: Seconds to wait between the headers and the body.
        drop: Close the connection without answering.
    """

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = attrs.field(factory=dict)
    delay: float = 0.0
    body_delay: float = 0.0
    drop: bool = False

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@attrs.frozen(kw_only=True)
class Recorded:
    """A request the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FaultServer(http.server.ThreadingHTTPServer):
    """Replays `script` in order; answers 599 once the script is used up."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[Reply] = []
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def play(self, *replies: Reply) -> None:
        """Queue replies for the next requests."""
        with self.lock:
            self.script.extend(replies)

    def next_reply(self, recorded: Recorded) -> Reply:
        with self.lock:
            self.requests.append(recorded)
            if self.script:
                return self.script.pop(0)
        return Reply(status=599, body={"error": "script exhausted"})


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        reply = self.server.next_reply(
            Recorded(
                method=self.command,
                path=parsed.path,
                query=urllib.parse.parse_qs(parsed.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
        )
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        payload = reply.payload()
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.flush()
            if reply.body_delay:
                time.sleep(reply.body_delay)
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout tests)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle


@pytest.fixture(name="fault_server")
def fault_server_fixture() -> Iterator[FaultServer]:
    """A fresh scripted server on 127.0.0.1 for one test."""
    server = FaultServer()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(name="closed_port_url")
def closed_port_url_fixture() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
