"""
kelpie_sdk: run long compute jobs to completion on interruptible machines.

The public names are importable from here; they are loaded lazily (PEP 562) so
that ``import kelpie_sdk.checkpoint`` inside a training script pulls in neither
the HTTP client nor the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kelpie_sdk.client import Client, Timeout
    from kelpie_sdk.errors import (
        APIConnectionError,
        APIError,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        CheckpointError,
        ConfigError,
        ConflictError,
        InvalidIdError,
        KelpieError,
        NotFoundError,
        PermissionDeniedError,
        RateLimitError,
        ResponseValidationError,
        ServerError,
        WaitTimeoutError,
    )
    from kelpie_sdk.models import (
        Job,
        JobEvent,
        JobStatus,
        JobSubmission,
        ScalingRule,
        SyncConfig,
        SyncDirection,
        SyncSpec,
        User,
    )

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointError",
    "Client",
    "ConfigError",
    "ConflictError",
    "InvalidIdError",
    "Job",
    "JobEvent",
    "JobStatus",
    "JobSubmission",
    "KelpieError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseValidationError",
    "ScalingRule",
    "ServerError",
    "SyncConfig",
    "SyncDirection",
    "SyncSpec",
    "Timeout",
    "User",
    "WaitTimeoutError",
    "__version__",
]

_HOMES = {
    "Client": "kelpie_sdk.client",
    "Timeout": "kelpie_sdk.client",
    **dict.fromkeys(
        (
            "Job",
            "JobEvent",
            "JobStatus",
            "JobSubmission",
            "ScalingRule",
            "SyncConfig",
            "SyncDirection",
            "SyncSpec",
            "User",
        ),
        "kelpie_sdk.models",
    ),
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("kelpie-sdk")
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name in __all__:
        return getattr(importlib.import_module("kelpie_sdk.errors"), name)
    raise AttributeError(f"module 'kelpie_sdk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
