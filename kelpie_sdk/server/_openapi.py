"""
The OpenAPI document as the server really behaves.

Litestar derives the document from the handlers' signatures, which know
neither the error body the server sends (``{"error", "message"}``, not
Litestar's ``{"status_code", "detail"}``), nor the answers a handler gives by
raising (401, 403, 404, 409, 413, 503), nor the rules the handlers check
themselves (a non-empty command, 1 to 1000 jobs in a batch, the ranges of
numbers). ``describe`` adds them to the generated document, once, when the
application is built; tests/server/test_schemathesis.py checks the server
against the result.
"""

from __future__ import annotations

from typing import Any

from kelpie_sdk.models import (
    INTEGER_RANGES,
    LEGACY_STORAGE_FIELDS,
    MAX_BATCH_SIZE,
    MAX_KEY_LENGTH,
    MAX_LONG_POLL,
    MAX_NAME_LENGTH,
    MAX_TAG_LENGTH,
    MAX_TAGS,
)

__all__ = ["ERROR_SCHEMA", "NOT_BLANK", "TAG_PATTERN", "WEBHOOK_PATTERN", "describe"]

#: A string with at least one character that is not white space.
NOT_BLANK = r"\S"
#: A job tag (the same rule as ``kelpie_sdk.models.check_tag``).
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=+@-]*$"
_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"({_OCTET}\.){{3}}{_OCTET}"
#: An IPv6 address as a URL writes it between brackets (RFC 3986's forms
#: without a zone id); every address it matches, Python's ``urlsplit`` reads.
_IPV6 = "|".join(
    [
        rf"({_H16}:){{7}}{_H16}",
        rf"({_H16}:){{1,7}}:",
        rf"({_H16}:){{1,6}}:{_H16}",
        rf"({_H16}:){{1,5}}(:{_H16}){{1,2}}",
        rf"({_H16}:){{1,4}}(:{_H16}){{1,3}}",
        rf"({_H16}:){{1,3}}(:{_H16}){{1,4}}",
        rf"({_H16}:){{1,2}}(:{_H16}){{1,5}}",
        rf"{_H16}:(:{_H16}){{1,6}}",
        rf":((:{_H16}){{1,7}}|:)",
        rf"::([Ff]{{4}}(:0{{1,4}})?:)?{_IPV4}",
        rf"({_H16}:){{1,4}}:{_IPV4}",
    ]
)
#: A webhook: an http or https URL with a host (a name, an IPv4 address, or
#: an IPv6 address in brackets), no white space.
WEBHOOK_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://([^/?#\s\[\]@]*@)?"
    rf"(\[({_IPV6})\]|[^/?#\s\[\]]+)(:[0-9]*)?([/?#]\S*)?$"
)
#: A job name: not blank, no control characters.
_NAME_PATTERN = r"^[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f\s][^\x00-\x1f\x7f]*$"
#: The scaling rules' container group ids.
_UUID_PATTERN = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"

#: Every error the server answers (4xx and 5xx) has this body.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": (
        "Every error answer: `error` is a short reason, `message` says what "
        "to change. A batch's error names the failing job's `index`; a "
        "request that Litestar itself rejected lists `errors`."
    ),
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "index": {"type": "integer", "minimum": 0},
        "errors": {"type": "array", "items": {}},
        "success": {"type": "boolean"},
        "result": {"type": "object"},
    },
}

_ERROR_REF = {"$ref": "#/components/schemas/Error"}

_RETRY_AFTER = {
    "description": "Seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 0},
}

#: The answers every authenticated operation may give, with their meaning.
_ALWAYS = {
    "400": "The request breaks a rule; the message names it (besides the rules in "
    "the schemas: no NUL in strings, JSON nested at most 64 levels)",
    "401": "No API key (X-Kelpie-Key) was given",
    "403": "The API key is not valid, or the operation is the admin's",
    "429": "Too many requests: 20 wrong API keys a minute from this address, or "
    "more than the key's limit (kelpie server --key-rate-limit); retry after "
    "Retry-After seconds",
    "503": "The database is unavailable; retry after Retry-After seconds",
}
_NOT_FOUND = "No such resource (or it belongs to another user)"
_CONFLICT = {
    ("delete", "/jobs/{job_id}"): "The job already completed or failed",
    ("post", "/jobs/{job_id}/completed"): "This machine and attempt no longer "
    "hold the job (only for reports that carry `attempt`)",
    ("post", "/jobs/{job_id}/failed"): "This machine and attempt no longer "
    "hold the job (only for reports that carry `attempt`)",
    ("post", "/jobs/{job_id}/release"): "This machine and attempt no longer "
    "hold the job (only for reports that carry `attempt`)",
    ("post", "/jobs/{job_id}/logs"): "This machine and attempt are not the job's "
    "latest",
    ("post", "/scaling-rules"): "The caller already has a scaling rule for the "
    "container group",
    ("get", "/scaling-rules/{group}"): "Several users have a rule for the group: "
    "the admin names one with ?user_id=",
    ("patch", "/scaling-rules/{group}"): "Several users have a rule for the group: "
    "the admin names one with ?user_id=",
    ("delete", "/scaling-rules/{group}"): "Several users have a rule for the "
    "group: the admin names one with ?user_id=",
    ("post", "/jobs"): "The Idempotency-Key was already used for another request",
    ("post", "/jobs/batch"): "The Idempotency-Key was already used for another request",
}
#: Rules that a JSON schema cannot state (they compare fields or need state).
_MORE_400 = {
    ("post", "/users"): "a user with that name exists (as the original answered)",
    ("post", "/jobs"): "a sync pattern does not compile as a Python regular expression",
    ("post", "/jobs/batch"): "a sync pattern does not compile as a Python regular "
    "expression",
    ("post", "/scaling-rules"): "min_replicas is above max_replicas",
    ("patch", "/scaling-rules/{group}"): "min_replicas would be above max_replicas",
}
_TOO_LARGE = "The request body is larger than the server accepts"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


def _string(**rules: Any) -> dict[str, Any]:
    return {"type": "string", **rules}


def _integer(name: str) -> dict[str, Any]:
    """An integer in its range from ``INTEGER_RANGES``."""
    low, high = INTEGER_RANGES[name]
    return {"type": "integer", "minimum": low, "maximum": high}


def _component_rules() -> dict[str, dict[str, Any]]:
    """
    The fields whose rules the handlers check, by component schema.
    """
    tag = _string(minLength=1, maxLength=MAX_TAG_LENGTH, pattern=TAG_PATTERN)
    return {
        "JobSubmission": {
            "command": _string(pattern=NOT_BLANK),
            "container_group_id": _string(pattern=NOT_BLANK, maxLength=MAX_KEY_LENGTH),
            "max_failures": _integer("max_failures"),
            "heartbeat_interval": _integer("heartbeat_interval"),
            "webhook": _nullable(_string(pattern=WEBHOOK_PATTERN)),
            "name": _nullable(
                _string(minLength=1, maxLength=MAX_NAME_LENGTH, pattern=_NAME_PATTERN)
            ),
            "tags": {"type": "array", "items": tag, "maxItems": MAX_TAGS},
        },
        # Not format "regex": that is ECMA-262's dialect, the server compiles
        # the pattern with Python's re module (the 400 says so).
        "SyncConfig": {
            "pattern": _nullable(
                _string(
                    description="a Python regular expression that file names "
                    "must match (one that does not compile is a 400)"
                )
            )
        },
        "WorkerReport": {
            "machine_id": _string(minLength=1, maxLength=MAX_KEY_LENGTH),
            "container_group_id": _string(maxLength=MAX_KEY_LENGTH),
            "attempt": _nullable(_integer("attempt")),
            "exit_code": _nullable(_integer("exit_code")),
        },
        "ScalingRuleSubmission": {
            "container_group_id": _string(pattern=_UUID_PATTERN),
            "min_replicas": _integer("min_replicas"),
            "max_replicas": _integer("max_replicas"),
            "idle_threshold_seconds": _integer("idle_threshold_seconds"),
        },
        "ScalingRuleUpdate": {
            "min_replicas": _nullable(_integer("min_replicas")),
            "max_replicas": _nullable(_integer("max_replicas")),
            "idle_threshold_seconds": _nullable(_integer("idle_threshold_seconds")),
        },
        "UserSubmission": {
            "username": _string(pattern=NOT_BLANK, maxLength=MAX_KEY_LENGTH)
        },
    }


def _sync_rules() -> dict[str, Any]:
    """
    ``sync``'s phases: ``before`` downloads, ``during`` and ``after`` upload.
    """

    def phase(direction: str) -> dict[str, Any]:
        entry = {
            "allOf": [
                {"$ref": "#/components/schemas/SyncConfig"},
                {"properties": {"direction": {"const": direction}}},
            ]
        }
        return _nullable({"type": "array", "items": entry})

    return {
        "before": phase("download"),
        "during": phase("upload"),
        "after": phase("upload"),
    }


def _storage_choice() -> list[dict[str, Any]]:
    """
    A submission uses either ``sync`` or all six flat storage fields.
    """
    empty = _nullable(_string(maxLength=0))
    with_sync = {
        "required": ["sync"],
        "properties": {
            "sync": {"$ref": "#/components/schemas/SyncSpec"},
            **dict.fromkeys(LEGACY_STORAGE_FIELDS, empty),
        },
    }
    flat = {
        "required": list(LEGACY_STORAGE_FIELDS),
        "properties": {
            "sync": {"type": "null"},
            **{k: _string(minLength=1) for k in LEGACY_STORAGE_FIELDS},
        },
    }
    return [with_sync, flat]


#: A machine or container group id in a query: 1 to 256 characters.
_KEY = _string(minLength=1, maxLength=MAX_KEY_LENGTH)
#: Query parameters' rules, by (method, path).
_QUERY_RULES: dict[tuple[str, str], dict[str, tuple[bool, dict[str, Any]]]] = {
    ("get", "/jobs"): {
        "status": (
            False,
            {
                "type": "string",
                "enum": ["pending", "running", "completed", "failed", "canceled"],
            },
        ),
        "page": (False, {**_integer("page"), "default": 1}),
        "page_size": (False, {**_integer("page_size"), "default": 100}),
        "id_prefix": (False, _string(maxLength=36)),
        "tag": (
            False,
            {
                "type": "array",
                "maxItems": MAX_TAGS,
                "items": _string(
                    minLength=1, maxLength=MAX_TAG_LENGTH, pattern=TAG_PATTERN
                ),
            },
        ),
    },
    ("get", "/work"): {
        "machine_id": (True, _KEY),
        "container_group_id": (True, _KEY),
    },
    ("get", "/jobs/{job_id}/status"): {
        "machine_id": (True, _KEY),
        "attempt": (False, _nullable(_integer("attempt"))),
    },
    ("get", "/jobs/{job_id}/logs"): {
        "attempt": (False, _nullable(_integer("attempt"))),
        "since": (False, {**_integer("since"), "default": 0}),
        "limit": (False, {**_integer("limit"), "default": 1000}),
    },
}
#: ``wait``: seconds a long poll may be held (absent or null: not at all).
_WAIT = _nullable({"type": "number", "minimum": 0, "maximum": MAX_LONG_POLL})


def describe(document: dict[str, Any]) -> dict[str, Any]:
    """
    Complete Litestar's OpenAPI document in place with what the server does.

    Args:
        document: The document as ``OpenAPI.to_schema()`` gives it.

    Returns:
        The same document.
    """
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name, fields in _component_rules().items():
        if name in schemas:
            schemas[name].setdefault("properties", {}).update(fields)
    if "SyncSpec" in schemas:
        schemas["SyncSpec"]["properties"].update(_sync_rules())
    if "JobSubmission" in schemas:
        schemas["JobSubmission"]["anyOf"] = _storage_choice()
    if "ScalingRuleUpdate" in schemas:
        # At least one limit, as a number (null changes nothing).
        schemas["ScalingRuleUpdate"]["anyOf"] = [
            {"required": [k], "properties": {k: {"type": "integer"}}}
            for k in ("min_replicas", "max_replicas", "idle_threshold_seconds")
        ]
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                _describe_operation(method, path, operation)
    return document


def _describe_operation(method: str, path: str, operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        if parameter.get("in") != "query":
            continue
        rule = _QUERY_RULES.get((method, path), {}).get(parameter["name"])
        if parameter["name"] == "wait":
            rule = (False, _WAIT)
        if rule is not None:
            parameter["required"], parameter["schema"] = rule
    if (method, path) == ("post", "/jobs/{job_id}/progress"):
        content = operation["requestBody"]["content"]["application/json"]
        content["schema"] = {
            "allOf": [
                content["schema"],
                {
                    "required": ["progress"],
                    "properties": {"progress": {"type": "object"}},
                },
            ]
        }
    if (method, path) == ("post", "/jobs/batch"):
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        schema.update(minItems=1, maxItems=MAX_BATCH_SIZE)
    responses = operation["responses"]
    answers = dict(_ALWAYS)
    if "{" in path:
        answers["404"] = _NOT_FOUND
    if (method, path) in _CONFLICT:
        answers["409"] = _CONFLICT[(method, path)]
    if "requestBody" in operation:
        answers["413"] = _TOO_LARGE
    if (method, path) in _MORE_400:
        answers["400"] += "; " + _MORE_400[(method, path)]
    for status, description in answers.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": _ERROR_REF}},
        }
        if status in ("429", "503"):
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        responses[status] = response
