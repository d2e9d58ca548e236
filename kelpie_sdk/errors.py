"""
Every exception that kelpie_sdk raises.

The tree::

    KelpieError(Exception)
    ├── ConfigError(KelpieError, ValueError)          missing or invalid settings
    ├── InvalidIdError(KelpieError, ValueError)       an id that cannot name a resource
    ├── APIError(KelpieError)                         anything that involved the server
    │   ├── APIConnectionError                no usable response (cause: transport)
    │   │   └── APITimeoutError(APIConnectionError, TimeoutError)
    │   ├── ResponseValidationError           2xx, but the body is not as documented
    │   └── APIStatusError                    non-2xx: status_code, body, request_id
    │       ├── BadRequestError        400, 422
    │       ├── AuthenticationError    401
    │       ├── PermissionDeniedError  403
    │       ├── NotFoundError          404
    │       ├── ConflictError          409
    │       ├── RateLimitError         429
    │       └── ServerError            5xx
    ├── MachineQuarantined(KelpieError)               this machine gets no work for now
    ├── WaitTimeoutError(KelpieError, TimeoutError)   a caller-given deadline passed
    ├── ProviderError(KelpieError)                    the autoscaler's provider failed
    ├── StorageError(KelpieError, OSError)            a worker transfer failed
    │   ├── StorageNotFoundError(StorageError, FileNotFoundError)
    │   └── StoragePermissionError(StorageError, PermissionError)
    └── CheckpointError(KelpieError)
        ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
        ├── CheckpointCorruptError(CheckpointError)
        ├── CheckpointConflictError(CheckpointError, FileExistsError)
        ├── CheckpointFormatError(CheckpointError, ValueError)
        ├── CheckpointCodecError(CheckpointError, TypeError)
        └── CheckpointStorageError(CheckpointError, OSError)

Each error also inherits the builtin that fits, so ``except TimeoutError`` or
``except FileNotFoundError`` keep working. The original library exception, if
any, is kept as ``__cause__``.

This module imports nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointCodecError",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointStorageError",
    "ConfigError",
    "ConflictError",
    "InvalidIdError",
    "KelpieError",
    "MachineQuarantined",
    "NotFoundError",
    "PermissionDeniedError",
    "ProviderError",
    "RateLimitError",
    "ResponseValidationError",
    "ServerError",
    "StorageError",
    "StorageNotFoundError",
    "StoragePermissionError",
    "WaitTimeoutError",
    "status_error_class",
]


class KelpieError(Exception):
    """
    The root of every error that kelpie_sdk raises on purpose.
    """


class ConfigError(KelpieError, ValueError):
    """
    A setting is missing or invalid.

    The message names both the argument and the environment variable.
    """


class APIError(KelpieError):
    """
    Something went wrong while talking to a Kelpie API server.

    Attributes:
        method: The HTTP method of the request, if known.
        url: The URL of the request, if known.
    """

    def __init__(
        self, message: str, *, method: str | None = None, url: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.url = url


class APIConnectionError(APIError):
    """
    No usable response arrived: connection refused, reset, DNS, TLS.

    The transport's own exception is the ``__cause__``.
    """


class APITimeoutError(APIConnectionError, TimeoutError):
    """
    The request did not complete within its timeout.
    """


class ResponseValidationError(APIError):
    """
    The server answered 2xx, but the body is not what the protocol documents.
    """


class APIStatusError(APIError):
    """
    The server answered with a non-2xx status.

    Attributes:
        status_code: The HTTP status.
        body: The decoded JSON body, or the raw text if it was not JSON.
        request_id: The server's request id, if it sent one.
        retry_after: Seconds the server asked us to wait, if it said.
        index: For a rejected batch, the position of the job the server
            named (counted from the first job given to ``submit_jobs``), also
            shown in the message as ``job at index N``; ``None`` otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        method: str | None = None,
        url: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message, method=method, url=url)
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.retry_after = retry_after
        self.index = index

    def shift_index(self, offset: int) -> None:
        """
        Count ``index`` (and the message's ``job at index N``) ``offset`` further,
        for a batch that did not start at the first job.
        """
        if self.index is None or not offset:
            return
        old = f"job at index {self.index}: "
        self.index += offset
        self.message = self.message.replace(old, f"job at index {self.index}: ", 1)
        self.args = (self.message, *self.args[1:])


class BadRequestError(APIStatusError):
    """
    400 or 422: the server rejected the request as malformed or invalid.
    """


class AuthenticationError(APIStatusError):
    """
    401: no credentials, or credentials the server does not accept as such.
    """


class PermissionDeniedError(APIStatusError):
    """
    403: an invalid API key, or an admin-only endpoint.
    """


class NotFoundError(APIStatusError):
    """
    404: no such job, rule, user or route.
    """


class ConflictError(APIStatusError):
    """
    409: the request conflicts with the current state (e.g. a duplicate rule).
    """


class RateLimitError(APIStatusError):
    """
    429: too many requests.
    """


class ServerError(APIStatusError):
    """
    5xx: the server failed.
    """


_STATUS_CLASSES: Mapping[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """
    Return the exception class for an HTTP error status.

    Args:
        status_code: A status of 400 or more.

    Returns:
        The most specific subclass of APIStatusError for it.
    """
    if status_code >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)


class InvalidIdError(KelpieError, ValueError):
    """
    An id (of a job, container group, scaling rule or user) that is empty or
    could not be one path segment: refused before any request is sent.
    """


class WaitTimeoutError(KelpieError, TimeoutError):
    """
    A deadline that the caller gave (e.g. to ``Client.wait``) passed.
    """


class MachineQuarantined(KelpieError):
    """
    The server quarantined this machine (too many failures across different
    jobs) and gives it no work until ``until`` (an ISO 8601 time); the worker
    should move to another node.
    """

    def __init__(self, machine_id: str, until: str) -> None:
        super().__init__(
            f"the server quarantined machine {machine_id!r} until {until} after "
            "repeated job failures; move the worker to another node"
        )
        self.machine_id = machine_id
        self.until = until


class ProviderError(KelpieError):
    """
    A fleet provider (SaladCloud's API, local workers) could not read or
    change a container group.
    """


class StorageError(KelpieError, OSError):
    """
    A transfer to or from job storage failed after its retries.
    """


class StorageNotFoundError(StorageError, FileNotFoundError):
    """
    A bucket, prefix or object does not exist.
    """


class StoragePermissionError(StorageError, PermissionError):
    """
    The storage rejected the credentials, or they are missing.
    """


class CheckpointError(KelpieError):
    """
    The root of every error raised by ``kelpie_sdk.checkpoint``.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """
    No committed checkpoint exists (for that step).
    """


class CheckpointCorruptError(CheckpointError):
    """
    A checkpoint's data does not match its manifest.
    """


class CheckpointConflictError(CheckpointError, FileExistsError):
    """
    Another writer already committed this step.
    """


class CheckpointFormatError(CheckpointError, ValueError):
    """
    A manifest is from a newer format version, or is not a manifest at all.
    """


class CheckpointCodecError(CheckpointError, TypeError):
    """
    The state cannot be encoded or decoded (e.g. it is not picklable).
    """


class CheckpointStorageError(CheckpointError, OSError):
    """
    The storage backend failed: no fsspec implementation, missing credentials, I/O.
    """
