"""
A loopback fake of the SaladCloud public API endpoints the autoscaler uses.

It keeps each container group's state and replica count, records every call,
checks the ``Salad-Api-Key`` header, and can be told to answer the next calls
with given statuses (429 with ``Retry-After``, 500...) before the real answer.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

_GROUP = re.compile(
    r"^/organizations/(?P<org>[^/]+)/projects/(?P<project>[^/]+)"
    r"/containers/(?P<name>[^/]+)(?P<rest>/.*)?$"
)


@attrs.define
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@attrs.define
class FakeSalad:
    api_key: str
    url: str = ""
    groups: dict[tuple[str, str, str], dict[str, Any]] = attrs.Factory(dict)
    calls: list[Call] = attrs.Factory(list)
    #: Answers to give, in order, before handling requests normally:
    #: ``(status, headers)``.
    scripted: list[tuple[int, dict[str, str]]] = attrs.Factory(list)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def add_group(
        self,
        org: str,
        project: str,
        name: str,
        *,
        status: str = "stopped",
        replicas: int = 0,
    ) -> None:
        with self.lock:
            self.groups[(org, project, name)] = {
                "status": status,
                "replicas": replicas,
                "reallocated": [],
            }

    def group(self, org: str, project: str, name: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.groups[(org, project, name)])

    def writes(self) -> list[tuple[str, str, Any]]:
        """The non-GET calls, as (method, last path part or 'patch', body)."""
        with self.lock:
            return [
                (c.method, c.path.rsplit("/", 1)[-1], c.body)
                for c in self.calls
                if c.method != "GET"
            ]

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.calls.append(Call(method, path, headers, body))
            if self.scripted:
                status, extra = self.scripted.pop(0)
                return status, extra, {"message": f"scripted {status}"}
            if headers.get("salad-api-key") != self.api_key:
                return 401, {}, {"message": "Unauthorized"}
            match = _GROUP.match(path)
            if match is None:
                return 404, {}, {"message": "Not Found"}
            key = (match["org"], match["project"], match["name"])
            group = self.groups.get(key)
            if group is None:
                return 404, {}, {"message": "Container group not found"}
            rest = match["rest"] or ""
            if method == "GET" and not rest:
                return 200, {}, self._view(key[2], group)
            if method == "PATCH" and not rest:
                if headers.get("content-type") != "application/merge-patch+json":
                    return 415, {}, {"message": "use application/merge-patch+json"}
                replicas = body.get("replicas") if isinstance(body, dict) else None
                if not isinstance(replicas, int) or not 0 <= replicas <= 500:
                    return 400, {}, {"message": "replicas must be 0..500"}
                group["replicas"] = replicas
                return 200, {}, self._view(key[2], group)
            if method == "POST" and rest == "/start":
                group["status"] = "running"
                return 202, {}, None
            if method == "POST" and rest == "/stop":
                group["status"] = "stopped"
                return 202, {}, None
            realloc = re.fullmatch(r"/instances/([^/]+)/reallocate", rest)
            if method == "POST" and realloc:
                group["reallocated"].append((realloc[1], body.get("reason")))
                return 202, {}, None
            return 405, {}, {"message": "Method Not Allowed"}

    @staticmethod
    def _view(name: str, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "replicas": group["replicas"],
            "current_state": {"status": group["status"]},
        }


def _handler(fake: FakeSalad) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, answer = fake.handle(self.command, self.path, headers, body)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def run_fake_salad(api_key: str = "salad-test-key") -> Iterator[FakeSalad]:
    """Serve a fake on 127.0.0.1 (a free port) until the block ends."""
    fake = FakeSalad(api_key=api_key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
