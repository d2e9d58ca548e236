"""
The access log: one line per request, with its status and duration.

uvicorn's own access log has no duration, so ``kelpie server --access-log``
wraps the application in this ASGI middleware instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ACCESS_LOGGER", "AccessLog"]

#: The logger the access lines go to.
ACCESS_LOGGER = "kelpie_sdk.server.access"

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

logger = logging.getLogger(ACCESS_LOGGER)


class AccessLog:
    """
    Log ``client - "METHOD /path?query HTTP/1.1" STATUS DURATION ms id=REQUEST_ID``
    once a response is sent (a long poll's duration includes its wait). The
    request id is the response's ``X-Request-Id``, which a server error's
    body and log line also give.

    A request that ends without a response (the client went away) is logged
    with status ``-``.
    """

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        rid = "-"

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            nonlocal status, rid
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        rid = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            client = scope.get("client")
            path = scope.get("path", "")
            query = scope.get("query_string", b"")
            if query:
                path = f"{path}?{query.decode('latin-1')}"
            logger.info(
                '%s - "%s %s HTTP/%s" %s %.1f ms id=%s',
                f"{client[0]}:{client[1]}" if client else "-",
                scope.get("method", "-"),
                path,
                scope.get("http_version", "1.1"),
                "-" if status is None else status,
                elapsed,
                rid if rid != "-" else scope.get("kelpie.request_id", "-"),
            )
