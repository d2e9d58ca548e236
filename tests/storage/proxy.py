"""
A fault-injecting HTTP proxy in front of the moto S3 server, on 127.0.0.1.

Why a proxy and not a wrapper around boto3: the code under test keeps its real
boto3 client, transfer manager, sockets and error parsing; only the answers that
S3 would give on a bad day (503 SlowDown, 500, 403 InvalidAccessKeyId, a PUT that
is acknowledged but lost) are scripted, as real S3-shaped XML replies on the wire.
Every other request is forwarded to moto unchanged.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import attrs


@attrs.frozen
class Fault:
    """
    A scripted S3 error reply.

    Attributes:
        status: The HTTP status.
        code: The S3 error code (e.g. ``SlowDown``).
    """

    status: int
    code: str

    def body(self) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{self.code}</Code><Message>injected {self.code}</Message>"
            "<RequestId>proxy</RequestId></Error>"
        ).encode()


#: Answer 200 to a PUT without storing anything: an upload that is silently lost.
LOSE = "lose"
#: Forward, then send the headers and only half of the body, and hang up.
TRUNCATE = "truncate"


@attrs.frozen
class Seen:
    """One request that reached the proxy."""

    method: str
    path: str
    authorization: str


#: Decides, for one request, to forward it (None), fail it (a Fault) or lose it.
Rule = Callable[[Seen], "Fault | str | None"]


class S3FaultProxy:
    """
    The proxy; set ``rule`` to script faults, read ``seen`` and ``max_in_flight``.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rule: Rule = lambda seen: None
        self.seen: list[Seen] = []
        self.hold = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                seen = Seen(
                    self.command, self.path, self.headers.get("Authorization", "")
                )
                with proxy.lock:
                    proxy.seen.append(seen)
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if proxy.hold:
                        time.sleep(proxy.hold)
                    action = proxy.rule(seen)
                    if isinstance(action, Fault):
                        self._reply(
                            action.status,
                            {"Content-Type": "application/xml"},
                            action.body(),
                        )
                        return
                    if action == LOSE:
                        self._reply(200, {"ETag": '"0"'}, b"")
                        return
                    self._forward(body, truncate=action == TRUNCATE)
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _forward(self, body: bytes, *, truncate: bool = False) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("transfer-encoding", "connection")
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = {
                        k: v
                        for k, v in resp.getheaders()
                        if k.lower()
                        not in ("transfer-encoding", "connection", "content-length")
                    }
                    if self.command == "HEAD":
                        out["Content-Length"] = resp.getheader("Content-Length") or "0"
                        self.send_response(resp.status)
                        for name, value in out.items():
                            self.send_header(name, value)
                        self.end_headers()
                        return
                    if truncate:
                        self.send_response(resp.status)
                        for name, value in out.items():
                            self.send_header(name, value)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self._reply(resp.status, out, data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def requests(self, method: str, key_part: str) -> list[Seen]:
        """The requests seen with this method whose path contains ``key_part``."""
        return [s for s in self.seen if s.method == method and key_part in s.path]

    def __enter__(self) -> S3FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fail_first(n: int, fault: Fault, method: str, key_part: str) -> Rule:
    """A rule that fails the first ``n`` matching requests, then forwards."""
    count = iter(range(n))

    def rule(seen: Seen) -> Fault | None:
        if seen.method == method and key_part in seen.path:
            return fault if next(count, None) is not None else None
        return None

    return rule


def proxy_context(upstream: str) -> Iterator[S3FaultProxy]:
    """Start a proxy for a fixture, and stop it afterwards."""
    with S3FaultProxy(upstream) as proxy:
        yield proxy
