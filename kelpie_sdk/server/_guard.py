"""
The outermost layer of the API: request ids, paths that could reach another
route, and JSON nested too deeply to decode safely.

Litestar decodes a path before routing it and ignores a trailing slash, so
``DELETE /jobs/%2F`` (a job id of ``/``) used to reach ``DELETE /jobs`` (delete
every job), and ``/jobs/abc%2Fheartbeat`` the heartbeat route. Such paths are
refused here, before the router sees them (W-32 in docs/server.md).
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Mapping
from typing import Any, cast

import msgspec
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_REQUEST_ID_LENGTH",
    "REQUEST_ID_HEADER",
    "REQUEST_ID_SCOPE_KEY",
    "RequestGuard",
    "json_has_nul",
    "json_too_deep",
    "request_id",
]

#: The header that carries a request's id, in both directions.
REQUEST_ID_HEADER = "X-Request-Id"
#: The longest client-supplied request id that is kept.
MAX_REQUEST_ID_LENGTH = 128
#: Where the request id is kept in the ASGI scope.
REQUEST_ID_SCOPE_KEY = "kelpie.request_id"
#: The deepest nesting of arrays and objects a JSON body may have.
MAX_JSON_DEPTH = 64

_HEADER = REQUEST_ID_HEADER.lower().encode()
#: Printable ASCII, no spaces: safe in a header and in a log line.
_SANE_ID = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID_LENGTH)
#: A JSON string (the unrolled form keeps Python's ``re`` fast on long ones).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
#: ``\u0000`` in a JSON string, not itself escaped (``\\u0000`` is text).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
#: Encoded ``/`` and ``\``: decoded before routing, they would split an id.
_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def request_id(scope: Mapping[str, Any]) -> str:
    """
    The id of the request (set by ``RequestGuard``; ``-`` outside it).
    """
    return str(scope.get(REQUEST_ID_SCOPE_KEY, "-"))


def _incoming_id(scope: Mapping[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == _HEADER:
            if _SANE_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return secrets.token_hex(16)


def _confusable(raw: bytes, path: str) -> str | None:
    """
    Why a path could reach a route other than the one it names, or ``None``.
    """
    if _ENCODED_SEPARATOR.search(raw):
        return "an encoded '/' or '\\' in the path"
    if path != "/" and path.endswith("/"):
        return "a trailing '/' (an empty path segment)"
    segments = path.split("/")[1:]
    if "" in segments[:-1]:
        return "an empty path segment"
    if any(s in (".", "..") for s in segments):
        return "a '.' or '..' path segment"
    if _CONTROL.search(path):
        return "a control character in the path"
    return None


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """
    Whether a JSON document nests arrays and objects more than ``limit`` deep.

    Brackets inside strings do not count. The scan is linear in the body's
    size; it is skipped outright when the body holds at most ``limit``
    opening brackets.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b'\\"' in body:
        structure = _JSON_STRING.sub(b"", body)
    else:
        # No escaped quote: every quote opens or closes a string, so the
        # structure is every other piece between quotes, split in C (the
        # regular expression was most of the scan's time on log batches).
        structure = b"".join(body.split(b'"')[::2])
    # Each opening bracket a +1 byte, each closing one a -1 (as signed bytes):
    # the running sum's maximum is the depth, counted in C.
    steps = structure.translate(_DEPTH_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0) > limit


def json_has_nul(body: bytes) -> bool:
    """
    Whether a JSON document has a NUL character (``\\u0000``) in a string.

    PostgreSQL cannot store one in a text column, so such strings are refused
    on both databases alike.
    """
    return b"\\u0000" in body and _JSON_NUL.search(body) is not None


def _problem(status: int, error: str, message: str) -> tuple[int, bytes]:
    return status, msgspec.json.encode({"error": error, "message": message})


class RequestGuard:
    """
    Give every request an id (kept from ``X-Request-Id`` when the client sent
    a sane one: 1 to 128 printable characters, no spaces), answer it in the
    response's ``X-Request-Id``, refuse a path that the router would read
    differently from how it is written (404), and a query string with a NUL
    character (400).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        seen = cast(dict[str, Any], scope)
        rid = _incoming_id(seen)
        seen[REQUEST_ID_SCOPE_KEY] = rid
        header = (_HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = cast(dict[str, Any], message)
                headers = [h for h in out.get("headers", ()) if h[0].lower() != _HEADER]
                out["headers"] = [*headers, header]
            await send(message)

        path = str(seen.get("path", ""))
        raw = seen.get("raw_path") or path.encode("utf-8", "surrogateescape")
        why = _confusable(raw, path)
        query = seen.get("query_string", b"")
        if why is not None:
            status, body = _problem(404, "Route Not Found", f"no route has {why}")
        elif b"\x00" in query or b"%00" in query:
            status, body = _problem(
                400, "Bad Request", "the query string must not contain NUL (%00)"
            )
        else:
            await self.app(scope, receive, send_with_id)
            return
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        await send_with_id(start)
        await send_with_id(
            {"type": "http.response.body", "body": body, "more_body": False}
        )
