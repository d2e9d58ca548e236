"""
The web dashboard at ``/ui``: sign-in sessions and the pages' routes.

The pages are static HTML, CSS and JavaScript shipped in ``ui/`` beside this
module; their script calls the JSON API with the session cookie. A session is
kept in the server's memory: the cookie holds only a random id, never the API
key. Cookie-authenticated requests that change state must carry the session's
CSRF token in ``X-CSRF-Token`` (see ``UISessions.principal_key``).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import attrs
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from kelpie_sdk.server._roles import ACCESS_PUBLIC, ACCESS_USERS
from kelpie_sdk.server._store import Principal, Store

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "SESSION_SECONDS",
    "UISessions",
    "ui_handlers",
]

#: The session cookie's name.
COOKIE = "kelpie_session"
#: The header that carries the session's CSRF token.
CSRF_HEADER = "x-csrf-token"
#: How long a sign-in lasts.
SESSION_SECONDS = 12 * 3600
#: The most sessions kept at once; the oldest go first.
MAX_SESSIONS = 10_000

#: Every UI answer carries these: scripts and styles from this server only,
#: no inline code, no framing.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ASSET_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
}


@attrs.frozen
class _Session:
    key: str
    csrf: str
    expires: float


@attrs.define
class UISessions:
    """
    The signed-in dashboard sessions of this server process.

    Attributes:
        secure_cookie: Mark the cookie ``Secure``: ``True``/``False``, or
            ``None`` to do so when the request came over https.
    """

    secure_cookie: bool | None = None
    _sessions: dict[str, _Session] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def create(self, key: str) -> tuple[str, str]:
        """
        Open a session for an API key; returns its id and CSRF token.
        """
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            for old in [s for s, v in self._sessions.items() if v.expires <= now]:
                del self._sessions[old]
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[sid] = _Session(key, csrf, now + SESSION_SECONDS)
        return sid, csrf

    def get(self, sid: str | None) -> _Session | None:
        """
        The live session with this id, if any.
        """
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if session.expires <= time.monotonic():
                del self._sessions[sid]
                return None
            return session

    def drop(self, sid: str | None) -> None:
        """
        Sign a session out.
        """
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)

    def principal_key(self, request: Request[Any, Any, Any]) -> str | None:
        """
        The API key behind the request's session cookie, or ``None`` without one.

        Raises:
            PermissionError: A state-changing request whose ``X-CSRF-Token``
                does not match the session's token.
        """
        session = self.get(request.cookies.get(COOKIE))
        if session is None:
            return None
        if request.method not in _SAFE_METHODS:
            token = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(token.encode(), session.csrf.encode()):
                raise PermissionError(
                    "missing or wrong X-CSRF-Token for a signed-in dashboard "
                    "session; reload the page and try again"
                )
        return session.key

    def is_secure(self, request: Request[Any, Any, Any]) -> bool:
        if self.secure_cookie is not None:
            return self.secure_cookie
        return request.url.scheme == "https"


def _kelpie(request: Request[Any, Any, Any]) -> Any:
    return request.app.state.kelpie


def _sessions(request: Request[Any, Any, Any]) -> UISessions:
    sessions: UISessions = _kelpie(request).ui
    return sessions


def _store(request: Request[Any, Any, Any]) -> Store:
    store: Store = _kelpie(request).store
    return store


def _asset(name: str) -> bytes:
    return resources.files("kelpie_sdk.server").joinpath("ui", name).read_bytes()


def _page(name: str, status: int = 200) -> Response[bytes]:
    return Response(
        _asset(name),
        status_code=status,
        media_type=_ASSET_TYPES[".html"],
        headers=SECURITY_HEADERS,
    )


def _redirect(location: str, status: int = 303) -> Response[bytes]:
    return Response(
        b"",
        status_code=status,
        headers={**SECURITY_HEADERS, "location": location},
    )


def _dashboard_principal(store: Store, key: str) -> Principal | None:
    """
    The admin or user behind a key, asked of the database each time, so that
    a revoked key signs its sessions out at once; ``None`` for a worker key,
    which may not read jobs.
    """
    principal = store.principal_for_key(key)
    if principal is None or principal.role == "worker":
        return None
    return principal


def _signed_in(request: Request[Any, Any, Any]) -> Principal | None:
    session = _sessions(request).get(request.cookies.get(COOKIE))
    if session is None:
        return None
    return _dashboard_principal(_store(request), session.key)


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    # A browser sends Origin with every form POST; refuse other sites' forms.
    # (Under a no-referrer policy the browser would send "null": the pages
    # use same-origin.)
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


@get("/ui", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def ui_jobs(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The jobs table."""
    if _signed_in(request) is None:
        return _redirect("/ui/login")
    return _page("jobs.html")


@get("/ui/groups", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def ui_groups(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Pending, running and completed jobs per container group."""
    if _signed_in(request) is None:
        return _redirect("/ui/login")
    return _page("groups.html")


@get(
    "/ui/jobs/{job_id:str}",
    sync_to_thread=False,
    include_in_schema=False,
    opt=ACCESS_PUBLIC,
)
def ui_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[bytes]:
    """One job; another user's job, or none, is not found."""
    principal = _signed_in(request)
    if principal is None:
        return _redirect("/ui/login")
    if _store(request).get_job(principal, job_id) is None:
        return _page("notfound.html", 404)
    return _page("job.html")


@get("/ui/login", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def ui_login_page() -> Response[bytes]:
    """The sign-in form."""
    return _page("login.html")


@post("/ui/login", status_code=303, include_in_schema=False, opt=ACCESS_PUBLIC)
async def ui_login(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Sign in with an API key (form field ``key``); sets the session cookie."""
    if not _same_origin(request):
        return Response(
            b"Sign-in from another site refused.",
            status_code=403,
            media_type="text/plain",
            headers=SECURITY_HEADERS,
        )
    failures = _kelpie(request).failures
    address = request.client.host if request.client is not None else "-"
    wait = None if failures is None else failures.retry_after(address)
    if wait is not None:
        return Response(
            b"Too many failed sign-ins from this address; try again later.",
            status_code=429,
            media_type="text/plain",
            headers={**SECURITY_HEADERS, "retry-after": str(wait)},
        )
    form = await request.form()
    key = str(form.get("key") or "").strip()
    if not key or _dashboard_principal(_store(request), key) is None:
        if key and failures is not None:
            failures.failed(address)
        return _redirect("/ui/login?failed=1")
    sessions = _sessions(request)
    sid, _ = sessions.create(key)
    response = _redirect("/ui")
    response.set_cookie(
        COOKIE,
        sid,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=sessions.is_secure(request),
    )
    return response


@post("/ui/logout", status_code=303, include_in_schema=False, opt=ACCESS_PUBLIC)
async def ui_logout(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Sign out (needs the CSRF token, as every state change does)."""
    sessions = _sessions(request)
    sid = request.cookies.get(COOKIE)
    session = sessions.get(sid)
    if session is not None:
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            return Response(
                b"Missing or wrong X-CSRF-Token.",
                status_code=403,
                media_type="text/plain",
                headers=SECURITY_HEADERS,
            )
        sessions.drop(sid)
    response = _redirect("/ui/login")
    response.delete_cookie(COOKIE, path="/")
    return response


@get("/ui/session", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def ui_session(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Who is signed in, and the CSRF token the page sends with changes."""
    session = _sessions(request).get(request.cookies.get(COOKIE))
    principal = (
        None if session is None else _dashboard_principal(_store(request), session.key)
    )
    if session is None or principal is None:
        return Response(
            {"detail": "not signed in; sign in at /ui/login"},
            status_code=401,
            headers=SECURITY_HEADERS,
        )
    return Response(
        {
            "user_id": principal.user_id,
            "project": principal.project_name,
            "admin": principal.is_admin,
            "csrf": session.csrf,
        },
        headers=SECURITY_HEADERS,
    )


@get("/ui/api/groups", sync_to_thread=False, include_in_schema=False, opt=ACCESS_USERS)
def ui_group_counts(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[dict[str, Any]]:
    """Jobs per status per container group, the caller's only."""
    counts = _store(request).group_counts(principal)
    groups = [
        {
            "container_group_id": group,
            **{
                status: by_status.get(status, 0)
                for status in ("pending", "running", "completed", "failed", "canceled")
            },
        }
        for group, by_status in sorted(counts.items())
    ]
    return Response({"groups": groups}, headers=SECURITY_HEADERS)


@get(
    "/ui/static/{name:str}",
    sync_to_thread=False,
    include_in_schema=False,
    opt=ACCESS_PUBLIC,
)
def ui_static(name: FromPath[str]) -> Response[bytes]:
    """The pages' script and style sheet."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if suffix not in (".js", ".css") or "/" in name or name.startswith("."):
        return Response(b"not found", status_code=404, media_type="text/plain")
    try:
        body = _asset(name)
    except FileNotFoundError:
        return Response(b"not found", status_code=404, media_type="text/plain")
    return Response(body, media_type=_ASSET_TYPES[suffix], headers=SECURITY_HEADERS)


def ui_handlers() -> list[Any]:
    """The dashboard's routes, for ``create_app``."""
    return [
        ui_jobs,
        ui_groups,
        ui_job,
        ui_login_page,
        ui_login,
        ui_logout,
        ui_session,
        ui_group_counts,
        ui_static,
    ]
