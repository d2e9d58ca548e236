"""
The Litestar application: routes, authentication and error shapes.

Handlers run on the event loop and call the synchronous ``Store`` inline. With
SQLite that serialises all database work in one thread, which is what SQLite
wants anyway (one writer), and avoids a thread hop per request; see
docs/server.md for the measurements behind this choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import difflib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast

import attrs
import msgspec
from litestar import Litestar, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.enums import RequestEncodingType, ScopeType
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, Operation, SecurityScheme
from litestar.params import (
    BodyKwarg,
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
)
from litestar.plugins.attrs import AttrsSchemaPlugin
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from kelpie_sdk.models import (
    IDEMPOTENCY_HEADER,
    INTEGER_RANGES,
    KEY_ROLES,
    LEGACY_STORAGE_FIELDS,
    MAX_BATCH_SIZE,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_KEY_LENGTH,
    MAX_LONG_POLL,
    MAX_TAGS,
    QUARANTINE_HEADER,
    REPLAYED_HEADER,
    Job,
    JobStatus,
    JobSubmission,
    ScalingRule,
    ScalingRuleSubmission,
    ScalingRuleUpdate,
    SyncConfig,
    SyncDirection,
    SyncSpec,
    User,
    WorkerReport,
    check_integer,
    check_tag,
    format_timestamp,
    is_idempotency_key,
)
from kelpie_sdk.server._db import ADMIN_ID
from kelpie_sdk.server._guard import (
    MAX_JSON_DEPTH,
    RequestGuard,
    json_has_nul,
    json_too_deep,
    request_id,
)
from kelpie_sdk.server._logs import (
    DEFAULT_LOG_LIMIT,
    IncomingLine,
    JobLogs,
)
from kelpie_sdk.server._metrics import METRICS_PATH, MetricsMiddleware, ServerMetrics
from kelpie_sdk.server._openapi import WEBHOOK_PATTERN, describe
from kelpie_sdk.server._ratelimit import (
    AUTH_FAILURE_LIMIT,
    FailureLimiter,
    KeyRateLimiter,
)
from kelpie_sdk.server._roles import (
    ACCESS_ADMIN,
    ACCESS_ANY,
    ACCESS_PUBLIC,
    ACCESS_USERS,
)
from kelpie_sdk.server._salad_auth import SaladAuth, SaladAuthError
from kelpie_sdk.server._store import (
    LAST_USED_EVERY_MS,
    DatabaseUnavailable,
    IdempotencyConflict,
    Principal,
    ReportOutcome,
    Store,
)
from kelpie_sdk.server._ui import UISessions, ui_handlers
from kelpie_sdk.server._webhooks import (
    WebhookSettings,
    check_literal,
    read_secret,
    rotate_secret,
)

__all__ = ["MAX_BODY_BYTES", "MAX_PAGE_SIZE", "HTTPProblem", "create_app"]

logger = logging.getLogger(__name__)

#: The largest ``page_size`` that ``GET /jobs`` accepts.
MAX_PAGE_SIZE = INTEGER_RANGES["page_size"][1]
#: The longest job id (the ``id`` column's width).
MAX_ID_LENGTH = 36
#: The largest request body (bytes); a larger one is answered 413.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: How long a looked-up API key is trusted without asking the database again:
#: a key revoked through another replica stops working here within this bound
#: (at once through this one).
KEY_CACHE_SECONDS = 5.0

_JSON = "application/json"
_WEBHOOK = re.compile(WEBHOOK_PATTERN)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
M = TypeVar("M")


class HTTPProblem(Exception):
    """
    An error answered as ``{"error": ..., "message": ..., **extra}``.
    """

    def __init__(
        self,
        status: int,
        error: str,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message or error)
        self.status = status
        self.error = error
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.message is not None:
            out["message"] = self.message
        out.update(self.extra)
        return out


def _json(content: Any, status: int = 200) -> Response[Any]:
    return Response(
        content=msgspec.json.encode(content), status_code=status, media_type=_JSON
    )


def _problem_response(problem: HTTPProblem) -> Response[Any]:
    response = _json(problem.body(), problem.status)
    response.headers.update(problem.headers)
    return response


# -- error handlers -----------------------------------------------------------


def _on_problem(_: Request[Any, Any, Any], exc: HTTPProblem) -> Response[Any]:
    return _problem_response(exc)


def _on_validation(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[Any]:
    errors = exc.extra if isinstance(exc.extra, list) else []
    details = "; ".join(
        f"{e.get('key')}: {e.get('message')}" for e in errors if isinstance(e, dict)
    )
    message = f"{exc.detail}: {details}" if details else exc.detail
    return _json(
        {
            "error": "Bad Request",
            "message": message,
            "errors": errors,
            "success": False,
            "result": {},
        },
        400,
    )


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if exc.status_code >= 500:
        return _on_crash(request, exc)
    if isinstance(exc, NotFoundException) and exc.detail == "Not Found":
        return _json({"error": "Route Not Found", "message": request.url.path}, 404)
    response = _json(
        {"error": _reason(exc.status_code), "message": exc.detail}, exc.status_code
    )
    # A 405 carries the route's methods in Allow (RFC 9110).
    response.headers.update(exc.headers or {})
    return response


#: The ``Retry-After`` (seconds) of a 503 while the database is unavailable.
UNAVAILABLE_RETRY_AFTER = 2


def _on_unavailable(
    request: Request[Any, Any, Any], exc: DatabaseUnavailable
) -> Response[Any]:
    # The driver's text names hosts, users and databases: log only (W-33).
    rid = request_id(request.scope)
    logger.warning("%s (request id %s)", exc, rid)
    response = _json(
        {
            "error": "Service Unavailable",
            "message": "the database is unavailable; retry later",
            "request_id": rid,
        },
        503,
    )
    response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER)
    return response


def _on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The exception's text may carry SQL, paths or data: it goes to the log
    # only, under the request id that the answer gives (W-33).
    rid = request_id(request.scope)
    logger.error(
        "unhandled error in %s %s (request id %s)",
        request.method,
        request.url.path,
        rid,
        exc_info=exc,
    )
    return _json(
        {
            "error": "Internal server error",
            "message": "an unexpected error occurred; the server's log has its "
            f"details under request id {rid}",
            "request_id": rid,
        },
        500,
    )


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# -- request decoding -----------------------------------------------------------


def _strict(raw: Any, model: type[M], where: str = "body") -> M:
    """
    Decode already-parsed JSON into a model with no type coercion.

    Litestar converts bodies leniently (``"3"`` becomes ``3``); the protocol
    says wrong types are errors, so every body is re-checked strictly.
    """
    try:
        return msgspec.convert(raw, model, strict=True)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise HTTPProblem(400, "Bad Request", f"invalid {where}: {exc}") from exc


async def _raw_json(request: Request[Any, Any, Any]) -> Any:
    body = await request.body()
    if not body.strip():
        raise HTTPProblem(400, "Bad Request", "request body is empty; expected JSON")
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise HTTPProblem(400, "Bad Request", f"malformed JSON: {exc}") from exc


#: Fields of a job as the API returns it: ignored in a submission, so that a
#: job read back with ``GET /jobs/{id}`` can be submitted again, as before.
_JOB_ONLY_FIELDS = frozenset(f.name for f in attrs.fields(Job)) - frozenset(
    f.name for f in attrs.fields(JobSubmission)
)
#: How alike an unknown field must be to a known one to count as a misspelling.
_TYPO_CUTOFF = 0.75


def _check_fields(
    raw: Any, model: type[Any], where: str = "", ignored: frozenset[str] = frozenset()
) -> None:
    """
    Name the unknown fields of a submission that are surely mistakes.

    The original API dropped unknown fields silently, and clients written for
    it may send extra ones, so unknown fields are still ignored, except a
    misspelling of a known field, and any unknown field when a required field
    is missing: both are 400s that name the field.
    """
    if not isinstance(raw, dict):
        return
    fields = attrs.fields(model)
    known = [f.name for f in fields]
    unknown = [k for k in raw if k not in known and k not in ignored]
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=_TYPO_CUTOFF)
        if close:
            raise HTTPProblem(
                400,
                "Invalid request",
                f"unknown field '{where}{key}' (did you mean '{close[0]}'?)",
            )
    missing = [
        f.name for f in fields if f.default is attrs.NOTHING and f.name not in raw
    ]
    if missing and unknown:
        raise HTTPProblem(
            400,
            "Invalid request",
            f"missing required field '{where}{missing[0]}'; unknown "
            + ("fields " if len(unknown) > 1 else "field ")
            + ", ".join(f"'{where}{k}'" for k in unknown)
            + " given instead",
        )


def _check_submission_fields(raw: Any) -> None:
    _check_fields(raw, JobSubmission, ignored=_JOB_ONLY_FIELDS)
    sync = raw.get("sync") if isinstance(raw, dict) else None
    if not isinstance(sync, dict):
        return
    _check_fields(sync, SyncSpec, "sync.")
    for phase in ("before", "during", "after"):
        entries = sync.get(phase)
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                _check_fields(entry, SyncConfig, f"sync.{phase}[{i}].")


def _decode_submission(raw: Any, where: str = "body") -> JobSubmission:
    _check_submission_fields(raw)
    return _strict(raw, JobSubmission, where)


def _normalise_prefix(prefix: str) -> str:
    # An empty prefix is the bucket root; the original turned it into "/",
    # a different (and surprising) key prefix.
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def validate_submission(sub: JobSubmission) -> JobSubmission:
    """
    Apply the protocol's post-schema rules and normalise prefixes.

    Raises:
        HTTPProblem: 400 naming the rule that failed.
    """
    if not sub.command.strip():
        raise HTTPProblem(400, "Invalid request", "command must not be empty")
    if not sub.container_group_id.strip():
        raise HTTPProblem(
            400, "Invalid request", "container_group_id must not be empty"
        )
    # The rule the OpenAPI document states (urlsplit raised on "http://[").
    if sub.webhook is not None and not _WEBHOOK.search(sub.webhook):
        raise HTTPProblem(
            400, "Invalid request", "webhook must be an http:// or https:// URL"
        )
    legacy = {k: getattr(sub, k) for k in LEGACY_STORAGE_FIELDS}
    if sub.sync is not None:
        if any(legacy.values()):
            raise HTTPProblem(
                400, "Invalid request", "Cannot use both sync and bucket/prefix"
            )
        for phase, entry in sub.sync.entries():
            wanted = (
                SyncDirection.DOWNLOAD if phase == "before" else SyncDirection.UPLOAD
            )
            if entry.direction is not wanted:
                raise HTTPProblem(
                    400,
                    "Invalid request",
                    f'sync.{phase}.direction must be "{wanted.value}"',
                )
            if entry.pattern is not None:
                try:
                    re.compile(entry.pattern)
                except re.error as exc:
                    raise HTTPProblem(
                        400,
                        "Invalid request",
                        f"sync.{phase}.pattern is not a valid regular "
                        f"expression: {exc}",
                    ) from exc

        def fix(
            entries: tuple[SyncConfig, ...] | None,
        ) -> tuple[SyncConfig, ...] | None:
            if entries is None:
                return None
            return tuple(
                attrs.evolve(e, prefix=_normalise_prefix(e.prefix)) for e in entries
            )

        sync = SyncSpec(
            before=fix(sub.sync.before),
            during=fix(sub.sync.during),
            after=fix(sub.sync.after),
        )
        return attrs.evolve(sub, sync=sync)
    if not all(legacy.values()):
        raise HTTPProblem(
            400, "Invalid request", "Must use either sync or bucket/prefix"
        )
    return attrs.evolve(
        sub,
        input_prefix=_normalise_prefix(sub.input_prefix or ""),
        checkpoint_prefix=_normalise_prefix(sub.checkpoint_prefix or ""),
        output_prefix=_normalise_prefix(sub.output_prefix or ""),
    )


# -- long-poll wake-ups -----------------------------------------------------------


class _Waker:
    """
    Wakes long polls waiting on a key: a queue ``(user_id, group)`` that may
    have gained a job, or a job ``(job_id,)`` that may have changed.

    The store announces changes from this process and, on PostgreSQL, from
    every replica (LISTEN/NOTIFY). A waiter also re-checks the database every
    ``recheck`` seconds, which catches expiring leases.
    """

    def __init__(self, recheck: float = 1.0) -> None:
        self.recheck = recheck
        self._events: dict[tuple[str, ...], asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def notify(self, *key: str) -> None:
        """
        Wake the waiters of one key; safe to call from any thread.
        """
        loop = self._loop
        if loop is not None and not _running_in(loop):
            loop.call_soon_threadsafe(self.notify, *key)
            return
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: tuple[str, ...], timeout: float) -> None:
        """
        Wait until the key is notified, ``timeout`` passes, or ``recheck``.
        """
        self._loop = asyncio.get_running_loop()
        event = self._events.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=min(timeout, self.recheck))


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- the application -----------------------------------------------------------


@attrs.define
class _State:
    store: Store
    metrics: ServerMetrics
    #: The job log table.
    logs: JobLogs
    #: Serve /metrics without a key.
    metrics_public: bool = False
    waker: _Waker = attrs.field(factory=_Waker)
    #: Wakes ``GET /jobs/{id}/status`` long polls when a job changes.
    jobs: _Waker = attrs.field(factory=_Waker)
    keys: dict[str, tuple[Principal, float]] = attrs.field(factory=dict)
    #: Wakes ``GET /jobs/{id}/logs?follow=true`` when lines arrive.
    log_waker: _Waker = attrs.field(factory=_Waker)
    #: The web dashboard's signed-in sessions.
    ui: UISessions = attrs.field(factory=UISessions)
    #: Checks SaladCloud credentials; ``None``: they are refused.
    salad: SaladAuth | None = None
    #: How webhooks are checked and sent.
    webhooks: WebhookSettings = attrs.field(factory=WebhookSettings)
    #: Failed authentications per client address; ``None``: not limited.
    failures: FailureLimiter | None = None
    #: Requests per API key; ``None``: not limited.
    key_limit: KeyRateLimiter | None = None


def _state(request: Request[Any, Any, Any]) -> _State:
    state: _State = request.app.state.kelpie
    return state


def _client_address(request: Request[Any, Any, Any]) -> str:
    client = request.client
    return client.host if client is not None else "-"


def _too_many(retry_after: int, message: str) -> HTTPProblem:
    return HTTPProblem(
        429,
        "Too Many Requests",
        message,
        headers={"Retry-After": str(retry_after)},
    )


def _authenticate(request: Request[Any, Any, Any]) -> Principal:
    state = _state(request)
    address = _client_address(request)
    if state.failures is not None:
        wait = state.failures.retry_after(address)
        if wait is not None:
            raise _too_many(
                wait,
                "too many requests with a wrong API key from this address; "
                f"retry in {wait} s",
            )
    principal = _principal(request, state, address)
    access = request.route_handler.opt.get("access")
    if access is None or access == "public" or principal.role not in access:
        if access == ("admin",):
            raise HTTPProblem(403, "Forbidden", "Admin Only")  # as the original
        raise HTTPProblem(
            403,
            "Forbidden",
            f"a {principal.role} key may not call {request.method} {request.url.path}",
        )
    if state.key_limit is not None and principal.key_id:
        wait = state.key_limit.take(principal.key_id)
        if wait is not None:
            raise _too_many(
                wait,
                f"this API key made more than {state.key_limit.per_minute} "
                f"requests a minute; retry in {wait} s",
            )
    return principal


def _principal(
    request: Request[Any, Any, Any], state: _State, address: str
) -> Principal:
    headers = request.headers
    salad_key = headers.get("salad-api-key")
    org = headers.get("salad-organization")
    project = headers.get("salad-project")
    if salad_key and not (org and project):
        raise HTTPProblem(
            400,
            "Bad Request",
            "Salad API Key requires Salad-Organization and Salad-Project headers",
        )
    if headers.get("authorization") and not project:
        raise HTTPProblem(
            400, "Bad Request", "Bearer Token requires Salad-Project header"
        )
    key = headers.get("x-kelpie-key")
    if not key and not (salad_key or headers.get("authorization")):
        # The dashboard's session cookie; changes need its CSRF token.
        try:
            key = state.ui.principal_key(request)
        except PermissionError as exc:
            raise HTTPProblem(403, "Forbidden", str(exc)) from exc
    if key:
        cached = state.keys.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = state.store.principal_for_key(key)
        if principal is None:
            state.keys.pop(key, None)
            if state.failures is not None:
                state.failures.failed(address)
            raise HTTPProblem(403, "Forbidden", "Invalid API Key")
        if len(state.keys) > 10_000:
            state.keys.clear()
        state.keys[key] = (principal, now + KEY_CACHE_SECONDS)
        _mark_used(state.store, principal)
        return principal
    if salad_key or headers.get("authorization"):
        return _salad_principal(request, salad_key, org, project or "")
    raise HTTPProblem(401, "Unauthorized", "API Key or Bearer Token Required")


def _salad_principal(
    request: Request[Any, Any, Any],
    salad_key: str | None,
    org: str | None,
    project: str,
) -> Principal:
    # A SaladCloud API key or workload token (see _salad_auth); user role.
    state = _state(request)
    if state.salad is None:
        raise HTTPProblem(
            403,
            "Forbidden",
            "SaladCloud API keys and workload tokens are not accepted by this "
            "server (see --salad-jwks-url); use X-Kelpie-Key",
        )
    try:
        return state.salad.principal(
            state.store,
            api_key=salad_key,
            organization=org,
            project=project,
            authorization=request.headers.get("authorization"),
        )
    except SaladAuthError as exc:
        error = "Service Unavailable" if exc.status == 503 else "Forbidden"
        raise HTTPProblem(exc.status, error, str(exc)) from exc


def _mark_used(store: Store, principal: Principal) -> None:
    """
    Update the key's ``last_used`` if it is more than a minute old.

    Runs only when a key is looked up in the database (at most every
    ``KEY_CACHE_SECONDS`` per key and process), so requests served from the
    key cache never write.
    """
    if not principal.key_id:
        return
    last = principal.last_used
    if last is not None and store.now_ms() - last < LAST_USED_EVERY_MS:
        return
    try:
        store.mark_key_used(principal.key_id)
    except DatabaseUnavailable:
        logger.warning("could not record the use of key %s", principal.key_id)


def _forget_key(state: _State, key_id: str) -> None:
    """
    Drop a revoked key from this process's key cache.
    """
    for key, (principal, _) in list(state.keys.items()):
        if principal.key_id == key_id:
            state.keys.pop(key, None)


def _admin(principal: NamedDependency[Principal]) -> None:
    if not principal.is_admin:
        raise HTTPProblem(403, "Forbidden", "Admin Only")


def _job_response(job: Job, status: int = 200) -> Response[Job]:
    return _json(job.to_json(), status)


def _not_found(what: str = "Job") -> HTTPProblem:
    return HTTPProblem(404, "Not Found", f"{what} not found")


# Jobs ------------------------------------------------------------------------


async def _check_depth(request: Request[Any, Any, Any]) -> None:
    """
    Refuse a JSON body nested too deeply, before anything decodes it (the
    decoder recurses, and ~1,000 levels exhaust the stack).

    The ``before_request`` of the routes that carry a job's output (log
    lines, a failure's error), where NULs are replaced, not refused.
    """
    if request.method in ("POST", "PATCH", "PUT") and json_too_deep(
        await request.body()
    ):
        raise HTTPProblem(
            400,
            "Bad Request",
            f"JSON nested more than {MAX_JSON_DEPTH} levels deep",
        )


async def _check_body(request: Request[Any, Any, Any]) -> None:
    """
    Every route's ``before_request``: ``_check_depth``, and no NUL in any
    string (PostgreSQL cannot store it).
    """
    await _check_depth(request)
    if request.method in ("POST", "PATCH", "PUT") and json_has_nul(
        await request.body()
    ):
        raise HTTPProblem(
            400, "Bad Request", "strings must not contain NUL characters (\\u0000)"
        )


async def _check_job_body(request: Request[Any, Any, Any]) -> None:
    # Runs before Litestar decodes the body, whose error for a misspelt
    # required field would name the missing field, not the misspelt one.
    await _check_body(request)
    try:
        raw = await request.json()
    except SerializationException:
        return  # malformed JSON: Litestar's decoding answers it
    _check_submission_fields(raw)


#: The ``Idempotency-Key`` header, as the submission endpoints declare it.
_IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_HEADER,
        required=False,
        description=(
            "Makes the submission safe to repeat: a repeat with the same key "
            "and body within 24 hours queues nothing and gets the first answer "
            f"again (with `{REPLAYED_HEADER}: true`); the same key with another "
            "body is 409. 1 to 255 printable ASCII characters; keys are per "
            "tenant."
        ),
    ),
]


def _idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise HTTPProblem(
            400, "Bad Request", f"send one {IDEMPOTENCY_HEADER} header, not several"
        )
    key: str = values[0]
    if not is_idempotency_key(key):
        raise HTTPProblem(
            400,
            "Bad Request",
            f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} "
            "printable ASCII characters",
        )
    return key


async def _queue(
    request: Request[Any, Any, Any],
    principal: Principal,
    subs: list[JobSubmission],
    route: str,
    render: Callable[[list[Job]], Any],
) -> Response[Any]:
    """
    Queue validated submissions and answer 202 with ``render(jobs)``; with an
    ``Idempotency-Key``, at most once per key (a repeat replays the answer).
    """
    store = _state(request).store
    key = _idempotency_key(request)
    if key is None:
        return _json(render(store.insert_jobs(principal.user_id, subs)), 202)
    # What was asked, whatever the JSON's key order or spacing.
    canonical = msgspec.json.encode(await request.json(), order="sorted")
    fingerprint = hashlib.sha256(route.encode() + b"\n" + canonical).hexdigest()
    try:
        answer = store.insert_jobs_once(
            principal.user_id,
            subs,
            key=key,
            fingerprint=fingerprint,
            status=202,
            render=lambda jobs: msgspec.json.encode(render(jobs)).decode(),
        )
    except IdempotencyConflict:
        raise HTTPProblem(
            409,
            "Conflict",
            f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different "
            "request (another body or endpoint); send a new key for a new "
            "submission",
        ) from None
    response = Response(
        content=answer.body.encode(), status_code=answer.status, media_type=_JSON
    )
    if answer.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


def _echo_key(request: Request[Any, Any, Any]) -> str | None:
    """
    The request's X-Kelpie-Key for the webhooks it causes, if the operator
    opted in to the original's echo (else ``None``: nothing is stored).
    """
    if not _state(request).webhooks.echo_key:
        return None
    return request.headers.get("x-kelpie-key", "")


def _check_webhook(request: Request[Any, Any, Any], sub: JobSubmission) -> None:
    if sub.webhook is None:
        return
    reason = check_literal(sub.webhook, _state(request).webhooks.allow)
    if reason is not None:
        raise HTTPProblem(400, "Invalid request", reason)


@post("/jobs", status_code=202, before_request=_check_job_body, opt=ACCESS_USERS)
async def submit_job(
    request: Request[Any, Any, Any],
    data: JSONBody[JobSubmission],
    principal: NamedDependency[Principal],
    idempotency_key: _IdempotencyKey = None,
) -> Response[Job]:
    """
    Queue one job.
    """
    sub = validate_submission(_decode_submission(await request.json()))
    _check_webhook(request, sub)
    return await _queue(
        request, principal, [sub], "POST /jobs", lambda jobs: jobs[0].to_json()
    )


@post("/jobs/batch", status_code=202, opt=ACCESS_USERS)
async def submit_batch(
    request: Request[Any, Any, Any],
    # Decoded item by item below, so that an error names the item's index;
    # the schema still documents the items as JobSubmission.
    data: Annotated[
        list[dict[str, Any]],
        BodyKwarg(
            media_type=RequestEncodingType.JSON,
            description=f"1 to {MAX_BATCH_SIZE} jobs",
            schema_extra={"items": {"$ref": "#/components/schemas/JobSubmission"}},
        ),
    ],
    principal: NamedDependency[Principal],
    idempotency_key: _IdempotencyKey = None,
) -> Response[list[Job]]:
    """
    Queue 1 to 1000 jobs in one transaction; the response keeps request order.
    """
    raw = await request.json()
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCH_SIZE:
        raise HTTPProblem(
            400,
            "Invalid request",
            f"expected a JSON array of 1 to {MAX_BATCH_SIZE} jobs",
        )
    subs = []
    for index, item in enumerate(raw):
        try:
            sub = validate_submission(_decode_submission(item, "job"))
            _check_webhook(request, sub)
            subs.append(sub)
        except HTTPProblem as exc:
            exc.extra["index"] = index
            raise
    return await _queue(
        request,
        principal,
        subs,
        "POST /jobs/batch",
        lambda jobs: [j.to_json() for j in jobs],
    )


@get("/jobs", sync_to_thread=False, opt=ACCESS_USERS)
def list_jobs(
    request: Request[Any, Any, Any],
    principal: NamedDependency[Principal],
    status: FromQuery[str | None] = None,
    container_group_id: FromQuery[str | None] = None,
    page: FromQuery[int] = 1,
    page_size: FromQuery[int] = 100,
    asc: FromQuery[bool] = False,
    id_prefix: FromQuery[str | None] = None,
    name: FromQuery[str | None] = None,
    tag: FromQuery[list[str] | None] = None,
) -> Response[dict[str, Any]]:
    """
    One page of the caller's jobs: ``{"_count": <jobs on this page>, "jobs": [...]}``.

    This project's additions: ``id_prefix`` keeps the jobs whose id starts
    with it (the CLI uses it to accept a short job id); ``name`` keeps the jobs
    with exactly that name; ``tag`` (repeatable) keeps the jobs carrying every
    tag given.
    """
    if status is not None and status not in JobStatus._value2member_map_:
        raise HTTPProblem(
            400,
            "Bad Request",
            f"unknown status {status!r}; expected one of "
            + ", ".join(s.value for s in JobStatus),
        )
    _check_integers(page=page, page_size=page_size)
    if id_prefix is not None and len(id_prefix) > MAX_ID_LENGTH:
        raise HTTPProblem(
            400,
            "Bad Request",
            f"id_prefix must be at most {MAX_ID_LENGTH} characters (a job id's length)",
        )
    tags = tag or []
    if len(tags) > MAX_TAGS:
        raise HTTPProblem(
            400, "Bad Request", f"at most {MAX_TAGS} tag filters may be given"
        )
    for one in tags:
        try:
            check_tag(one)
        except ValueError as exc:
            raise HTTPProblem(400, "Bad Request", str(exc)) from exc
    jobs = _state(request).store.list_jobs(
        principal,
        status=None if status is None else JobStatus(status),
        container_group_id=container_group_id or None,
        page=page,
        page_size=page_size,
        asc=asc,
        id_prefix=id_prefix or None,
        name=name or None,
        tags=tags,
    )
    return _json({"_count": len(jobs), "jobs": [j.to_json() for j in jobs]})


@get("/jobs/{job_id:str}", sync_to_thread=False, opt=ACCESS_USERS)
def get_job(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
) -> Response[Job]:
    """
    One job.
    """
    job = _state(request).store.get_job(principal, job_id)
    if job is None:
        raise _not_found()
    return _job_response(job)


@get("/jobs/{job_id:str}/events", sync_to_thread=False, opt=ACCESS_USERS)
def job_events(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
) -> Response[dict[str, Any]]:
    """
    The job's history, oldest first: ``{"_count": n, "events": [...]}``.

    Every transition with its time, attempt, machine and cause (this
    project's addition). Only the job's owner and the admin may read it.
    """
    events = _state(request).store.events(principal, job_id)
    if events is None:
        raise _not_found()
    return _json({"_count": len(events), "events": [e.to_json() for e in events]})


@delete("/jobs/{job_id:str}", status_code=202, sync_to_thread=False, opt=ACCESS_USERS)
def cancel_job(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    Cancel a pending or running job. A completed or failed job stays so (409).
    """
    outcome = _state(request).store.cancel(
        principal, job_id, echo_key=_echo_key(request)
    )
    if outcome == "not_found":
        raise _not_found()
    if isinstance(outcome, JobStatus):
        raise HTTPProblem(409, "Conflict", f"Job already {outcome.value}")
    _state(request).metrics.cancels.inc()
    _state(request).jobs.notify(job_id)
    return _json({"message": "Job canceled"}, 202)


@delete(
    "/jobs/container-groups/{group:str}",
    status_code=200,
    sync_to_thread=False,
    opt=ACCESS_USERS,
)
def purge_group(
    request: Request[Any, Any, Any],
    group: FromPath[str],
    principal: NamedDependency[Principal],
) -> Response[dict[str, int]]:
    """
    Delete the caller's pending jobs in a container group; cancel its running ones.
    """
    count = _state(request).store.purge_group(
        principal, group, echo_key=_echo_key(request)
    )
    return _json({"count": count})


@delete("/jobs", status_code=204, sync_to_thread=False, opt=ACCESS_ADMIN)
def delete_all_jobs(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> None:
    """
    Delete every job (admin only).
    """
    _admin(principal)
    _state(request).store.delete_all_jobs()


@get("/machines", sync_to_thread=False, opt=ACCESS_USERS)
def list_machines(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[dict[str, Any]]:
    """
    The machines that worked for the caller (every user's for the admin):
    group, last seen, the job each runs, its claims, completions, failures
    (and on how many jobs), interruptions, observed uptime and quarantine;
    and ``unserved_groups``, the caller's groups with pending jobs but no live
    machine. Not in the original API.
    """
    return _json(_state(request).store.list_machines(principal).to_json())


# Worker protocol ------------------------------------------------------------------


@get("/work", opt=ACCESS_ANY)
async def get_work(
    request: Request[Any, Any, Any],
    principal: NamedDependency[Principal],
    machine_id: FromQuery[str | None] = None,
    container_group_id: FromQuery[str | None] = None,
    wait: FromQuery[float | None] = None,
) -> Response[list[Job]]:
    """
    Claim the next job of a queue: ``[]`` or ``[job]`` (already ``running``).

    ``wait`` (seconds, up to 60) makes an idle call wait for a job to arrive
    instead of answering ``[]`` at once; without it the call behaves as the
    original.

    A quarantined machine gets ``[]`` at once, with the header
    ``Kelpie-Quarantined-Until`` (an ISO 8601 time): it should move to
    another node.
    """
    if not machine_id or not container_group_id:
        raise HTTPProblem(
            400,
            "Bad Request",
            "query parameters machine_id and container_group_id are required",
        )
    _check_keys(machine_id=machine_id, container_group_id=container_group_id)
    _check_wait(wait)
    _check_group(principal, container_group_id)
    state = _state(request)
    deadline = time.monotonic() + (wait or 0.0)
    gone: asyncio.Task[None] | None = None
    polling = False
    try:
        while True:
            job = state.store.claim(
                principal,
                machine_id=machine_id,
                group=container_group_id,
                echo_key=_echo_key(request),
            )
            if job is not None:
                state.metrics.claims.inc()
                state.jobs.notify(job.id)  # a reclaim: the old holder's poll
                return _json([job.to_json()])
            until = state.store.quarantined_until(principal, machine_id)
            if until is not None:
                # No work, and a hint the original worker ignores: move on.
                answer = _json([])
                answer.headers[QUARANTINE_HEADER] = format_timestamp(until)
                return answer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _json([])
            if not polling:
                polling = True
                state.metrics.long_polls.labels("work").inc()
            # A worker that stopped waiting (shut down, timed out) must not be
            # handed a job it will never run: watch for its disconnect.
            gone = gone or asyncio.ensure_future(_disconnect(request))
            key = (principal.user_id, container_group_id)
            if await _woken_or_gone(gone, state.waker.wait(key, remaining)):
                return _json([])
    finally:
        if polling:
            state.metrics.long_polls.labels("work").dec()
        if gone is not None:
            gone.cancel()


def _check_keys(**values: str) -> None:
    """
    A 400 for an id longer than ``MAX_KEY_LENGTH`` (an index key's limit).
    """
    for name, value in values.items():
        if len(value) > MAX_KEY_LENGTH:
            raise HTTPProblem(
                400,
                "Bad Request",
                f"{name} must be at most {MAX_KEY_LENGTH} characters, got {len(value)}",
            )


def _check_integers(**values: int | None) -> None:
    """
    A 400 for a query parameter outside its range in ``INTEGER_RANGES``.
    """
    for name, value in values.items():
        try:
            check_integer(name, value)
        except ValueError as exc:
            message = str(exc).replace("log_attempt", "attempt")
            raise HTTPProblem(400, "Bad Request", message) from exc


def _check_group(principal: Principal, group: str) -> None:
    """
    A 403 unless the key may work on the container group.
    """
    allowed = principal.container_groups
    if allowed is not None and group not in allowed:
        raise HTTPProblem(
            403,
            "Forbidden",
            f"this key may only work on the container groups {', '.join(allowed)}",
        )


def _check_job_group(
    request: Request[Any, Any, Any], principal: Principal, job_id: str
) -> None:
    """
    For a key limited to some container groups: a 403 unless the job is in
    one of them (a 404 if there is no such job of the key's user).
    """
    if principal.container_groups is None:
        return
    group = _state(request).store.job_group(principal.user_id, job_id)
    if group is None:
        raise _not_found()
    _check_group(principal, group)


def _check_wait(wait: float | None) -> None:
    """
    A 400 for a long poll's ``wait`` outside 0 to ``MAX_LONG_POLL`` seconds.
    """
    if wait is not None and not 0 <= wait <= MAX_LONG_POLL:
        raise HTTPProblem(
            400, "Bad Request", f"wait must be between 0 and {MAX_LONG_POLL:g} seconds"
        )


async def _woken_or_gone(
    gone: asyncio.Task[None], wake: Coroutine[Any, Any, None]
) -> bool:
    """
    Wait for ``wake`` or the client's disconnect (``gone``, from
    ``_disconnect``); ``True`` when the client left (``wake`` is canceled).
    """
    waiting = asyncio.ensure_future(wake)
    await asyncio.wait({gone, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if gone.done():
        waiting.cancel()
        return True
    return False


async def _disconnect(request: Request[Any, Any, Any]) -> None:
    """
    Return once the client has closed the connection.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _no_nul(text: str | None) -> str | None:
    return None if text is None else text.replace("\x00", "\ufffd")


async def _report(request: Request[Any, Any, Any]) -> WorkerReport:
    report = _strict(await request.json(), WorkerReport)
    if not report.machine_id:
        raise HTTPProblem(400, "Bad Request", "machine_id must not be empty")
    if "\x00" in report.machine_id + report.container_group_id:
        raise HTTPProblem(
            400, "Bad Request", "strings must not contain NUL characters (\\u0000)"
        )
    # ``error`` is the tail of the job's output, which may hold NULs that
    # PostgreSQL cannot store; the report must not be refused for them.
    # (``progress`` is stored as JSON text, where a NUL stays escaped.)
    return attrs.evolve(
        report, error=_no_nul(report.error), reason=_no_nul(report.reason)
    )


def _fenced(
    outcome: ReportOutcome, verb: str, job_id: str, report: WorkerReport
) -> bool:
    """
    Turn a fenced report's outcome into an answer; ``True`` if it took effect.

    A report without ``attempt`` comes from a worker written for the original
    API, which answered every report with success and whose worker exits after
    three refused reports. Such a report from a caller that does not hold the
    job changes nothing, is logged, and is answered as a success. A report
    that carries ``attempt`` is told the truth: 409. The original also answered
    ``/completed`` for an unknown job with success (its failure report was
    already a 404), so a ``completed`` report without ``attempt`` for a job
    that no longer exists (deleted while it ran) is answered the same way.
    """
    legacy = report.attempt is None
    if outcome == "not_found" and not (legacy and verb == "completion"):
        raise _not_found()
    if outcome in ("not_holder", "not_found"):
        if legacy:
            logger.warning(
                "ignored the %s report for job %s from machine %s, which does "
                "not hold it (canceled, finished, claimed again or deleted); "
                "answered as a success for compatibility",
                verb,
                job_id,
                report.machine_id,
            )
            return False
        raise HTTPProblem(
            409,
            "Conflict",
            f"cannot report {verb}: this machine (and attempt) does not hold the job",
        )
    return True


@post(
    "/jobs/{job_id:str}/heartbeat",
    status_code=200,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def heartbeat(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    data: JSONBody[WorkerReport],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    Extend the holder's lease. ``{"status": "canceled"}`` means: stop the job now.
    """
    report = await _report(request)
    _check_job_group(request, principal, job_id)
    status = _state(request).store.heartbeat(principal, job_id, report)
    if status is None:
        raise _not_found()
    return _json({"status": status.value})


@post(
    "/jobs/{job_id:str}/completed",
    status_code=200,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def completed(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    data: JSONBody[WorkerReport],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    The holder reports success.

    From a caller that no longer holds the job: 409 if the report carries
    ``attempt``, else ignored and answered as a success (as the original).
    """
    report = await _report(request)
    _check_job_group(request, principal, job_id)
    state = _state(request)
    if _fenced(
        state.store.complete(principal, job_id, report, echo_key=_echo_key(request)),
        "completion",
        job_id,
        report,
    ):
        state.metrics.completions.inc()
        state.jobs.notify(job_id)
    return _json({"message": "Completed reported"})


@post(
    "/jobs/{job_id:str}/failed",
    status_code=202,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def failed(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    data: JSONBody[WorkerReport],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    The holder reports a failure: the machine is banned from the job, and the
    job is requeued at once unless it reached ``max_failures``.

    From a caller that no longer holds the job: 409 if the report carries
    ``attempt``, else ignored and answered as a success (as the original).
    """
    report = await _report(request)
    _check_job_group(request, principal, job_id)
    state = _state(request)
    outcome = state.store.fail(principal, job_id, report, echo_key=_echo_key(request))
    if _fenced(outcome, "failure", job_id, report):
        state.metrics.failures.inc()
        state.jobs.notify(job_id)
    return _json({"message": "Failure reported"}, 202)


@post(
    "/jobs/{job_id:str}/release",
    status_code=200,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def release(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    data: JSONBody[WorkerReport],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    The holder hands the job back to the queue at once (an interruption, not a
    failure): a worker restarting, shutting down, or a job exiting with 85.
    """
    report = await _report(request)
    _check_job_group(request, principal, job_id)
    state = _state(request)
    if _fenced(
        state.store.release(principal, job_id, report), "release", job_id, report
    ):
        state.metrics.releases.inc()
        state.jobs.notify(job_id)
    return _json({"message": "Job released"})


# Progress and status between heartbeats (optional additions) ------------------------


@post(
    "/jobs/{job_id:str}/progress",
    status_code=200,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def report_progress(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    data: JSONBody[WorkerReport],
    principal: NamedDependency[Principal],
) -> Response[dict[str, str]]:
    """
    The holder's latest progress record, sent as soon as the job writes it.

    Unlike a heartbeat it does not extend the lease. Answered like a
    heartbeat: ``{"status": "canceled"}`` means: stop the job now.
    """
    report = await _report(request)
    _check_job_group(request, principal, job_id)
    if report.progress is None:
        raise HTTPProblem(
            400, "Bad Request", "progress is required: the job's latest progress record"
        )
    status = _state(request).store.report_progress(principal, job_id, report)
    if status is None:
        raise _not_found()
    return _json({"status": status.value})


@get("/jobs/{job_id:str}/status", opt=ACCESS_ANY)
async def holder_status(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
    machine_id: FromQuery[str | None] = None,
    attempt: FromQuery[int | None] = None,
    wait: FromQuery[float | None] = None,
) -> Response[dict[str, str]]:
    """
    The job's status for its holder: ``{"status": "running"}`` while
    ``machine_id`` (and ``attempt``) holds it, else ``canceled`` or the final
    status, as a heartbeat would answer, without extending the lease.

    ``wait`` (seconds, up to 60) holds the request while the answer is
    ``running`` and returns at once when the job is canceled, finished or
    claimed by someone else: a worker learns of a cancel without waiting for
    its next heartbeat.
    """
    if not machine_id:
        raise HTTPProblem(400, "Bad Request", "query parameter machine_id is required")
    _check_keys(machine_id=machine_id)
    _check_integers(attempt=attempt)
    _check_wait(wait)
    _check_job_group(request, principal, job_id)
    state = _state(request)
    deadline = time.monotonic() + (wait or 0.0)
    gone: asyncio.Task[None] | None = None
    polling = False
    try:
        while True:
            status = state.store.holder_status(
                principal, job_id, machine_id=machine_id, attempt=attempt
            )
            if status is None:
                raise _not_found()
            remaining = deadline - time.monotonic()
            if status is not JobStatus.RUNNING or remaining <= 0:
                return _json({"status": status.value})
            if not polling:
                polling = True
                state.metrics.long_polls.labels("status").inc()
            gone = gone or asyncio.ensure_future(_disconnect(request))
            if await _woken_or_gone(gone, state.jobs.wait((job_id,), remaining)):
                return _json({"status": status.value})
    finally:
        if polling:
            state.metrics.long_polls.labels("status").dec()
        if gone is not None:
            gone.cancel()


# Job logs (optional addition) -----------------------------------------------------

#: The most lines one ``POST /jobs/{id}/logs`` may carry.
MAX_LOG_BATCH = 10_000
#: The most lines one ``GET /jobs/{id}/logs`` returns.
MAX_LOG_PAGE = INTEGER_RANGES["limit"][1]
#: Line times from the year 5000 on are mistakes (seconds since the epoch).
_MAX_LOG_TIME = 95_617_584_000.0
#: How long ``GET /jobs/{id}/logs?follow=true`` waits for a line by default.
DEFAULT_LOG_WAIT = 20.0


class ShippedLine(msgspec.Struct):
    """
    One line of a log batch: ``stream`` is ``stdout`` or ``stderr``,
    ``time`` seconds since the epoch.
    """

    stream: str
    time: float
    line: str


class LogBatch(msgspec.Struct):
    """
    The body of ``POST /jobs/{id}/logs``: lines of one attempt, from its holder.

    ``offset`` is the worker's number for the first line (it numbers every
    line of the attempt from 0, counting the lines it dropped).
    """

    machine_id: str
    attempt: int
    offset: int
    lines: list[ShippedLine]
    container_group_id: str = ""


#: Decodes a batch in one strict pass, straight from the body's bytes: with
#: thousands of lines a second, Litestar's own body handling cost more than
#: storing the lines.
_LOG_BATCH = msgspec.json.Decoder(LogBatch)


def _log_batch_schema() -> Any:
    from litestar.openapi.spec import OpenAPIType, Schema

    def typed(kind: OpenAPIType, description: str, **rules: Any) -> Schema:
        return Schema(type=kind, description=description, **rules)

    line = Schema(
        type=OpenAPIType.OBJECT,
        required=["stream", "time", "line"],
        properties={
            "stream": Schema(type=OpenAPIType.STRING, enum=["stdout", "stderr"]),
            "time": typed(
                OpenAPIType.NUMBER,
                "seconds since the epoch",
                minimum=0,
                exclusive_maximum=_MAX_LOG_TIME,
            ),
            "line": typed(OpenAPIType.STRING, "the text, without its line break"),
        },
    )
    return Schema(
        type=OpenAPIType.OBJECT,
        required=["machine_id", "attempt", "offset", "lines"],
        properties={
            "machine_id": typed(
                OpenAPIType.STRING,
                "the holder",
                min_length=1,
                max_length=MAX_KEY_LENGTH,
            ),
            "container_group_id": typed(
                OpenAPIType.STRING, "optional", max_length=MAX_KEY_LENGTH
            ),
            "attempt": typed(
                OpenAPIType.INTEGER,
                "the claim's attempt",
                minimum=INTEGER_RANGES["log_attempt"][0],
                maximum=INTEGER_RANGES["log_attempt"][1],
            ),
            "offset": typed(
                OpenAPIType.INTEGER,
                "the number of the first line among all the attempt's lines",
                minimum=INTEGER_RANGES["offset"][0],
                maximum=INTEGER_RANGES["offset"][1],
            ),
            "lines": Schema(
                type=OpenAPIType.ARRAY, items=line, max_items=MAX_LOG_BATCH
            ),
        },
    )


@dataclasses.dataclass
class _LogBatchOperation(Operation):
    """Documents the body that ``ship_logs`` decodes itself."""

    def __post_init__(self) -> None:
        from litestar.openapi.spec import OpenAPIMediaType, RequestBody

        self.request_body = RequestBody(
            required=True,
            content={_JSON: OpenAPIMediaType(schema=_log_batch_schema())},
        )


@post(
    "/jobs/{job_id:str}/logs",
    status_code=200,
    operation_class=_LogBatchOperation,
    before_request=_check_depth,
    opt=ACCESS_ANY,
)
async def ship_logs(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
) -> Response[dict[str, int]]:
    """
    The holder appends a batch of its attempt's output lines.

    Accepted from the machine and attempt that the job names, whatever its
    status (the last lines may follow the final report); 409 from anyone else.
    A batch already stored (same ``offset``) is not stored twice.
    """
    body = await request.body()
    if not body.strip():
        raise HTTPProblem(400, "Bad Request", "request body is empty; expected JSON")
    try:
        batch = _LOG_BATCH.decode(body)
    except msgspec.ValidationError as exc:
        raise HTTPProblem(400, "Bad Request", f"invalid body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise HTTPProblem(400, "Bad Request", f"malformed JSON: {exc}") from exc
    if not batch.machine_id:
        raise HTTPProblem(400, "Bad Request", "machine_id must not be empty")
    _check_keys(
        machine_id=batch.machine_id, container_group_id=batch.container_group_id
    )
    if "\x00" in batch.machine_id + batch.container_group_id:
        raise HTTPProblem(
            400, "Bad Request", "strings must not contain NUL characters (\\u0000)"
        )
    _check_integers(offset=batch.offset, log_attempt=batch.attempt)
    if len(batch.lines) > MAX_LOG_BATCH:
        raise HTTPProblem(
            400,
            "Bad Request",
            f"a batch carries at most {MAX_LOG_BATCH} lines; send more batches",
        )
    for item in batch.lines:
        if item.stream not in ("stdout", "stderr"):
            raise HTTPProblem(
                400,
                "Bad Request",
                f"stream must be 'stdout' or 'stderr', got {item.stream!r}",
            )
        if not 0 <= item.time < _MAX_LOG_TIME:
            raise HTTPProblem(
                400,
                "Bad Request",
                f"time must be seconds since the epoch, got {item.time!r}",
            )
    _check_job_group(request, principal, job_id)
    state = _state(request)
    outcome = state.logs.append(
        job_id=job_id,
        user_id=principal.user_id,
        machine_id=batch.machine_id,
        attempt=batch.attempt,
        offset=batch.offset,
        lines=[
            # A job may print NULs; PostgreSQL cannot store them.
            IncomingLine(
                item.stream, int(item.time * 1000), item.line.replace("\x00", "\ufffd")
            )
            for item in batch.lines
        ],
    )
    if outcome == "not_found":
        raise _not_found()
    if outcome == "not_holder":
        raise HTTPProblem(
            409,
            "Conflict",
            "cannot store logs: this machine and attempt are not the job's latest",
        )
    state.log_waker.notify(job_id)
    return _json({"accepted": len(batch.lines)})


@get("/jobs/{job_id:str}/logs", opt=ACCESS_USERS)
async def read_logs(
    request: Request[Any, Any, Any],
    job_id: FromPath[str],
    principal: NamedDependency[Principal],
    attempt: FromQuery[int | None] = None,
    since: FromQuery[int] = 0,
    limit: FromQuery[int] = 1000,
    follow: FromQuery[bool] = False,
    wait: FromQuery[float | None] = None,
) -> Response[dict[str, Any]]:
    """
    A job's output lines after the cursor ``since``, oldest first:
    ``{"lines": [{"seq", "attempt", "stream", "time", "line"}], "next": cursor,
    "more": bool, "finished": bool}``.

    Pass ``next`` as ``since`` to read on. ``more`` says that lines are left
    now; ``finished`` that the job is in a final state and every line has
    been returned. With ``follow=true`` an empty answer is held up to
    ``wait`` seconds (default 20, up to 60) until lines arrive or the job
    ends.
    """
    _check_integers(limit=limit, since=since, attempt=attempt)
    _check_wait(wait)
    state = _state(request)
    deadline = time.monotonic() + (
        (DEFAULT_LOG_WAIT if wait is None else wait) if follow else 0.0
    )
    gone: asyncio.Task[None] | None = None
    try:
        while True:
            job = state.store.get_job(principal, job_id)
            if job is None:
                raise _not_found()
            lines = state.logs.read(job_id, attempt=attempt, since=since, limit=limit)
            remaining = deadline - time.monotonic()
            if lines or job.finished or remaining <= 0:
                break
            gone = gone or asyncio.ensure_future(_disconnect(request))
            if await _woken_or_gone(gone, state.log_waker.wait((job_id,), remaining)):
                break
    finally:
        if gone is not None:
            gone.cancel()
    more = len(lines) == limit
    return _json(
        {
            "lines": [
                {
                    "seq": line.seq,
                    "attempt": line.attempt,
                    "stream": line.stream,
                    "time": format_timestamp(
                        dt.datetime.fromtimestamp(line.time_ms / 1000, dt.UTC)
                    ),
                    "line": line.line,
                }
                for line in lines
            ],
            "next": lines[-1].seq if lines else since,
            "more": more,
            "finished": job.finished and not more,
        }
    )


# Scaling rules -------------------------------------------------------------------


@post("/scaling-rules", status_code=201, opt=ACCESS_USERS)
async def create_rule(
    request: Request[Any, Any, Any],
    data: JSONBody[ScalingRuleSubmission],
    principal: NamedDependency[Principal],
) -> Response[ScalingRule]:
    """
    Store the caller's scaling rule for a container group (one per tenant and
    group; other tenants' rules for the same group are neither seen nor
    counted).
    """
    sub = _strict(await request.json(), ScalingRuleSubmission)
    if not _UUID.match(sub.container_group_id):
        raise HTTPProblem(400, "Bad Request", "container_group_id must be a UUID")
    rule = _state(request).store.create_rule(principal, sub)
    if rule is None:
        raise HTTPProblem(
            409, "Conflict", "you already have a scaling rule for this container group"
        )
    return _json(rule.to_json(), 201)


@get("/scaling-rules", sync_to_thread=False, opt=ACCESS_USERS)
def list_rules(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[dict[str, Any]]:
    """
    The caller's scaling rules: ``{"_count": n, "rules": [...]}``.
    """
    rules = _state(request).store.list_rules(principal)
    return _json({"_count": len(rules), "rules": [r.to_json() for r in rules]})


def _rule_not_found() -> HTTPProblem:
    return HTTPProblem(
        404, "Scaling Rule Not Found", "No scaling rule found for container group ID"
    )


def _rule_ambiguous() -> HTTPProblem:
    return HTTPProblem(
        409,
        "Conflict",
        "several users have a scaling rule for this container group; name one "
        "with ?user_id=",
    )


@get("/scaling-rules/{group:str}", sync_to_thread=False, opt=ACCESS_USERS)
def get_rule(
    request: Request[Any, Any, Any],
    group: FromPath[str],
    principal: NamedDependency[Principal],
    user_id: FromQuery[str | None] = None,
) -> Response[ScalingRule]:
    """
    The caller's scaling rule for a group.

    The admin may name the tenant with ``?user_id=`` (by default: the admin's
    own rule, else the group's only one; 409 if several tenants have one).
    The same holds for PATCH and DELETE.
    """
    rule = _state(request).store.get_rule(principal, group, user_id)
    if rule is None:
        raise _rule_not_found()
    if rule == "ambiguous":
        raise _rule_ambiguous()
    return _json(rule.to_json())


@patch("/scaling-rules/{group:str}", opt=ACCESS_USERS)
async def update_rule(
    request: Request[Any, Any, Any],
    group: FromPath[str],
    data: JSONBody[ScalingRuleUpdate],
    principal: NamedDependency[Principal],
    user_id: FromQuery[str | None] = None,
) -> Response[ScalingRule]:
    """
    Change some limits of the caller's scaling rule for a group.
    """
    update = _strict(await _raw_json(request), ScalingRuleUpdate)
    if not update.to_json():
        raise HTTPProblem(
            400,
            "Bad Request",
            "nothing to update: give min_replicas, max_replicas or "
            "idle_threshold_seconds",
        )
    result = _state(request).store.update_rule(principal, group, update, user_id)
    if result is None:
        raise _rule_not_found()
    if result == "ambiguous":
        raise _rule_ambiguous()
    if result == "invalid":
        raise HTTPProblem(
            400, "Bad Request", "min_replicas must not exceed max_replicas"
        )
    return _json(result.to_json())


@delete(
    "/scaling-rules/{group:str}",
    status_code=204,
    sync_to_thread=False,
    opt=ACCESS_USERS,
)
def delete_rule(
    request: Request[Any, Any, Any],
    group: FromPath[str],
    principal: NamedDependency[Principal],
    user_id: FromQuery[str | None] = None,
) -> None:
    """
    Delete the caller's scaling rule for a group (no error if there is none).
    """
    if _state(request).store.delete_rule(principal, group, user_id) == "ambiguous":
        raise _rule_ambiguous()


@delete("/scaling-rules", status_code=204, sync_to_thread=False, opt=ACCESS_ADMIN)
def delete_all_rules(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> None:
    """
    Delete every scaling rule (admin only).
    """
    _admin(principal)
    _state(request).store.delete_all_rules()


# Users -----------------------------------------------------------------------------


@attrs.frozen
class UserSubmission:
    """
    The body of ``POST /users``.
    """

    username: str


@attrs.frozen
class TokenRequest:
    """
    The body of ``POST /users/{id}/token``.
    """

    org_name: str = ""
    project_name: str = ""


@attrs.frozen
class TokenResponse:
    """
    A new API key.
    """

    token: str


@get("/users/me", sync_to_thread=False, opt=ACCESS_ANY)
def me(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[User]:
    """
    The caller.
    """
    user = _state(request).store.get_user(principal.user_id)
    if user is None:  # pragma: no cover - keys are deleted with their user
        raise HTTPProblem(404, "User not found", "User not found")
    return _json(user.to_json())


def _secret_response(secret: str, previous: str | None) -> Response[Any]:
    return _json({"secret": secret, "previous": previous})


@get("/users/me/webhook-secret", sync_to_thread=False, opt=ACCESS_USERS)
def get_webhook_secret(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[Any]:
    """
    The caller's webhook signing secret (created on first use), and the
    previous one while it still signs (a day after a rotation).
    """
    store = _state(request).store
    return _secret_response(
        *read_secret(store.engine, principal.user_id, store.now_ms())
    )


@post(
    "/users/me/webhook-secret",
    status_code=200,
    sync_to_thread=False,
    opt=ACCESS_USERS,
)
def rotate_webhook_secret(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> Response[Any]:
    """
    Replace the caller's webhook secret; webhooks carry signatures by both
    the new and the old secret for a day.
    """
    store = _state(request).store
    return _secret_response(
        *rotate_secret(store.engine, principal.user_id, store.now_ms())
    )


@post("/users", status_code=201, opt=ACCESS_ADMIN)
async def create_user(
    request: Request[Any, Any, Any],
    data: JSONBody[UserSubmission],
    principal: NamedDependency[Principal],
) -> Response[User]:
    """
    Create a user (admin only).
    """
    _admin(principal)
    sub = _strict(await request.json(), UserSubmission)
    if not sub.username.strip():
        raise HTTPProblem(400, "Bad Request", "username must not be empty")
    _check_keys(username=sub.username)
    user = _state(request).store.create_user(sub.username)
    if user is None:
        raise HTTPProblem(400, "User exists", "User exists")
    return _json(user.to_json(), 201)


@post("/users/{user_id:str}/token", status_code=201, opt=ACCESS_ADMIN)
async def create_token(
    request: Request[Any, Any, Any],
    user_id: FromPath[str],
    data: JSONBody[TokenRequest],
    principal: NamedDependency[Principal],
) -> Response[TokenResponse]:
    """
    Issue an API key for a user (admin only).
    """
    _admin(principal)
    body = _strict(await request.json(), TokenRequest)
    key = _state(request).store.create_key(user_id, body.org_name, body.project_name)
    if key is None:
        raise HTTPProblem(404, "User not found", "User not found")
    return _json({"token": key}, 201)


@delete("/users", status_code=204, sync_to_thread=False, opt=ACCESS_ADMIN)
def delete_users(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> None:
    """
    Delete every user except the admin, with their keys (admin only).
    """
    _admin(principal)
    state = _state(request)
    state.store.delete_users()
    state.keys.clear()
    if state.salad is not None:
        state.salad.forget_users()


# API keys (this project's addition) ------------------------------------------------

#: The longest ``expires_in`` accepted: ten years, in seconds.
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600
#: The most container groups one worker key may name.
MAX_KEY_GROUPS = 100


@attrs.frozen
class KeyRequest:
    """
    The body of ``POST /keys``.

    Attributes:
        role: ``user`` (default), ``worker``, or (admin keys only) ``admin``.
        container_groups: A worker key's only container groups; default: all.
        expires_in: Seconds until the key stops working; default: never.
        user_id: Whose key it is (admin keys only); default: the caller's user.
    """

    role: str = "user"
    container_groups: list[str] | None = None
    expires_in: int | None = None
    user_id: str | None = None


@post("/keys", status_code=201, opt=ACCESS_USERS)
async def create_api_key(
    request: Request[Any, Any, Any],
    data: JSONBody[KeyRequest],
    principal: NamedDependency[Principal],
) -> Response[dict[str, Any]]:
    """
    Make an API key; the answer's ``key`` is its secret, shown only here.

    A user key makes ``user`` and ``worker`` keys of its own user; only an
    admin key makes ``admin`` keys, or keys of another user (``user_id``).
    """
    body = _strict(await _raw_json(request), KeyRequest)
    if body.role not in KEY_ROLES:
        raise HTTPProblem(
            400, "Bad Request", f"role must be one of {', '.join(KEY_ROLES)}"
        )
    if body.expires_in is not None and not 1 <= body.expires_in <= MAX_EXPIRES_IN:
        raise HTTPProblem(
            400,
            "Bad Request",
            f"expires_in must be between 1 and {MAX_EXPIRES_IN} seconds",
        )
    groups = body.container_groups
    if groups is not None:
        if body.role != "worker":
            raise HTTPProblem(
                400, "Bad Request", "only worker keys take container_groups"
            )
        if not 1 <= len(groups) <= MAX_KEY_GROUPS or not all(g.strip() for g in groups):
            raise HTTPProblem(
                400,
                "Bad Request",
                f"container_groups must list 1 to {MAX_KEY_GROUPS} non-empty names",
            )
    user_id = body.user_id or principal.user_id
    if not principal.is_admin and (
        body.role == "admin" or user_id != principal.user_id
    ):
        raise HTTPProblem(
            403,
            "Forbidden",
            "only an admin key may make admin keys or keys of another user",
        )
    if body.role == "admin" and user_id != ADMIN_ID:
        raise HTTPProblem(400, "Bad Request", "admin keys belong to the admin user")
    own = user_id == principal.user_id
    made = _state(request).store.create_api_key(
        user_id,
        role=body.role,
        org_name=principal.org_name if own else "",
        project_name=principal.project_name if own else "",
        container_groups=groups,
        expires_in=body.expires_in,
    )
    if made is None:
        raise HTTPProblem(404, "User not found", "User not found")
    return _json(made.to_json(), 201)


@get("/keys", sync_to_thread=False, opt=ACCESS_USERS)
def list_api_keys(
    request: Request[Any, Any, Any],
    principal: NamedDependency[Principal],
    all_users: FromQuery[bool] = False,
) -> Response[dict[str, Any]]:
    """
    The live keys of the caller's user, without their secrets:
    ``{"_count": n, "keys": [...]}``. An admin key with ``all_users=true``
    sees every user's.
    """
    if all_users:
        _admin(principal)
    keys = _state(request).store.list_api_keys(None if all_users else principal.user_id)
    return _json({"_count": len(keys), "keys": [k.to_json() for k in keys]})


@delete("/keys/{key_id:str}", status_code=204, sync_to_thread=False, opt=ACCESS_USERS)
def revoke_api_key(
    request: Request[Any, Any, Any],
    key_id: FromPath[str],
    principal: NamedDependency[Principal],
) -> None:
    """
    Revoke a key at once. A user key revokes its user's user and worker
    keys; an admin key any key.
    """
    state = _state(request)
    if not state.store.revoke_api_key(principal, key_id):
        raise _not_found("Key")
    _forget_key(state, key_id)


# Misc -------------------------------------------------------------------------------


@get("/health", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def health() -> Response[dict[str, str]]:
    """
    A no-op: the server is up. Needs no key.
    """
    return _json({"status": "ok"})


@get("/healthz", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def healthz() -> Response[dict[str, str]]:
    """
    Liveness for load balancers: the process is up. Needs no key, touches no
    database.
    """
    return _json({"status": "ok"})


@get("/readyz", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    """
    Readiness for load balancers: the database is reachable and its schema is
    current (503 otherwise). Needs no key.
    """
    problem = _state(request).store.check_ready()
    if problem is not None:
        response = _json({"status": "unavailable", "message": problem}, 503)
        response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER)
        return response
    return _json({"status": "ready"})


@get("/openapi.json", sync_to_thread=False, include_in_schema=False, opt=ACCESS_PUBLIC)
def openapi_json(request: Request[Any, Any, Any]) -> Response[Any]:
    """
    The OpenAPI 3.1 document.
    """
    return _json(_openapi_document(request.app))


def _openapi_document(app: Litestar) -> dict[str, Any]:
    """
    The OpenAPI document that ``/openapi.json`` and ``/docs`` serve: Litestar's,
    completed by ``describe`` with what the handlers check and answer.
    """
    # Litestar caches the document as a dict in its (private) OpenAPI plugin,
    # which /docs renders; completing that dict serves one document to both.
    from litestar._openapi.plugin import OpenAPIPlugin

    document = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    if "Error" not in document.get("components", {}).get("schemas", {}):
        describe(document)
    return document


@get(METRICS_PATH, sync_to_thread=False, include_in_schema=False, opt=ACCESS_ADMIN)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """
    The server's metrics in the Prometheus text format.

    Needs the admin's key (``X-Kelpie-Key``, or ``Authorization: Bearer`` as
    Prometheus sends it), since the metrics name every tenant's container
    groups; a server started with ``--metrics-public`` serves them to anyone.
    """
    from prometheus_client import CONTENT_TYPE_LATEST

    state = _state(request)
    if not state.metrics_public:
        _metrics_admin(request)
    return Response(
        content=state.metrics.render(), status_code=200, media_type=CONTENT_TYPE_LATEST
    )


def _metrics_admin(request: Request[Any, Any, Any]) -> None:
    headers = request.headers
    key = headers.get("x-kelpie-key")
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if not key and scheme.lower() == "bearer":
        key = credentials.strip()
    if not key:
        raise HTTPProblem(
            401,
            "Unauthorized",
            "the metrics need the admin's API key (X-Kelpie-Key or "
            "Authorization: Bearer), or a server started with --metrics-public",
        )
    state = _state(request)
    address = _client_address(request)
    wait = None if state.failures is None else state.failures.retry_after(address)
    if wait is not None:
        raise _too_many(
            wait, f"too many requests with a wrong API key; retry in {wait} s"
        )
    principal = state.store.principal_for_key(key)
    if principal is None:
        if state.failures is not None:
            state.failures.failed(address)
        raise HTTPProblem(403, "Forbidden", "Invalid API Key")
    if not principal.is_admin:
        raise HTTPProblem(403, "Forbidden", "Admin Only")


#: Where the Swagger UI files that ``/docs`` loads are served from.
_DOCS_ASSETS = "/docs/assets"
#: The name of the API key's security scheme in the OpenAPI document.
_KEY_SCHEME = "KelpieKey"


def _docs_assets() -> Any:
    """
    Serve Swagger UI's files from the installed ``swagger-ui-bundle-v2``
    package, so that ``/docs`` works offline.
    """
    from litestar.static_files import create_static_files_router
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return create_static_files_router(
        path=_DOCS_ASSETS,
        directories=[str(swagger_ui_path)],
        include_in_schema=False,
        name="docs-assets",
        opt=ACCESS_PUBLIC,
    )


def _openapi_config() -> OpenAPIConfig:
    from importlib.metadata import version

    return OpenAPIConfig(
        title="Kelpie API (kelpie-sdk)",
        version=version("kelpie-sdk"),
        description=(
            "A self-hosted, wire-compatible Kelpie API. "
            "Authenticate with the X-Kelpie-Key header (Authorize, above)."
        ),
        path="/docs",
        render_plugins=[
            SwaggerRenderPlugin(
                path="/",
                js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=(
                    f"{_DOCS_ASSETS}/swagger-ui-standalone-preset.js"
                ),
                favicon=(
                    f"<link rel='icon' type='image/png' "
                    f"href='{_DOCS_ASSETS}/favicon-32x32.png'>"
                ),
            )
        ],
        components=Components(
            security_schemes={
                _KEY_SCHEME: SecurityScheme(
                    type="apiKey",
                    name="X-Kelpie-Key",
                    security_scheme_in="header",
                    description="An API key issued by the admin",
                )
            }
        ),
        security=[{_KEY_SCHEME: []}],
        # The handlers' docstrings become each operation's description.
        use_handler_docstrings=True,
    )


def _decide_remaining_routes(app: Litestar) -> None:
    """
    Give Litestar's own routes (CORS preflight ``OPTIONS``, the OpenAPI
    pages under ``/docs``) their access decision, public; any other route
    without one is a programming error, refused at start.
    """
    from litestar.routes import HTTPRoute

    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            raise RuntimeError(f"unexpected non-HTTP route {route.path}")
        for handler in route.route_handlers:
            if "access" in handler.opt:
                continue
            methods: set[str] = set(handler.http_methods)
            if methods == {"OPTIONS"} or route.path.startswith("/docs"):
                handler.opt["access"] = ACCESS_PUBLIC["access"]
            else:
                raise RuntimeError(
                    f"the route {route.path} ({handler}) has no access decision: "
                    "give its handler opt=ACCESS_..."
                )


class _AllowEveryMethod:
    """
    Answer ``OPTIONS`` with every method of the route in ``Allow``.

    Litestar builds a route's ``OPTIONS`` answer when the route's first
    handler is registered, so it listed only that handler's methods (``POST``
    for ``/jobs``, not ``GET`` and ``DELETE``).
    """

    def __init__(self, app: ASGIApp, allow: Mapping[str, str]) -> None:
        self.app = app
        #: The ``Allow`` value of each route template.
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Litestar's router writes the matched template into the scope.
                template = cast(dict[str, Any], scope).get("path_template", "")
                allow = self.allow.get(template)
                if allow is not None:
                    headers = [
                        (k, v) for k, v in message["headers"] if k.lower() != b"allow"
                    ]
                    message["headers"] = [*headers, (b"allow", allow.encode())]
            await send(message)

        await self.app(scope, receive, send_allow)


def _allow_headers(app: Litestar) -> dict[str, str]:
    allow: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            allow.setdefault(route.path_format, set()).update(route.methods)
    return {path: ", ".join(sorted(methods)) for path, methods in allow.items()}


def create_app(
    store: Store,
    *,
    debug: bool = False,
    metrics_public: bool = False,
    log_limit: int = DEFAULT_LOG_LIMIT,
    secure_cookie: bool | None = None,
    salad_auth: SaladAuth | None = None,
    webhooks: WebhookSettings | None = None,
    auth_failure_limit: int | None = AUTH_FAILURE_LIMIT,
    key_rate_limit: int | None = None,
) -> Litestar:
    """
    Build the Kelpie API application around a store.

    Args:
        store: The store (schema already migrated).
        debug: Litestar debug mode (tracebacks in responses).
        metrics_public: Serve ``GET /metrics`` without a key (default: the
            admin's key is required).
        log_limit: Bytes of output lines kept per job attempt (the oldest go).
        secure_cookie: Mark the dashboard's session cookie ``Secure``; by
            default it is when the request came over https.
        salad_auth: Accept SaladCloud workload tokens and API keys as it
            says; ``None``: refuse them (403).
        webhooks: The webhook allowlist (checked at submission) and the
            key echo; the dispatcher is started separately.
        auth_failure_limit: Failed authentications a minute after which a
            client address is answered 429; ``None``: no limit.
        key_rate_limit: Requests a minute allowed per API key (429 beyond);
            ``None``: no limit.
    """
    handlers: Sequence[Any] = [
        submit_job,
        submit_batch,
        list_jobs,
        get_job,
        job_events,
        cancel_job,
        purge_group,
        delete_all_jobs,
        get_work,
        list_machines,
        heartbeat,
        completed,
        failed,
        release,
        report_progress,
        holder_status,
        ship_logs,
        read_logs,
        create_rule,
        list_rules,
        get_rule,
        update_rule,
        delete_rule,
        delete_all_rules,
        me,
        get_webhook_secret,
        rotate_webhook_secret,
        create_user,
        create_token,
        delete_users,
        create_api_key,
        list_api_keys,
        revoke_api_key,
        health,
        healthz,
        readyz,
        metrics,
        openapi_json,
        _docs_assets(),
        *ui_handlers(),
    ]
    exception_handlers: Mapping[Any, Any] = {
        HTTPProblem: _on_problem,
        DatabaseUnavailable: _on_unavailable,
        ValidationException: _on_validation,
        HTTPException: _on_http,
        Exception: _on_crash,
    }
    app = Litestar(
        route_handlers=list(handlers),
        dependencies={"principal": Provide(_authenticate, sync_to_thread=False)},
        exception_handlers=dict(exception_handlers),
        plugins=[AttrsSchemaPlugin()],
        openapi_config=_openapi_config(),
        before_request=_check_body,
        request_max_body_size=MAX_BODY_BYTES,
        debug=debug,
    )
    _decide_remaining_routes(app)
    app.state.kelpie = state = _State(
        store=store,
        waker=_Waker(store.wake_recheck_seconds),
        metrics=ServerMetrics(store.engine),
        metrics_public=metrics_public,
        logs=JobLogs(store.engine, limit=log_limit),
        ui=UISessions(secure_cookie=secure_cookie),
        salad=salad_auth,
        webhooks=webhooks or WebhookSettings(),
        failures=(
            None if auth_failure_limit is None else FailureLimiter(auth_failure_limit)
        ),
        key_limit=None if key_rate_limit is None else KeyRateLimiter(key_rate_limit),
    )
    # Completed now, so that /docs, which renders the same dict, shows it too.
    _openapi_document(app)
    store.on_available(state.waker.notify)
    store.on_lease_expired(state.metrics.lease_expiries.inc)
    # Outside the router, as Litestar wraps its own CORS middleware, so that
    # every answer is timed, errors and unknown paths included.
    app.asgi_handler = RequestGuard(
        MetricsMiddleware(
            _AllowEveryMethod(app.asgi_handler, _allow_headers(app)), state.metrics
        )
    )
    return app
