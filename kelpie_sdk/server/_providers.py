"""
Fleet providers: what the autoscaler asks to start, stop and resize a
container group.

A provider is small: read a group's state, start it, stop it, set its replica
count, and reallocate one instance. Two are built in:

- ``SaladProvider``: the SaladCloud public API (through the package's HTTP
  transport: timeouts, ``Retry-After`` on 429, backoff on 5xx and broken
  connections).
- ``LocalProvider``: local worker processes, for ``kelpie up --autoscale``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import attrs

from kelpie_sdk._transport import Transport
from kelpie_sdk.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    KelpieError,
    NotFoundError,
    PermissionDeniedError,
    ProviderError,
)
from kelpie_sdk.models import ScalingRule

__all__ = [
    "DEFAULT_SALAD_API_URL",
    "GroupState",
    "LocalProvider",
    "LocalWorker",
    "Provider",
    "ProviderError",
    "SaladProvider",
]

logger = logging.getLogger(__name__)

#: SaladCloud's public API.
DEFAULT_SALAD_API_URL = "https://api.salad.com/api/public"

_MERGE_PATCH = "application/merge-patch+json"


@attrs.frozen(kw_only=True)
class GroupState:
    """
    A container group as the provider sees it.

    Attributes:
        status: ``running``, ``stopped``, ``pending``, ``deploying``,
            ``failed`` or ``succeeded`` (SaladCloud's states).
        replicas: The replica count the group is set to.
    """

    status: str
    replicas: int


class Provider(Protocol):
    """
    Starts, stops and resizes container groups.
    """

    def get_group(self, rule: ScalingRule) -> GroupState | None:
        """The group's state; ``None`` if it does not exist."""
        ...

    def start(self, rule: ScalingRule) -> None:
        """Start a stopped group."""
        ...

    def stop(self, rule: ScalingRule) -> None:
        """Stop a group (every instance goes away)."""
        ...

    def set_replicas(self, rule: ScalingRule, replicas: int) -> None:
        """Set how many instances the group should run."""
        ...

    def reallocate(self, rule: ScalingRule, instance_id: str, reason: str) -> None:
        """Move one instance to another machine."""
        ...


class SaladProvider:
    """
    The SaladCloud public API.

    The organization and project come from the rule (the API key's, stored
    when the rule was created), else from ``organization`` / ``project``; the
    group name from the rule's ``container_group_name``.

    Args:
        api_key: A SaladCloud API key (sent as ``Salad-Api-Key``).
        base_url: The API's base URL (tests point it at a loopback fake).
        organization: The default organization name.
        project: The default project name.
        max_retries: Retries per call (429, 5xx, connection errors).
        timeout: Seconds per attempt.
        sleep: Called with the seconds to wait between attempts.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_SALAD_API_URL,
        organization: str | None = None,
        project: str | None = None,
        max_retries: int = 3,
        timeout: float = 30.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not api_key:
            raise ProviderError(
                "the salad provider needs a SaladCloud API key; set SALAD_API_KEY"
            )
        options: dict[str, Any] = {"timeout": timeout, "max_retries": max_retries}
        if sleep is not None:
            options["sleep"] = sleep
        self.transport = Transport(base_url, {"Salad-Api-Key": api_key}, **options)
        self.organization = organization
        self.project = project

    def close(self) -> None:
        """
        Close pooled connections.
        """
        self.transport.close()

    def _group_path(self, rule: ScalingRule) -> str:
        org = rule.org_name or self.organization
        project = rule.project_name or self.project
        name = rule.container_group_name
        missing = [
            what
            for what, value in (
                ("organization (--salad-organization)", org),
                ("project (--salad-project)", project),
                ("container_group_name (set it on the scaling rule)", name),
            )
            if not value
        ]
        if missing:
            raise ProviderError(
                f"cannot address container group {rule.container_group_id} on "
                f"SaladCloud: no {', '.join(missing)}"
            )
        return (
            f"/organizations/{quote(str(org), safe='')}"
            f"/projects/{quote(str(project), safe='')}"
            f"/containers/{quote(str(name), safe='')}"
        )

    @staticmethod
    def _error(exc: KelpieError, method: str, path: str) -> ProviderError:
        if isinstance(exc, AuthenticationError | PermissionDeniedError):
            return ProviderError(
                f"SaladCloud refused the API key ({exc.status_code}) on {method} "
                f"{path}; check SALAD_API_KEY and its access to the project"
            )
        if isinstance(exc, NotFoundError):
            return ProviderError(
                f"SaladCloud has no {path} (404); check the rule's "
                "container_group_name, the organization and the project"
            )
        return ProviderError(f"SaladCloud call failed after retries: {exc}")

    def _call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        try:
            return self.transport.request(
                method,
                path,
                json_body=json_body,
                idempotent=idempotent,
                headers=headers,
            )
        except NotFoundError as exc:
            if missing_ok:
                return None
            raise self._error(exc, method, path) from exc
        except (APIStatusError, APIConnectionError) as exc:
            raise self._error(exc, method, path) from exc

    def get_group(self, rule: ScalingRule) -> GroupState | None:
        path = self._group_path(rule)
        body = self._call("GET", path, idempotent=True, missing_ok=True)
        if body is None:
            return None
        state = body.get("current_state") if isinstance(body, dict) else None
        status = state.get("status") if isinstance(state, dict) else None
        replicas = body.get("replicas") if isinstance(body, dict) else None
        if not isinstance(status, str) or not isinstance(replicas, int):
            raise ProviderError(
                f"SaladCloud's answer to GET {path} has no current_state.status "
                "or replicas"
            )
        return GroupState(status=status, replicas=replicas)

    def start(self, rule: ScalingRule) -> None:
        # Starting a group twice is harmless: safe to retry.
        self._call("POST", self._group_path(rule) + "/start", idempotent=True)

    def stop(self, rule: ScalingRule) -> None:
        self._call("POST", self._group_path(rule) + "/stop", idempotent=True)

    def set_replicas(self, rule: ScalingRule, replicas: int) -> None:
        self._call(
            "PATCH",
            self._group_path(rule),
            idempotent=True,  # an absolute value
            json_body={"replicas": replicas},
            headers={"Content-Type": _MERGE_PATCH, "Accept": _MERGE_PATCH},
        )

    def reallocate(self, rule: ScalingRule, instance_id: str, reason: str) -> None:
        # Not repeated after a 5xx: a second reallocation would move the
        # replacement too. 429 and refused connections are still retried.
        self._call(
            "POST",
            self._group_path(rule)
            + f"/instances/{quote(instance_id, safe='')}/reallocate",
            idempotent=False,
            json_body={"reason": reason[:1000] or "reallocate"},
        )


class LocalWorker(Protocol):
    """
    One local worker process, as ``LocalProvider`` drives it.
    """

    name: str

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def signal(self, sig: signal.Signals) -> None: ...

    def wait(self, timeout: float) -> int | None: ...

    def close(self) -> None: ...


class LocalProvider:
    """
    A "container group" made of local worker processes.

    ``spawn(index)`` makes a worker (not started yet); the index is the
    lowest not in use, so machine ids are reused after scale-in. Scale-in stops
    the newest workers with SIGTERM (they hand their jobs back to the queue)
    and waits up to ``stop_timeout`` seconds before SIGKILL. Workers that
    exited on their own are forgotten at the next ``get_group`` and so
    replaced at the next autoscaler tick.

    Thread-safe: the autoscaler thread and ``shutdown`` may overlap.
    """

    def __init__(
        self, spawn: Callable[[int], LocalWorker], *, stop_timeout: float = 60.0
    ) -> None:
        self._spawn = spawn
        self._stop_timeout = stop_timeout
        self._lock = threading.RLock()
        self._running = False
        self._target = 0
        self.workers: dict[int, LocalWorker] = {}

    def _prune(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.poll()
            if code is not None:
                logger.warning("local %s exited with code %s", worker.name, code)
                worker.close()
                del self.workers[index]

    def _stop(self, indexes: list[int]) -> None:
        stopping = [self.workers.pop(i) for i in indexes]
        for worker in stopping:
            worker.signal(signal.SIGTERM)
        for worker in stopping:
            if worker.wait(self._stop_timeout) is None:
                logger.warning("local %s did not stop in time; killing it", worker.name)
                worker.signal(signal.SIGKILL)
                worker.wait(5.0)
            worker.close()

    def _resize(self) -> None:
        self._prune()
        want = self._target if self._running else 0
        while len(self.workers) < want:
            index = next(
                i for i in range(len(self.workers) + 1) if i not in self.workers
            )
            worker = self._spawn(index)
            worker.start()
            self.workers[index] = worker
        if len(self.workers) > want:
            self._stop(sorted(self.workers)[want:])

    def get_group(self, rule: ScalingRule) -> GroupState | None:
        with self._lock:
            self._prune()
            # The live count: a worker that died shows as a missing replica,
            # and the autoscaler's next resize replaces it.
            return GroupState(
                status="running" if self._running else "stopped",
                replicas=len(self.workers),
            )

    def live(self) -> int:
        """
        How many worker processes are alive.
        """
        with self._lock:
            self._prune()
            return len(self.workers)

    def start(self, rule: ScalingRule) -> None:
        with self._lock:
            self._running = True
            self._resize()

    def stop(self, rule: ScalingRule) -> None:
        with self._lock:
            self._running = False
            self._resize()

    def set_replicas(self, rule: ScalingRule, replicas: int) -> None:
        with self._lock:
            self._target = replicas
            self._resize()

    def reallocate(self, rule: ScalingRule, instance_id: str, reason: str) -> None:
        with self._lock:
            found = [i for i, w in self.workers.items() if w.name == instance_id]
            if not found:
                raise ProviderError(f"no local worker named {instance_id!r}")
            self._stop(found)
            self._resize()

    def shutdown(self) -> None:
        """
        Stop every worker (the group is left stopped).
        """
        with self._lock:
            self._running = False
            self._prune()
            self._stop(sorted(self.workers))
