"""
The Kelpie wire types, shared by the client SDK and the API server.

Every model is an attrs class with an explicit ``to_json()`` (a JSON-able dict in
the exact wire shape) and ``from_json(data)`` (tolerant of unknown keys, strict
about missing or mistyped required ones, raising ``ResponseValidationError``).

The server decodes request bodies into these very classes, so there is one
definition of the wire format. Field order follows the original API's column
order (its jobs table); fields this project adds to the protocol
(``attempt``, ``num_interruptions``, ``lease_expires``, ``progress``,
``last_error``) are optional and omitted when unset, so a job read from the
hosted API round-trips exactly too.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn, Self, TypeAlias

import attrs

from kelpie_sdk.errors import ResponseValidationError

__all__ = [
    "EVENT_KINDS",
    "IDEMPOTENCY_HEADER",
    "INTEGER_RANGES",
    "KEY_ROLES",
    "LEGACY_STORAGE_FIELDS",
    "MAX_BATCH_SIZE",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_LONG_POLL",
    "MAX_NAME_LENGTH",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "QUARANTINE_HEADER",
    "REPLAYED_HEADER",
    "ApiKey",
    "JSONValue",
    "Job",
    "JobEvent",
    "JobList",
    "JobStatus",
    "JobSubmission",
    "LogLine",
    "Machine",
    "MachineTable",
    "ScalingRule",
    "ScalingRuleSubmission",
    "ScalingRuleUpdate",
    "SyncConfig",
    "SyncDirection",
    "SyncSpec",
    "User",
    "WorkerReport",
    "check_integer",
    "check_tag",
    "format_progress",
    "format_timestamp",
    "is_idempotency_key",
    "parse_timestamp",
    "progress_fraction",
]

JSONValue: TypeAlias = (
    "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
)

#: The most jobs ``POST /jobs/batch`` accepts in one request.
MAX_BATCH_SIZE = 1000

#: The longest ``wait`` (seconds) that ``GET /work`` accepts (a long poll).
MAX_LONG_POLL = 60.0

#: The longest job ``name`` accepted, in characters.
MAX_NAME_LENGTH = 200

#: The longest ``container_group_id``, ``machine_id`` or ``username`` accepted,
#: in characters: they are database index keys, which have a size limit.
MAX_KEY_LENGTH = 256

#: The most ``tags`` one job may carry.
MAX_TAGS = 20

#: The longest tag accepted, in characters.
MAX_TAG_LENGTH = 64

#: The inclusive range of every integer the API accepts, in a request body or
#: a query string, by its name; anything outside is answered 400. The same
#: checks run in the SDK when a model is built, before anything is sent (W-31).
INTEGER_RANGES: Mapping[str, tuple[int, int]] = {
    # JobSubmission
    "max_failures": (1, 1000),
    "heartbeat_interval": (1, 86_400),
    # WorkerReport (attempt also in GET /jobs/{id}/status and /logs)
    "attempt": (0, 2**31 - 1),
    "exit_code": (-(2**31), 2**31 - 1),
    # ScalingRuleSubmission, ScalingRuleUpdate
    "min_replicas": (0, 500),
    "max_replicas": (0, 500),
    "idle_threshold_seconds": (0, 3600),
    # GET /jobs
    "page": (1, 2**31 - 1),
    "page_size": (1, 1000),
    # GET /jobs/{id}/logs
    "since": (0, 2**63 - 1),
    "limit": (1, 10_000),
    # POST /jobs/{id}/logs
    "offset": (0, 2**53 - 1),
    "log_attempt": (1, 2**31 - 1),
}


def check_integer(name: str, value: int | None) -> None:
    """
    Check an integer against its range in ``INTEGER_RANGES`` (``None`` passes).

    Raises:
        ValueError: The value is outside the range; the message names both.
    """
    if value is None:
        return
    low, high = INTEGER_RANGES[name]
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/=+@-]*")

#: The kinds of entries in a job's event history, in the order they can occur.
EVENT_KINDS = (
    "submitted",
    "claimed",
    "lease_expired",
    "released",
    "failed",
    "banned",
    "requeued",
    "canceled",
    "completed",
)

#: The header of a ``GET /work`` answer (``[]``) that tells a quarantined
#: machine until when it gets no work (ISO 8601); the original worker ignores it.
QUARANTINE_HEADER = "Kelpie-Quarantined-Until"

#: The request header that makes a job submission safe to repeat: a repeat
#: with the same key and body queues nothing and gets the first answer again.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The answer header (``true``) of such a replayed answer.
REPLAYED_HEADER = "Idempotent-Replayed"
#: The longest ``Idempotency-Key`` (printable ASCII characters).
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def is_idempotency_key(key: str) -> bool:
    """
    Whether ``key`` is a valid ``Idempotency-Key``: 1 to
    ``MAX_IDEMPOTENCY_KEY_LENGTH`` printable ASCII characters (the SDK and
    the server check the same rule).
    """
    return 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH and all(
        " " <= c <= "~" for c in key
    )


#: The flat ("legacy") storage fields of a job, in wire order.
LEGACY_STORAGE_FIELDS = (
    "input_bucket",
    "input_prefix",
    "checkpoint_bucket",
    "checkpoint_prefix",
    "output_bucket",
    "output_prefix",
)


class JobStatus(enum.StrEnum):
    """
    The five states of a job.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELED = "canceled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """
        Whether the job reached a final state and will never run again.
        """
        return self in (JobStatus.COMPLETED, JobStatus.CANCELED, JobStatus.FAILED)


class SyncDirection(enum.StrEnum):
    """
    Which way a sync entry moves files.
    """

    DOWNLOAD = "download"
    UPLOAD = "upload"


def format_timestamp(value: dt.datetime) -> str:
    """
    Format a timestamp the way the Kelpie API does: ISO 8601, UTC, ms, ``Z``.

    Args:
        value: A timezone-aware datetime (naive values are taken as UTC).

    Returns:
        For example ``"2025-08-11T21:49:44.000Z"``.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_timestamp(value: str) -> dt.datetime:
    """
    Parse a Kelpie timestamp into an aware UTC datetime.

    Accepts ISO 8601 with or without ``Z`` and SQLite's ``YYYY-MM-DD HH:MM:SS``
    (the hosted API returns scaling rules and users in that form).

    Raises:
        ValueError: Not a timestamp.
    """
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


# -- progress records ----------------------------------------------------------


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(number: float) -> str:
    return f"{number:g}" if number != int(number) else str(int(number))


def progress_fraction(progress: Mapping[str, Any] | None) -> float | None:
    """
    How far a job's progress record says it is, from 0 to 1, or ``None``.

    Understands ``percent`` (0-100), ``fraction`` (0-1), or ``step`` with
    ``total``/``total_steps``; the result is clamped to 0..1.
    """
    if not progress:
        return None
    percent = _number(progress.get("percent"))
    if percent is not None:
        return min(max(percent / 100, 0.0), 1.0)
    fraction = _number(progress.get("fraction"))
    if fraction is None:
        step = _number(progress.get("step"))
        total = _number(progress.get("total", progress.get("total_steps")))
        if step is None or not total:
            return None
        fraction = step / total
    return min(max(fraction, 0.0), 1.0)


def format_progress(progress: Mapping[str, Any] | None) -> str:
    """
    A short text for a job's progress record, e.g. ``42% step 420/1000``.

    Understands ``percent`` (0-100) or ``fraction`` (0-1), ``step`` with
    ``total``/``total_steps``, and ``message``; shows up to three other keys
    as ``key=value`` when none of those is present.
    """
    if not progress:
        return ""
    percent = _number(progress.get("percent"))
    fraction = _number(progress.get("fraction"))
    step = _number(progress.get("step"))
    total = _number(progress.get("total", progress.get("total_steps")))
    if percent is None and fraction is not None:
        percent = fraction * 100
    if percent is None and step is not None and total:
        percent = step / total * 100
    parts: list[str] = []
    if percent is not None:
        parts.append(f"{percent:.0f}%")
    if step is not None:
        parts.append(
            f"step {_fmt(step)}/{_fmt(total)}" if total else f"step {_fmt(step)}"
        )
    message = progress.get("message")
    if isinstance(message, str) and message:
        parts.append(message)
    if not parts:
        parts = [f"{k}={v}" for k, v in list(progress.items())[:3]]
    return " ".join(parts)


# -- from_json helpers -------------------------------------------------------


def _fail(model: str, key: str, expected: str, data: Mapping[str, Any]) -> NoReturn:
    raise ResponseValidationError(
        f"{model}: field {key!r} must be {expected}, got {data.get(key)!r}"
    )


def _mapping(model: str, data: object) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ResponseValidationError(
            f"{model}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _req_str(model: str, data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        _fail(model, key, "a string", data)
    return value


def _opt_str(model: str, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        _fail(model, key, "a string or null", data)
    return value


def _int(model: str, data: Mapping[str, Any], key: str, default: int | None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(model, key, "an integer", data)
    return value


def _opt_int(model: str, data: Mapping[str, Any], key: str) -> int | None:
    if data.get(key) is None:
        return None
    return _int(model, data, key, None)


def _opt_float(model: str, data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(model, key, "a number", data)
    return float(value)


def _req_float(model: str, data: Mapping[str, Any], key: str) -> float:
    value = _opt_float(model, data, key)
    if value is None:
        _fail(model, key, "a number", data)
    return value


def _bool(model: str, data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        _fail(model, key, "a boolean", data)
    return value


def _opt_time(model: str, data: Mapping[str, Any], key: str) -> dt.datetime | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(model, key, "a timestamp string", data)
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise ResponseValidationError(
            f"{model}: field {key!r} is not a timestamp: {value!r}"
        ) from exc


def _req_time(model: str, data: Mapping[str, Any], key: str) -> dt.datetime:
    value = _opt_time(model, data, key)
    if value is None:
        _fail(model, key, "a timestamp string", data)
    return value


def _str_list(model: str, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(model, key, "a list of strings", data)
    return tuple(value)


def _str_map(model: str, data: Mapping[str, Any], key: str) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        _fail(model, key, "an object of strings", data)
    return dict(value)


def _status(model: str, data: Mapping[str, Any]) -> JobStatus:
    value = data.get("status")
    if not isinstance(value, str) or value not in JobStatus._value2member_map_:
        _fail(model, "status", "a job status", data)
    return JobStatus(value)


# -- validators (run by attrs, hence also by the server's decoder) ------------


def _key_length(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, str) and len(value) > MAX_KEY_LENGTH:
        raise ValueError(
            f"{attribute.name} must be at most {MAX_KEY_LENGTH} characters, "
            f"got {len(value)}"
        )


def _in_range(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_integer(attribute.name, value)


def _check_name(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is None:
        return
    if not value.strip() or len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"name must be 1 to {MAX_NAME_LENGTH} characters and not blank, "
            f"got {len(value)} characters"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("name must not contain control characters")


def _check_tags(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: Any
) -> None:
    if len(value) > MAX_TAGS:
        raise ValueError(f"a job may carry at most {MAX_TAGS} tags, got {len(value)}")
    for tag in value:
        check_tag(tag)


def check_tag(tag: str) -> None:
    """
    Check one job tag: 1 to 64 characters among letters, digits and
    ``_ . : / = + @ -``, starting with a letter or a digit.

    Raises:
        ValueError: The tag is not valid.
    """
    if len(tag) > MAX_TAG_LENGTH or not _TAG_RE.fullmatch(tag):
        raise ValueError(
            f"tag {tag!r} is not valid: use 1 to {MAX_TAG_LENGTH} letters, digits "
            "or _ . : / = + @ - , starting with a letter or a digit"
        )


def _to_tuple(value: Iterable[Any] | None) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _str_dict(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


def _job_tuple(value: Iterable[Job]) -> tuple[Job, ...]:
    return tuple(value)


# -- models ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SyncConfig:
    """
    One managed-storage rule: a bucket prefix and a local directory.

    Attributes:
        bucket: The bucket.
        prefix: The key prefix; the server appends a trailing ``/``.
        local_path: The directory in the job's container.
        direction: ``download`` in ``before``, ``upload`` in ``during``/``after``.
        pattern: An optional regular expression that file names must match.
    """

    bucket: str
    prefix: str
    local_path: str
    direction: SyncDirection = attrs.field(converter=SyncDirection)
    pattern: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        out: dict[str, JSONValue] = {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "local_path": self.local_path,
            "direction": self.direction.value,
        }
        if self.pattern is not None:
            out["pattern"] = self.pattern
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse the wire form.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        m = _mapping("SyncConfig", data)
        direction = _req_str("SyncConfig", m, "direction")
        if direction not in ("download", "upload"):
            _fail("SyncConfig", "direction", '"download" or "upload"', m)
        return cls(
            bucket=_req_str("SyncConfig", m, "bucket"),
            prefix=_req_str("SyncConfig", m, "prefix"),
            local_path=_req_str("SyncConfig", m, "local_path"),
            direction=SyncDirection(direction),
            pattern=_opt_str("SyncConfig", m, "pattern"),
        )


@attrs.frozen(kw_only=True)
class SyncSpec:
    """
    The ``sync`` block of a job. ``SyncSpec()`` (wire ``{}``) means "no managed
    storage": the job does its own I/O.

    Attributes:
        before: Downloads before the command starts.
        during: Uploads while it runs.
        after: Uploads after it exits 0.
    """

    before: tuple[SyncConfig, ...] | None = attrs.field(
        default=None, converter=_to_tuple
    )
    during: tuple[SyncConfig, ...] | None = attrs.field(
        default=None, converter=_to_tuple
    )
    after: tuple[SyncConfig, ...] | None = attrs.field(
        default=None, converter=_to_tuple
    )

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form; phases that are unset are omitted.
        """
        out: dict[str, JSONValue] = {}
        for phase in ("before", "during", "after"):
            entries: tuple[SyncConfig, ...] | None = getattr(self, phase)
            if entries is not None:
                out[phase] = [e.to_json() for e in entries]
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse the wire form.

        Raises:
            ResponseValidationError: A phase is not a list of sync entries.
        """
        m = _mapping("SyncSpec", data)
        phases: dict[str, tuple[SyncConfig, ...] | None] = {}
        for phase in ("before", "during", "after"):
            value = m.get(phase)
            if value is None:
                phases[phase] = None
            elif isinstance(value, list):
                phases[phase] = tuple(SyncConfig.from_json(v) for v in value)
            else:
                _fail("SyncSpec", phase, "a list", m)
        return cls(**phases)

    def entries(self) -> Iterable[tuple[str, SyncConfig]]:
        """
        Every entry with its phase name, in order.
        """
        for phase in ("before", "during", "after"):
            for entry in getattr(self, phase) or ():
                yield phase, entry


@attrs.frozen(kw_only=True)
class JobSubmission:
    """
    The body of ``POST /jobs`` (and one element of ``POST /jobs/batch``).

    Use either the six flat storage fields or ``sync`` (``SyncSpec()`` for none).
    """

    command: str
    container_group_id: str = attrs.field(validator=_key_length)
    arguments: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    environment: dict[str, str] = attrs.field(factory=dict, converter=_str_dict)
    input_bucket: str | None = None
    input_prefix: str | None = None
    checkpoint_bucket: str | None = None
    checkpoint_prefix: str | None = None
    output_bucket: str | None = None
    output_prefix: str | None = None
    max_failures: int = attrs.field(default=3, validator=_in_range)
    heartbeat_interval: int = attrs.field(default=30, validator=_in_range)
    webhook: str | None = None
    compression: bool = False
    sync: SyncSpec | None = None
    name: str | None = attrs.field(default=None, validator=_check_name)
    tags: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=_check_tags
    )

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form: unset optional fields are omitted.
        """
        out: dict[str, JSONValue] = {
            "command": self.command,
            "arguments": list(self.arguments),
            "environment": dict(self.environment),
        }
        for key in LEGACY_STORAGE_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["max_failures"] = self.max_failures
        out["heartbeat_interval"] = self.heartbeat_interval
        if self.webhook is not None:
            out["webhook"] = self.webhook
        out["container_group_id"] = self.container_group_id
        out["compression"] = self.compression
        if self.sync is not None:
            out["sync"] = self.sync.to_json()
        if self.name is not None:
            out["name"] = self.name
        if self.tags:
            out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse the wire form (the server decodes with Litestar instead).

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "JobSubmission"
        m = _mapping(name, data)
        sync = m.get("sync")
        try:
            return cls(
                command=_req_str(name, m, "command"),
                container_group_id=_req_str(name, m, "container_group_id"),
                arguments=_str_list(name, m, "arguments"),
                environment=_str_map(name, m, "environment"),
                **{k: _opt_str(name, m, k) for k in LEGACY_STORAGE_FIELDS},
                max_failures=_int(name, m, "max_failures", 3),
                heartbeat_interval=_int(name, m, "heartbeat_interval", 30),
                webhook=_opt_str(name, m, "webhook"),
                compression=_bool(name, m, "compression", False),
                sync=None if sync is None else SyncSpec.from_json(sync),
                name=_opt_str(name, m, "name"),
                tags=_str_list(name, m, "tags"),
            )
        except ValueError as exc:
            raise ResponseValidationError(f"{name}: {exc}") from exc


@attrs.frozen(kw_only=True, repr=False)
class Job:
    """
    A job as the API returns it.

    Timestamps that are unset are ``None`` and omitted on the wire. When ``sync``
    is set the six flat storage fields are absent (``None``); otherwise ``sync``
    is ``None`` and they are present.

    The fields after ``sync`` are this project's additions to the protocol:
    ``attempt`` (claims so far), ``num_interruptions`` (expired leases and
    releases, never counted as failures), ``lease_expires``, the latest
    ``progress`` record a worker reported, and ``last_error`` (the latest
    failure reason). The hosted API does not send them; they are then ``None``.
    So are ``name`` and ``tags`` (given at submission), and ``goodput``: the
    share of the job's compute so far that was not lost to interruptions or
    failures (``None`` before any attempt ended).
    """

    id: str
    user_id: str
    status: JobStatus = attrs.field(converter=JobStatus)
    created: dt.datetime
    started: dt.datetime | None = None
    completed: dt.datetime | None = None
    canceled: dt.datetime | None = None
    failed: dt.datetime | None = None
    heartbeat: dt.datetime | None = None
    num_failures: int = 0
    machine_id: str | None = None
    command: str
    arguments: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    environment: dict[str, str] = attrs.field(factory=dict, converter=_str_dict)
    input_bucket: str | None = None
    input_prefix: str | None = None
    checkpoint_bucket: str | None = None
    checkpoint_prefix: str | None = None
    output_bucket: str | None = None
    output_prefix: str | None = None
    max_failures: int = 3
    heartbeat_interval: int = 30
    container_group_id: str
    webhook: str | None = None
    compression: bool = False
    num_heartbeats: int = 0
    sync: SyncSpec | None = None
    attempt: int | None = None
    num_interruptions: int | None = None
    lease_expires: dt.datetime | None = None
    progress: dict[str, Any] | None = None
    last_error: str | None = None
    name: str | None = None
    tags: tuple[str, ...] | None = attrs.field(default=None, converter=_to_tuple)
    goodput: float | None = None

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form, key for key as the API sends it.
        """
        out: dict[str, JSONValue] = {
            "id": self.id,
            "user_id": self.user_id,
            "status": self.status.value,
            "created": format_timestamp(self.created),
        }
        for key in ("started", "completed", "canceled", "failed", "heartbeat"):
            value: dt.datetime | None = getattr(self, key)
            if value is not None:
                out[key] = format_timestamp(value)
        out["num_failures"] = self.num_failures
        out["machine_id"] = self.machine_id
        out["command"] = self.command
        out["arguments"] = list(self.arguments)
        out["environment"] = dict(self.environment)
        if self.sync is None:
            for key in LEGACY_STORAGE_FIELDS:
                out[key] = getattr(self, key)
        out["max_failures"] = self.max_failures
        out["heartbeat_interval"] = self.heartbeat_interval
        out["container_group_id"] = self.container_group_id
        out["webhook"] = self.webhook
        out["compression"] = self.compression
        out["num_heartbeats"] = self.num_heartbeats
        out["sync"] = None if self.sync is None else self.sync.to_json()
        if self.attempt is not None:
            out["attempt"] = self.attempt
        if self.num_interruptions is not None:
            out["num_interruptions"] = self.num_interruptions
        if self.lease_expires is not None:
            out["lease_expires"] = format_timestamp(self.lease_expires)
        if self.progress is not None:
            out["progress"] = self.progress
        if self.last_error is not None:
            out["last_error"] = self.last_error
        if self.name is not None:
            out["name"] = self.name
        if self.tags is not None:
            out["tags"] = list(self.tags)
        if self.goodput is not None:
            out["goodput"] = self.goodput
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a job from the API.

        Raises:
            ResponseValidationError: A required field is missing or mistyped.
        """
        name = "Job"
        m = _mapping(name, data)
        sync = m.get("sync")
        progress = m.get("progress")
        if progress is not None and not isinstance(progress, dict):
            _fail(name, "progress", "an object", m)
        return cls(
            id=_req_str(name, m, "id"),
            user_id=_req_str(name, m, "user_id"),
            status=_status(name, m),
            created=_req_time(name, m, "created"),
            started=_opt_time(name, m, "started"),
            completed=_opt_time(name, m, "completed"),
            canceled=_opt_time(name, m, "canceled"),
            failed=_opt_time(name, m, "failed"),
            heartbeat=_opt_time(name, m, "heartbeat"),
            num_failures=_int(name, m, "num_failures", 0),
            machine_id=_opt_str(name, m, "machine_id"),
            command=_req_str(name, m, "command"),
            arguments=_str_list(name, m, "arguments"),
            environment=_str_map(name, m, "environment"),
            **{k: _opt_str(name, m, k) for k in LEGACY_STORAGE_FIELDS},
            max_failures=_int(name, m, "max_failures", 3),
            heartbeat_interval=_int(name, m, "heartbeat_interval", 30),
            container_group_id=_req_str(name, m, "container_group_id"),
            webhook=_opt_str(name, m, "webhook"),
            compression=_bool(name, m, "compression", False),
            num_heartbeats=_int(name, m, "num_heartbeats", 0),
            sync=None if sync is None else SyncSpec.from_json(sync),
            attempt=_opt_int(name, m, "attempt"),
            num_interruptions=_opt_int(name, m, "num_interruptions"),
            lease_expires=_opt_time(name, m, "lease_expires"),
            progress=progress,
            last_error=_opt_str(name, m, "last_error"),
            name=_opt_str(name, m, "name"),
            tags=None if m.get("tags") is None else _str_list(name, m, "tags"),
            goodput=_opt_float(name, m, "goodput"),
        )

    @property
    def finished(self) -> bool:
        """
        Whether the job is completed, canceled or failed.
        """
        return self.status.finished

    def __repr__(self) -> str:
        parts = [f"id={self.id!r}", f"status={self.status.value!r}"]
        if self.attempt is not None:
            parts.append(f"attempt={self.attempt}")
        progress = format_progress(self.progress)
        if progress:
            parts.append(f"progress={progress!r}")
        parts.append(f"container_group_id={self.container_group_id!r}")
        return f"Job({', '.join(parts)})"

    def _repr_html_(self) -> str:
        """
        A small HTML card for notebooks: id, status, attempt, progress, group.
        """
        from html import escape

        rows = [
            ("status", escape(self.status.value)),
            ("container group", escape(self.container_group_id)),
            ("command", escape(" ".join([self.command, *self.arguments]))),
        ]
        if self.attempt is not None:
            rows.append(("attempt", str(self.attempt)))
        rows.append(("failures", f"{self.num_failures}/{self.max_failures}"))
        if self.progress:
            fraction = progress_fraction(self.progress)
            bar = (
                ""
                if fraction is None
                else f'<progress value="{fraction:.4f}" max="1"></progress> '
            )
            rows.append(("progress", bar + escape(format_progress(self.progress))))
        if self.last_error:
            rows.append(("last error", escape(self.last_error)))
        body = "".join(
            f'<tr><th style="text-align:left">{k}</th>'
            f'<td style="text-align:left">{v}</td></tr>'
            for k, v in rows
        )
        return (
            f'<div class="kelpie-job"><b>Job</b> <code>{escape(self.id)}</code>'
            f"<table>{body}</table></div>"
        )


@attrs.frozen(kw_only=True)
class JobList:
    """
    One page of ``GET /jobs``: ``_count`` is the number of jobs on this page.
    """

    jobs: tuple[Job, ...] = attrs.field(converter=_job_tuple)

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {"_count": len(self.jobs), "jobs": [j.to_json() for j in self.jobs]}

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a page.

        Raises:
            ResponseValidationError: Not a page of jobs.
        """
        m = _mapping("JobList", data)
        jobs = m.get("jobs")
        if not isinstance(jobs, list):
            _fail("JobList", "jobs", "a list", m)
        return cls(jobs=[Job.from_json(j) for j in jobs])


@attrs.frozen(kw_only=True)
class JobEvent:
    """
    One entry of a job's history (``GET /jobs/{id}/events``; this project's
    addition to the protocol).

    ``kind`` is one of ``EVENT_KINDS``. ``attempt`` and ``machine_id`` name
    the claim the event concerns (``None`` for ``submitted``). ``details``
    holds the cause: ``reason`` (released), ``exit_code`` and ``error``
    (failed), ``by`` (canceled), and for an event that ends an attempt its
    ``compute_seconds`` and ``lost_seconds`` (compute since the attempt's last
    committed checkpoint, which a later attempt has to redo).
    """

    seq: int
    job_id: str
    time: dt.datetime
    kind: str
    attempt: int | None = None
    machine_id: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)

    @property
    def cause(self) -> str:
        """
        A short human-readable cause, built from ``details`` (may be empty).
        """
        d = self.details
        parts: list[str] = []
        if d.get("reason"):
            parts.append(str(d["reason"]))
        if d.get("exit_code") is not None:
            parts.append(f"exit code {d['exit_code']}")
        if d.get("error") and self.kind == "failed":
            parts.append(str(d["error"]).splitlines()[0])
        if d.get("by"):
            parts.append(f"by {d['by']}")
        if d.get("final"):
            parts.append("no retries left")
        if d.get("remaining") is not None:
            parts.append(f"{d['remaining']} failure(s) left")
        return "; ".join(parts)

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {
            "seq": self.seq,
            "job_id": self.job_id,
            "time": format_timestamp(self.time),
            "kind": self.kind,
            "attempt": self.attempt,
            "machine_id": self.machine_id,
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse one event.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "JobEvent"
        m = _mapping(name, data)
        details = m.get("details") or {}
        if not isinstance(details, dict):
            _fail(name, "details", "an object", m)
        return cls(
            seq=_int(name, m, "seq", None),
            job_id=_req_str(name, m, "job_id"),
            time=_req_time(name, m, "time"),
            kind=_req_str(name, m, "kind"),
            attempt=_opt_int(name, m, "attempt"),
            machine_id=_opt_str(name, m, "machine_id"),
            details=details,
        )


@attrs.frozen(kw_only=True)
class WorkerReport:
    """
    The body of the worker's heartbeat, completed, failed and release calls.

    ``machine_id`` and ``container_group_id`` are the original protocol. The
    rest are this project's optional additions, which servers unaware of them
    ignore: ``attempt`` fences a report to one claim; ``progress`` is the job's
    latest progress record; ``exit_code`` and ``error`` explain a failure;
    ``reason`` says why a job is released (shown in its event history).
    """

    machine_id: str = attrs.field(validator=_key_length)
    container_group_id: str = attrs.field(validator=_key_length)
    attempt: int | None = attrs.field(default=None, validator=_in_range)
    progress: dict[str, Any] | None = None
    exit_code: int | None = attrs.field(default=None, validator=_in_range)
    error: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form; unset optional fields are omitted.
        """
        out: dict[str, JSONValue] = {
            "machine_id": self.machine_id,
            "container_group_id": self.container_group_id,
        }
        for key in ("attempt", "progress", "exit_code", "error", "reason"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse the wire form.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "WorkerReport"
        m = _mapping(name, data)
        progress = m.get("progress")
        if progress is not None and not isinstance(progress, dict):
            _fail(name, "progress", "an object", m)
        return cls(
            machine_id=_req_str(name, m, "machine_id"),
            container_group_id=_req_str(name, m, "container_group_id"),
            attempt=_opt_int(name, m, "attempt"),
            progress=progress,
            exit_code=_opt_int(name, m, "exit_code"),
            error=_opt_str(name, m, "error"),
            reason=_opt_str(name, m, "reason"),
        )


@attrs.frozen(kw_only=True)
class ScalingRuleSubmission:
    """
    The body of ``POST /scaling-rules``.

    ``container_group_name`` is optional here: the hosted API looks the name up
    in SaladCloud, a self-hosted server cannot.
    """

    container_group_id: str
    min_replicas: int = attrs.field(validator=_in_range)
    max_replicas: int = attrs.field(validator=_in_range)
    idle_threshold_seconds: int = attrs.field(validator=_in_range)
    container_group_name: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        out: dict[str, JSONValue] = {
            "container_group_id": self.container_group_id,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "idle_threshold_seconds": self.idle_threshold_seconds,
        }
        if self.container_group_name is not None:
            out["container_group_name"] = self.container_group_name
        return out


@attrs.frozen(kw_only=True)
class ScalingRuleUpdate:
    """
    The body of ``PATCH /scaling-rules/{id}``: any subset of the limits.
    """

    min_replicas: int | None = attrs.field(default=None, validator=_in_range)
    max_replicas: int | None = attrs.field(default=None, validator=_in_range)
    idle_threshold_seconds: int | None = attrs.field(default=None, validator=_in_range)

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form: only the fields being changed.
        """
        return {
            k: v
            for k in ("min_replicas", "max_replicas", "idle_threshold_seconds")
            if (v := getattr(self, k)) is not None
        }


@attrs.frozen(kw_only=True)
class ScalingRule:
    """
    A stored scaling rule: one per container group.
    """

    container_group_id: str
    org_name: str | None
    project_name: str | None
    container_group_name: str | None
    user_id: str
    created: dt.datetime
    updated: dt.datetime
    min_replicas: int
    max_replicas: int
    idle_threshold_seconds: int

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form (timestamps in ISO 8601, unlike the original's SQLite strings).
        """
        return {
            "container_group_id": self.container_group_id,
            "org_name": self.org_name,
            "project_name": self.project_name,
            "container_group_name": self.container_group_name,
            "user_id": self.user_id,
            "created": format_timestamp(self.created),
            "updated": format_timestamp(self.updated),
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "idle_threshold_seconds": self.idle_threshold_seconds,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a rule (ISO or SQLite-style timestamps).

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "ScalingRule"
        m = _mapping(name, data)
        return cls(
            container_group_id=_req_str(name, m, "container_group_id"),
            org_name=_opt_str(name, m, "org_name"),
            project_name=_opt_str(name, m, "project_name"),
            container_group_name=_opt_str(name, m, "container_group_name"),
            user_id=_req_str(name, m, "user_id"),
            created=_req_time(name, m, "created"),
            updated=_req_time(name, m, "updated"),
            min_replicas=_int(name, m, "min_replicas", None),
            max_replicas=_int(name, m, "max_replicas", None),
            idle_threshold_seconds=_int(name, m, "idle_threshold_seconds", None),
        )


@attrs.frozen(kw_only=True)
class Machine:
    """
    One machine's record on the server (this project's addition).

    ``uptime_seconds`` is the observed uptime: from its first contact after
    its last interruption to its latest contact. ``interruptions`` counts its
    expired leases that another claim took over, and its releases.
    """

    machine_id: str
    user_id: str
    container_group_id: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    job_id: str | None
    claims: int
    completions: int
    failures: int
    failed_jobs: int
    interruptions: int
    uptime_seconds: float
    quarantined_until: dt.datetime | None
    live: bool

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {
            "machine_id": self.machine_id,
            "user_id": self.user_id,
            "container_group_id": self.container_group_id,
            "first_seen": format_timestamp(self.first_seen),
            "last_seen": format_timestamp(self.last_seen),
            "job_id": self.job_id,
            "claims": self.claims,
            "completions": self.completions,
            "failures": self.failures,
            "failed_jobs": self.failed_jobs,
            "interruptions": self.interruptions,
            "uptime_seconds": self.uptime_seconds,
            "quarantined_until": None
            if self.quarantined_until is None
            else format_timestamp(self.quarantined_until),
            "live": self.live,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a machine record.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "Machine"
        m = _mapping(name, data)
        return cls(
            machine_id=_req_str(name, m, "machine_id"),
            user_id=_req_str(name, m, "user_id"),
            container_group_id=_req_str(name, m, "container_group_id"),
            first_seen=_req_time(name, m, "first_seen"),
            last_seen=_req_time(name, m, "last_seen"),
            job_id=_opt_str(name, m, "job_id"),
            claims=_int(name, m, "claims", 0),
            completions=_int(name, m, "completions", 0),
            failures=_int(name, m, "failures", 0),
            failed_jobs=_int(name, m, "failed_jobs", 0),
            interruptions=_int(name, m, "interruptions", 0),
            uptime_seconds=_req_float(name, m, "uptime_seconds"),
            quarantined_until=_opt_time(name, m, "quarantined_until"),
            live=_bool(name, m, "live", False),
        )


@attrs.frozen(kw_only=True)
class MachineTable:
    """
    ``GET /machines``: the machines, and the container groups that have
    pending jobs but no live machine (``unserved``: group id -> pending jobs).
    """

    machines: tuple[Machine, ...]
    unserved: dict[str, int]

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {
            "machines": [m.to_json() for m in self.machines],
            "unserved_groups": [
                {"container_group_id": g, "pending": n}
                for g, n in self.unserved.items()
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse the table.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "MachineTable"
        m = _mapping(name, data)
        machines = m.get("machines")
        groups = m.get("unserved_groups")
        if not isinstance(machines, list):
            _fail(name, "machines", "a list", m)
        if not isinstance(groups, list):
            _fail(name, "unserved_groups", "a list", m)
        unserved: dict[str, int] = {}
        for item in groups:
            g = _mapping(name, item)
            unserved[_req_str(name, g, "container_group_id")] = _int(
                name, g, "pending", 0
            )
        return cls(
            machines=tuple(Machine.from_json(x) for x in machines),
            unserved=unserved,
        )


@attrs.frozen(kw_only=True)
class User:
    """
    A Kelpie user: jobs and rules are scoped to one.
    """

    id: str
    username: str
    created: dt.datetime

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {
            "id": self.id,
            "username": self.username,
            "created": format_timestamp(self.created),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a user.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        m = _mapping("User", data)
        return cls(
            id=_req_str("User", m, "id"),
            username=_req_str("User", m, "username"),
            created=_req_time("User", m, "created"),
        )


#: The roles an API key can have: ``admin`` may do everything; ``user``
#: submits, lists and cancels its own jobs and manages its scaling rules and
#: keys; ``worker`` only claims and reports on its user's jobs.
KEY_ROLES = ("admin", "user", "worker")


@attrs.frozen(kw_only=True)
class ApiKey:
    """
    An API key as ``GET /keys`` describes it (this project's addition); never
    the secret itself, except ``key`` in the answer to ``POST /keys``.

    Attributes:
        id: Names the key (in ``DELETE /keys/{id}``); not a secret.
        user_id: The user whose jobs the key acts on.
        role: ``admin``, ``user`` or ``worker``.
        container_groups: The only container groups a worker key may claim
            from; ``None``: all of its user's.
        created: When it was made.
        expires: When it stops working; ``None``: never.
        last_used: Roughly when it was last used (updated at most once a
            minute); ``None``: never.
        key: The secret, shown once, when the key is created; else ``None``.
    """

    id: str
    user_id: str
    role: str
    container_groups: tuple[str, ...] | None
    created: dt.datetime
    expires: dt.datetime | None
    last_used: dt.datetime | None
    key: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form (``key`` only when set).
        """
        out: dict[str, JSONValue] = {
            "id": self.id,
            "user_id": self.user_id,
            "role": self.role,
            "container_groups": (
                None if self.container_groups is None else list(self.container_groups)
            ),
            "created": format_timestamp(self.created),
            "expires": None if self.expires is None else format_timestamp(self.expires),
            "last_used": (
                None if self.last_used is None else format_timestamp(self.last_used)
            ),
        }
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a key's description.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "ApiKey"
        m = _mapping(name, data)
        return cls(
            id=_req_str(name, m, "id"),
            user_id=_req_str(name, m, "user_id"),
            role=_req_str(name, m, "role"),
            container_groups=(
                None
                if m.get("container_groups") is None
                else _str_list(name, m, "container_groups")
            ),
            created=_req_time(name, m, "created"),
            expires=_opt_time(name, m, "expires"),
            last_used=_opt_time(name, m, "last_used"),
            key=_opt_str(name, m, "key"),
        )


@attrs.frozen(kw_only=True)
class LogLine:
    """
    One line a job's command wrote, as ``GET /jobs/{id}/logs`` returns it.

    Attributes:
        seq: The line's place among all the job's lines (the read cursor).
        attempt: The attempt (claim) whose process wrote it.
        stream: ``stdout``, ``stderr``, or ``kelpie`` for a note from the
            system (for example, how many lines the worker had to drop).
        time: When the worker read the line.
        line: The text, without its line break.
    """

    seq: int
    attempt: int
    stream: str
    time: dt.datetime
    line: str

    def to_json(self) -> dict[str, JSONValue]:
        """
        The wire form.
        """
        return {
            "seq": self.seq,
            "attempt": self.attempt,
            "stream": self.stream,
            "time": format_timestamp(self.time),
            "line": self.line,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """
        Parse a log line.

        Raises:
            ResponseValidationError: A field is missing or mistyped.
        """
        name = "LogLine"
        m = _mapping(name, data)
        return cls(
            seq=_int(name, m, "seq", None),
            attempt=_int(name, m, "attempt", None),
            stream=_req_str(name, m, "stream"),
            time=_req_time(name, m, "time"),
            line=_req_str(name, m, "line"),
        )
