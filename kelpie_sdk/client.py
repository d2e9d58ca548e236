"""
The Kelpie API client.

>>> from kelpie_sdk import Client
>>> with Client() as client:  # KELPIE_API_URL / KELPIE_API_KEY   # doctest: +SKIP
...     job = client.submit_job(command="python", arguments=["train.py"],
...                             container_group_id=cg, sync={})
...     client.wait(job)
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

from kelpie_sdk._pagination import Paginator
from kelpie_sdk._transport import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Timeout,
    Transport,
    normalize_timeout,
)
from kelpie_sdk.config import SALAD_PROJECT_ENVS, Settings
from kelpie_sdk.errors import (
    APIStatusError,
    ConfigError,
    InvalidIdError,
    KelpieError,
    MachineQuarantined,
    ResponseValidationError,
    WaitTimeoutError,
)
from kelpie_sdk.models import (
    IDEMPOTENCY_HEADER,
    MAX_BATCH_SIZE,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    QUARANTINE_HEADER,
    ApiKey,
    Job,
    JobEvent,
    JobList,
    JobStatus,
    JobSubmission,
    JSONValue,
    LogLine,
    MachineTable,
    ScalingRule,
    ScalingRuleSubmission,
    ScalingRuleUpdate,
    SyncSpec,
    User,
    WorkerReport,
    is_idempotency_key,
)
from kelpie_sdk.webhooks import WebhookSecret

__all__ = ["DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT", "Client", "Timeout"]

logger = logging.getLogger(__name__)

#: Extra read time on top of a long-poll ``wait`` for ``claim_work``.
CLAIM_WAIT_MARGIN = 5.0
#: How long one ``GET /jobs/{id}/logs?follow=true`` may be held by the server.
LOG_FOLLOW_WAIT = 20.0


#: The longest id the client sends in a path.
MAX_ID_LENGTH = 256


def _quote(segment: str, what: str = "id") -> str:
    """
    An id as one path segment, refused if it could not be one.

    An empty id would turn ``DELETE /jobs/{id}`` into ``DELETE /jobs``
    (delete every job); a ``/`` would reach another route.

    Raises:
        InvalidIdError: The id is empty, blank, too long, ``.`` or ``..``, or
            holds a ``/``, a ``\\`` or a control character.
    """
    from urllib.parse import quote

    if not isinstance(segment, str) or not segment.strip():  # type: ignore[redundant-expr]
        raise InvalidIdError(f"{what} must be a non-empty string, got {segment!r}")
    if (
        len(segment) > MAX_ID_LENGTH
        or segment in (".", "..")
        or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in segment)
    ):
        raise InvalidIdError(
            f"{what} {segment[:80]!r} is not a valid id: at most {MAX_ID_LENGTH} "
            "characters, no '/', '\\' or control characters"
        )
    return quote(segment, safe="")


def _expect_mapping(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ResponseValidationError(
            f"{what}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _expect_list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise ResponseValidationError(
            f"{what}: expected a JSON array, got {type(data).__name__}"
        )
    return data


def _idempotency_key(key: str | None) -> str:
    """
    ``key`` checked as the server checks it, or a new UUID4 when ``None``.
    """
    if key is None:
        return str(uuid.uuid4())
    if not is_idempotency_key(key):
        raise ValueError(
            f"an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} "
            f"printable ASCII characters, got {key!r}"
        )
    return key


def _submission_json(job: JobSubmission | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(job, JobSubmission):
        return job.to_json()
    if isinstance(job, Mapping):
        # Sent as given: the server validates and names any problem.
        return dict(job)
    raise TypeError(
        f"a job must be a JobSubmission or a mapping, got {type(job).__name__}"
    )


def _bearer(token: Callable[[], str]) -> Callable[[], dict[str, str]]:
    """The ``Authorization`` header for each request, from a token source."""

    def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {token()}"}

    return headers


class Client:
    """
    A client for one Kelpie API server.

    Settings come from the arguments, else the environment (see
    ``kelpie_sdk.config``); the environment is read only here.

    A client may be shared between threads for concurrent requests. It is a
    context manager; ``close()`` releases its pooled connections (and those of
    every ``with_options`` copy, which share them).

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8787``
            (``KELPIE_API_URL``).
        api_key: A Kelpie key, sent as ``X-Kelpie-Key`` (``KELPIE_API_KEY``).
        salad_api_key: A SaladCloud key, the alternative (``SALAD_API_KEY``).
        salad_organization: With ``salad_api_key`` (``SALAD_ORGANIZATION``).
        salad_project: With ``salad_api_key`` (``SALAD_PROJECT``).
        timeout: Seconds per request, or ``(connect, read)``; never ``None``.
        max_retries: Retries of a failed request, where repeating is safe.
        environ: The environment to read instead of ``os.environ``.
        sleep: Waits between retries and polls (injectable for tests).
        workload_token: Where neither key is set, a function that returns a
            SaladCloud workload token (the worker passes IMDS's, cached); it is
            sent as ``Authorization: Bearer`` with ``Salad-Project``, which is
            then required. A self-hosted server does not accept these tokens.

    Raises:
        ConfigError: No credentials, a URL that is not http(s), or an invalid
            timeout or retry count.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        salad_api_key: str | None = None,
        salad_organization: str | None = None,
        salad_project: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        workload_token: Callable[[], str] | None = None,
    ) -> None:
        settings = Settings.from_env(environ).override(
            api_url=base_url,
            api_key=api_key,
            salad_api_key=salad_api_key,
            salad_organization=salad_organization,
            salad_project=salad_project,
        )
        if not settings.api_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"the API URL must start with http:// or https://, got "
                f"{settings.api_url!r} (from base_url= or KELPIE_API_URL)"
            )
        dynamic: Callable[[], dict[str, str]] | None = None
        if workload_token is not None and not (
            settings.api_key or settings.salad_api_key
        ):
            if not settings.salad_project:
                raise ConfigError(
                    "a workload token also needs salad_project= (or "
                    + " / ".join(SALAD_PROJECT_ENVS)
                    + ")"
                )
            headers = {"Salad-Project": settings.salad_project}
            dynamic = _bearer(workload_token)
        else:
            headers = settings.auth_headers()
        self.settings = settings
        self._sleep = sleep
        self._transport = Transport(
            settings.api_url,
            headers,
            timeout=timeout,
            max_retries=max_retries,
            sleep=sleep,
            dynamic_headers=dynamic,
        )

    @property
    def base_url(self) -> str:
        """
        The server's base URL.
        """
        return self._transport.base_url

    @property
    def timeout(self) -> tuple[float, float]:
        """
        The default ``(connect, read)`` timeout in seconds.
        """
        return self._transport.timeout

    @property
    def max_retries(self) -> int:
        """
        The default number of retries.
        """
        return self._transport.max_retries

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    def close(self) -> None:
        """
        Release pooled connections. The client should not be used afterwards.
        """
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def with_options(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> Client:
        """
        Return a client with other defaults that shares this one's connections.

        Args:
            timeout: The new default timeout (unchanged when ``None``).
            max_retries: The new default retries (unchanged when ``None``).
        """
        clone = object.__new__(Client)
        clone.settings = self.settings
        clone._sleep = self._sleep
        clone._transport = self._transport.with_options(
            timeout=timeout, max_retries=max_retries
        )
        return clone

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float | list[str]] | None = None,
        json_body: Any = None,
        idempotent: bool | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        return self._transport.request(
            method,
            path,
            params=params,
            json_body=json_body,
            idempotent=idempotent,
            timeout=timeout,
            max_retries=max_retries,
            headers=headers,
        )

    def _submit(
        self,
        path: str,
        body: Any,
        key: str,
        timeout: Timeout | None,
        max_retries: int | None,
    ) -> Any:
        # Every attempt carries the same key, so a repeat queues nothing new
        # on a server that honours it: this project's server, which is the
        # one X-Kelpie-Key talks to. The hosted API ignores the header, so
        # there a submission is repeated only when nothing was sent.
        return self._request(
            "POST",
            path,
            json_body=body,
            idempotent="X-Kelpie-Key" in self._transport.headers,
            timeout=timeout,
            max_retries=max_retries,
            headers={IDEMPOTENCY_HEADER: key},
        )

    # -- jobs ------------------------------------------------------------------

    def submit_job(
        self,
        *,
        command: str,
        container_group_id: str,
        arguments: Sequence[str] = (),
        environment: Mapping[str, str] | None = None,
        input_bucket: str | None = None,
        input_prefix: str | None = None,
        checkpoint_bucket: str | None = None,
        checkpoint_prefix: str | None = None,
        output_bucket: str | None = None,
        output_prefix: str | None = None,
        max_failures: int = 3,
        heartbeat_interval: int = 30,
        webhook: str | None = None,
        compression: bool = False,
        sync: SyncSpec | Mapping[str, Any] | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        idempotency_key: str | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> Job:
        """
        Queue one job.

        Give either the six flat storage fields or ``sync`` (``sync={}`` or
        ``SyncSpec()`` for no managed storage).

        The request carries an ``Idempotency-Key`` (``idempotency_key``, else a
        new UUID4), the same on each retry: with an API key (this project's
        server) a lost answer, a timeout or a 5xx is retried, and the job is
        still queued once. With SaladCloud credentials (the hosted API, which
        ignores the key) it is not retried once the request may have reached
        the server.

        Args:
            command: The program to run.
            container_group_id: The container group whose workers run it.
            arguments: The program's arguments.
            environment: Extra environment variables for the job.
            input_bucket: Legacy storage: the input bucket.
            input_prefix: Legacy storage: the input prefix.
            checkpoint_bucket: Legacy storage: the checkpoint bucket.
            checkpoint_prefix: Legacy storage: the checkpoint prefix.
            output_bucket: Legacy storage: the output bucket.
            output_prefix: Legacy storage: the output prefix.
            max_failures: Failures after which the job is failed for good.
            heartbeat_interval: Seconds between worker heartbeats.
            webhook: A URL told about status changes.
            compression: Whether the worker compresses uploads.
            sync: The managed-storage rules.
            name: A short name for the job (up to 200 characters), to find
                it by with ``list_jobs(name=...)``.
            tags: Up to 20 tags (letters, digits, ``_ . : / = + @ -``; up to
                64 characters each), to filter by with ``list_jobs(tags=...)``.
            idempotency_key: Your own key for this submission (1 to 255
                printable ASCII characters), to repeat it safely yourself,
                e.g. after a crash: a repeat within 24 hours returns the job
                queued the first time.
            timeout: Overrides the timeout for this call.
            max_retries: Overrides the retries for this call.

        Returns:
            The queued job (``pending``).

        Raises:
            ValueError: ``max_failures`` or ``heartbeat_interval`` below 1, an
                invalid name or tag, or an invalid ``idempotency_key``.
            BadRequestError: The server rejected the job.
            ConflictError: ``idempotency_key`` was already used for another
                submission.
        """
        key = _idempotency_key(idempotency_key)
        submission = JobSubmission(
            command=command,
            container_group_id=container_group_id,
            arguments=arguments,
            environment=environment or {},
            input_bucket=input_bucket,
            input_prefix=input_prefix,
            checkpoint_bucket=checkpoint_bucket,
            checkpoint_prefix=checkpoint_prefix,
            output_bucket=output_bucket,
            output_prefix=output_prefix,
            max_failures=max_failures,
            heartbeat_interval=heartbeat_interval,
            webhook=webhook,
            compression=compression,
            sync=sync if isinstance(sync, SyncSpec) else None,
            name=name,
            tags=tags,
        )
        body = submission.to_json()
        if sync is not None and not isinstance(sync, SyncSpec):
            body["sync"] = dict(sync)
        data = self._submit("/jobs", body, key, timeout, max_retries)
        return Job.from_json(data)

    def submit_jobs(
        self,
        jobs: Iterable[JobSubmission | Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> list[Job]:
        """
        Queue many jobs, in batches of up to ``MAX_BATCH_SIZE`` (1000).

        Each batch is all-or-nothing on the server; if a later batch fails,
        the earlier ones stay queued (a note on the exception says how many).
        Each batch carries an ``Idempotency-Key``, the same on each of its
        retries, and is retried as ``submit_job`` is.

        Args:
            jobs: ``JobSubmission`` objects or wire-shaped mappings.
            idempotency_key: Your own key for this call (1 to 255 printable
                ASCII characters): the first batch is sent with it, batch
                ``n`` (from 0) after it with ``"<key>.<n>"``. Repeating the
                call with the same key and jobs queues nothing twice.
            timeout: Overrides the timeout for each batch request.
            max_retries: Overrides the retries for each batch request.

        Returns:
            The queued jobs, in the order given.

        Raises:
            ValueError: An invalid ``idempotency_key`` (with its suffix).
            BadRequestError: The server rejected a batch; ``index`` (and the
                message, ``job at index N``) names the rejected job, counted
                from the first job given.
            ConflictError: ``idempotency_key`` was already used for other jobs.
        """
        bodies = [_submission_json(job) for job in jobs]
        base = _idempotency_key(idempotency_key)
        keys = [
            _idempotency_key(f"{base}.{n}" if n else base)
            for n in range(-(-len(bodies) // MAX_BATCH_SIZE))
        ]
        queued: list[Job] = []
        for start in range(0, len(bodies), MAX_BATCH_SIZE):
            chunk = bodies[start : start + MAX_BATCH_SIZE]
            if start:
                logger.debug("submitting jobs %d..%d", start, start + len(chunk) - 1)
            try:
                data = _expect_list(
                    self._submit(
                        "/jobs/batch",
                        chunk,
                        keys[start // MAX_BATCH_SIZE],
                        timeout,
                        max_retries,
                    ),
                    "POST /jobs/batch",
                )
            except KelpieError as exc:
                if isinstance(exc, APIStatusError):
                    exc.shift_index(start)
                if queued:
                    exc.add_note(
                        f"{len(queued)} job(s) of earlier batches were queued: "
                        f"first {queued[0].id}, last {queued[-1].id}"
                    )
                raise
            if len(data) != len(chunk):
                raise ResponseValidationError(
                    f"POST /jobs/batch: sent {len(chunk)} jobs, got {len(data)} back"
                )
            queued.extend(Job.from_json(item) for item in data)
        return queued

    def get_job(
        self,
        job_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> Job:
        """
        Fetch one job.

        Raises:
            NotFoundError: No such job (or not yours).
        """
        data = self._request(
            "GET",
            f"/jobs/{_quote(job_id, 'job_id')}",
            timeout=timeout,
            max_retries=max_retries,
        )
        return Job.from_json(data)

    def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        container_group_id: str | None = None,
        page_size: int = 100,
        asc: bool = False,
        id_prefix: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> Paginator[Job]:
        """
        List jobs, newest first (oldest first with ``asc=True``).

        Nothing is fetched until you iterate; pages are fetched as needed.
        Use ``.pages()`` on the result to get whole pages.

        Args:
            status: Only jobs in this status.
            container_group_id: Only jobs of this container group.
            page_size: Jobs per request.
            asc: Oldest first.
            id_prefix: Only jobs whose id starts with this. A server without
                this filter sends every job; they are then filtered here.
            name: Only jobs with exactly this name.
            tags: Only jobs carrying every one of these tags.
            timeout: Overrides the timeout for each page request.
            max_retries: Overrides the retries for each page request.

        Raises:
            ValueError: An unknown status or a page size below 1.
        """
        if status is not None:
            status = JobStatus(status)
        params: dict[str, str | int | float | list[str]] = {
            "asc": "true" if asc else "false"
        }
        if status is not None:
            params["status"] = status.value
        if container_group_id is not None:
            params["container_group_id"] = container_group_id
        if id_prefix:
            params["id_prefix"] = id_prefix
        if name is not None:
            params["name"] = name
        wanted = list(tags)
        if wanted:
            params["tag"] = wanted

        def fetch(page: int, size: int) -> Sequence[Job]:
            data = self._request(
                "GET",
                "/jobs",
                params={**params, "page": page, "page_size": size},
                timeout=timeout,
                max_retries=max_retries,
            )
            return JobList.from_json(data).jobs

        if not id_prefix and name is None and not wanted:
            return Paginator(fetch, page_size=page_size)
        prefix = id_prefix or ""

        def keep(job: Job) -> bool:
            # A server without these filters sends every job.
            return (
                job.id.startswith(prefix)
                and (name is None or job.name == name)
                and all(t in (job.tags or ()) for t in wanted)
            )

        return Paginator(fetch, page_size=page_size, keep=keep)

    def events(
        self,
        job_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> list[JobEvent]:
        """
        A job's history, oldest first: every transition with its time,
        attempt, machine and cause (see ``JobEvent``).

        Raises:
            NotFoundError: No such job (or not yours), or a server without
                event history (the hosted API).
        """
        data = _expect_mapping(
            self._request(
                "GET",
                f"/jobs/{_quote(job_id, 'job_id')}/events",
                timeout=timeout,
                max_retries=max_retries,
            ),
            "job events",
        )
        return [
            JobEvent.from_json(e) for e in _expect_list(data.get("events"), "events")
        ]

    def cancel(
        self,
        job_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Cancel a pending or running job; a running worker stops at its next
        heartbeat.

        Raises:
            NotFoundError: No such job.
            ConflictError: The job already completed or failed.
        """
        self._request(
            "DELETE",
            f"/jobs/{_quote(job_id, 'job_id')}",
            timeout=timeout,
            max_retries=max_retries,
        )

    def wait(
        self,
        jobs: str | Job | Iterable[str | Job],
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        on_update: Callable[[list[Job]], object] | None = None,
        progress: bool = False,
    ) -> list[Job]:
        """
        Wait until every job is completed, canceled or failed.

        Args:
            jobs: A job, a job id, or several.
            timeout: Overall seconds to wait; ``None`` waits as long as it takes.
                Each request still has its own timeout.
            poll_interval: Seconds between polls.
            on_update: Called with the latest state of every job (in the order
                given) after the first poll and whenever a job changed since
                the last call; an exception it raises ends the wait.
            progress: Show a progress bar while waiting: HTML updated in place
                in a Jupyter notebook, a line rewritten in place on stderr in a
                terminal, else a plain line on stderr whenever it changes.

        Returns:
            The finished jobs, in the order given.

        Raises:
            WaitTimeoutError: The deadline passed first.
            ValueError: A negative timeout or a poll interval that is not positive.
        """
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must not be negative, got {timeout}")
        if isinstance(jobs, str | Job):
            jobs = [jobs]
        ids = [job.id if isinstance(job, Job) else job for job in jobs]
        deadline = None if timeout is None else time.monotonic() + timeout
        display = None
        if progress:
            from kelpie_sdk._wait_display import open_display

            display = open_display()
        latest: dict[str, Job] = {}
        shown: list[Job] | None = None
        try:
            while True:
                for job_id in ids:
                    known = latest.get(job_id)
                    if known is None or not known.finished:
                        latest[job_id] = self.get_job(job_id)
                # The same id given twice is fetched once.
                current = [latest[i] for i in ids]
                if current != shown:
                    shown = current
                    if display is not None:
                        display.update(current)
                    if on_update is not None:
                        on_update(list(current))
                pending = [j.id for j in current if not j.finished]
                if not pending:
                    return current
                delay = poll_interval
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeoutError(
                            f"{len(pending)} of {len(ids)} job(s) still unfinished "
                            f"after {timeout:g} s: {', '.join(pending[:5])}"
                            + (" ..." if len(pending) > 5 else "")
                        )
                    delay = min(delay, remaining)
                self._sleep(delay)
        finally:
            if display is not None:
                display.close()

    def logs(
        self,
        job_id: str | Job,
        *,
        follow: bool = False,
        attempt: int | None = None,
        since: int = 0,
        timeout: Timeout | None = None,
    ) -> Iterator[LogLine]:
        """
        The lines the job's command wrote, oldest first, with their attempt,
        stream and time.

        The server keeps the last part of each attempt's output (1 MiB by
        default); older lines are gone.

        Args:
            job_id: The job or its id.
            follow: Keep yielding new lines as the worker sends them (about a
                second behind the job), until the job reaches a final state.
            attempt: Only this attempt's lines.
            since: Only lines after this ``seq`` (a line's ``seq`` is a cursor).
            timeout: Per request; a follow's long polls get 5 s more than the
                server may hold them.

        Yields:
            :class:`~kelpie_sdk.models.LogLine` objects.

        Raises:
            InvalidIdError: The id is empty or malformed (raised at once, not
                when iterating).
            NotFoundError: No such job (or not yours).
        """
        the_id = job_id.id if isinstance(job_id, Job) else job_id
        path = f"/jobs/{_quote(the_id, 'job_id')}/logs"
        limits = normalize_timeout(self.timeout if timeout is None else timeout)
        if follow:
            limits = (limits[0], max(limits[1], LOG_FOLLOW_WAIT + CLAIM_WAIT_MARGIN))
        return self._log_lines(path, follow, attempt, since, limits)

    def _log_lines(
        self,
        path: str,
        follow: bool,
        attempt: int | None,
        since: int,
        limits: tuple[float, float],
    ) -> Iterator[LogLine]:
        cursor = since
        while True:
            params: dict[str, str | int | float] = {"since": cursor}
            if attempt is not None:
                params["attempt"] = attempt
            if follow:
                params["follow"] = "true"
                params["wait"] = f"{LOG_FOLLOW_WAIT:g}"
            data = _expect_mapping(
                self._request(
                    "GET", path, params=params, idempotent=True, timeout=limits
                ),
                "GET /jobs/{id}/logs",
            )
            lines = [
                LogLine.from_json(item)
                for item in _expect_list(
                    data.get("lines"), "GET /jobs/{id}/logs: lines"
                )
            ]
            yield from lines
            nxt = data.get("next")
            if isinstance(nxt, int) and not isinstance(nxt, bool):
                cursor = max(cursor, nxt)
            elif lines:
                cursor = lines[-1].seq
            if data.get("more"):
                continue
            if not follow or data.get("finished"):
                return

    def purge_container_group(
        self,
        container_group_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> int:
        """
        Delete your pending jobs of a container group and cancel its running ones.

        Returns:
            The number of jobs deleted or canceled.
        """
        data = _expect_mapping(
            self._request(
                "DELETE",
                "/jobs/container-groups/"
                + _quote(container_group_id, "container_group_id"),
                timeout=timeout,
                max_retries=max_retries,
            ),
            "DELETE /jobs/container-groups",
        )
        count = data.get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ResponseValidationError(
                f"DELETE /jobs/container-groups: 'count' must be an integer, "
                f"got {count!r}"
            )
        return count

    # -- scaling rules ---------------------------------------------------------

    def create_scaling_rule(
        self,
        *,
        container_group_id: str,
        min_replicas: int,
        max_replicas: int,
        idle_threshold_seconds: int,
        container_group_name: str | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> ScalingRule:
        """
        Create the scaling rule of a container group.

        Raises:
            ValueError: Limits out of range, or min above max.
            ConflictError: The group already has a rule.
        """
        body = ScalingRuleSubmission(
            container_group_id=container_group_id,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            idle_threshold_seconds=idle_threshold_seconds,
            container_group_name=container_group_name,
        ).to_json()
        data = self._request(
            "POST",
            "/scaling-rules",
            json_body=body,
            timeout=timeout,
            max_retries=max_retries,
        )
        return ScalingRule.from_json(data)

    def list_scaling_rules(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> list[ScalingRule]:
        """
        Every scaling rule you own (all of them for the admin).
        """
        data = _expect_mapping(
            self._request(
                "GET", "/scaling-rules", timeout=timeout, max_retries=max_retries
            ),
            "GET /scaling-rules",
        )
        rules = _expect_list(data.get("rules"), "GET /scaling-rules: 'rules'")
        return [ScalingRule.from_json(r) for r in rules]

    def get_scaling_rule(
        self,
        container_group_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> ScalingRule:
        """
        The scaling rule of a container group.

        Raises:
            NotFoundError: The group has no rule.
        """
        data = self._request(
            "GET",
            f"/scaling-rules/{_quote(container_group_id, 'container_group_id')}",
            timeout=timeout,
            max_retries=max_retries,
        )
        return ScalingRule.from_json(data)

    def update_scaling_rule(
        self,
        container_group_id: str,
        *,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        idle_threshold_seconds: int | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> ScalingRule:
        """
        Change some limits of a scaling rule (absolute values, so retried).

        Raises:
            ValueError: Nothing to change, or a limit out of range.
            NotFoundError: The group has no rule.
        """
        body = ScalingRuleUpdate(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            idle_threshold_seconds=idle_threshold_seconds,
        ).to_json()
        if not body:
            raise ValueError("update_scaling_rule needs at least one limit to change")
        data = self._request(
            "PATCH",
            f"/scaling-rules/{_quote(container_group_id, 'container_group_id')}",
            json_body=body,
            idempotent=True,
            timeout=timeout,
            max_retries=max_retries,
        )
        return ScalingRule.from_json(data)

    def delete_scaling_rule(
        self,
        container_group_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Delete the scaling rule of a container group (no error if there is none).
        """
        self._request(
            "DELETE",
            f"/scaling-rules/{_quote(container_group_id, 'container_group_id')}",
            timeout=timeout,
            max_retries=max_retries,
        )

    # -- users and admin ---------------------------------------------------------

    def me(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> User:
        """
        The user these credentials belong to.
        """
        data = self._request(
            "GET", "/users/me", timeout=timeout, max_retries=max_retries
        )
        return User.from_json(data)

    def webhook_secret(
        self,
        *,
        rotate: bool = False,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> WebhookSecret:
        """
        The caller's webhook signing secret (the server creates it on first
        use); with ``rotate=True``, replace it first.

        After a rotation the server signs each webhook with both the new and
        the previous secret for a day, so receivers can switch without
        missing a delivery.

        Args:
            rotate: Issue a new secret (the old one stays valid for a day).
            timeout: Overrides the client's timeout for this call.
            max_retries: Overrides the client's retries for this call
                (a rotation is not retried unless this says so: a repeated
                one would retire the secret it had just issued).
        """
        if rotate and max_retries is None:
            max_retries = 0
        data = self._request(
            "POST" if rotate else "GET",
            "/users/me/webhook-secret",
            timeout=timeout,
            max_retries=max_retries,
        )
        return WebhookSecret.from_json(data)

    def create_user(
        self,
        username: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> User:
        """
        Admin: create a user.

        Raises:
            PermissionDeniedError: Not the admin.
            BadRequestError: The user exists.
        """
        data = self._request(
            "POST",
            "/users",
            json_body={"username": username},
            timeout=timeout,
            max_retries=max_retries,
        )
        return User.from_json(data)

    def create_token(
        self,
        user_id: str,
        *,
        org_name: str = "",
        project_name: str = "",
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> str:
        """
        Admin: issue an API key (``X-Kelpie-Key``) for a user.

        Returns:
            The new key.

        Raises:
            NotFoundError: No such user.
        """
        data = _expect_mapping(
            self._request(
                "POST",
                f"/users/{_quote(user_id, 'user_id')}/token",
                json_body={"org_name": org_name, "project_name": project_name},
                timeout=timeout,
                max_retries=max_retries,
            ),
            "POST /users/{id}/token",
        )
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise ResponseValidationError(
                f"POST /users/{{id}}/token: 'token' must be a string, got {token!r}"
            )
        return token

    def create_key(
        self,
        role: str = "user",
        *,
        container_groups: Sequence[str] | None = None,
        expires_in: int | None = None,
        user_id: str | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> ApiKey:
        """
        Make an API key; its secret is in ``key``, and is shown only this once.

        Args:
            role: ``user``, ``worker`` or (admin only) ``admin``.
            container_groups: The only container groups a worker key may
                claim from; default: all of its user's.
            expires_in: Seconds until the key stops working; default: never.
            user_id: Whose key (admin only); default: these credentials' user.

        Raises:
            PermissionDeniedError: An admin key or another user's key asked
                for without an admin key, or a worker key calling.
            BadRequestError: An unknown role, or a bad ``expires_in``.
        """
        body: dict[str, Any] = {"role": role}
        if container_groups is not None:
            body["container_groups"] = list(container_groups)
        if expires_in is not None:
            body["expires_in"] = expires_in
        if user_id is not None:
            body["user_id"] = user_id
        data = self._request(
            "POST",
            "/keys",
            json_body=body,
            timeout=timeout,
            max_retries=max_retries,
        )
        return ApiKey.from_json(data)

    def list_keys(
        self,
        *,
        all_users: bool = False,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> list[ApiKey]:
        """
        The live API keys of these credentials' user (every user's with
        ``all_users``, admin only), without their secrets, oldest first.
        """
        data = _expect_mapping(
            self._request(
                "GET",
                "/keys",
                params={"all_users": "true"} if all_users else None,
                timeout=timeout,
                max_retries=max_retries,
            ),
            "GET /keys",
        )
        keys = data.get("keys")
        if not isinstance(keys, list):
            raise ResponseValidationError(
                f"GET /keys: 'keys' must be a list, got {keys!r}"
            )
        return [ApiKey.from_json(k) for k in keys]

    def revoke_key(
        self,
        key_id: str,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Revoke an API key by its id; it stops working at once on this server
        (within seconds on its replicas).

        Raises:
            NotFoundError: No such live key that these credentials may revoke.
        """
        self._request(
            "DELETE",
            f"/keys/{_quote(key_id)}",
            timeout=timeout,
            max_retries=max_retries,
        )

    def delete_all_users(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> None:
        """
        Admin: delete every user but the admin, and their keys.
        """
        self._request("DELETE", "/users", timeout=timeout, max_retries=max_retries)

    def delete_all_jobs(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> None:
        """
        Admin: delete every job of every user.
        """
        self._request("DELETE", "/jobs", timeout=timeout, max_retries=max_retries)

    def delete_all_scaling_rules(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> None:
        """
        Admin: delete every scaling rule.
        """
        self._request(
            "DELETE", "/scaling-rules", timeout=timeout, max_retries=max_retries
        )

    # -- machines ---------------------------------------------------------------

    def machines(
        self, *, timeout: Timeout | None = None, max_retries: int | None = None
    ) -> MachineTable:
        """
        The machines that worked for this user (every user's for the admin),
        and the container groups with pending jobs but no live machine.

        Not in the original API (a ``NotFoundError`` there).
        """
        return MachineTable.from_json(
            self._request("GET", "/machines", timeout=timeout, max_retries=max_retries)
        )

    # -- worker endpoints --------------------------------------------------------

    def claim_work(
        self,
        *,
        machine_id: str,
        container_group_id: str,
        wait: float | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> Job | None:
        """
        Worker: take the next job of a container group, if there is one.

        Retried only when the request cannot have reached the server (a lost
        answer would otherwise leave a second claimed job behind). The worker's
        poll loop repeats the call anyway.

        Args:
            machine_id: This machine.
            container_group_id: The group it serves.
            wait: Long-poll: seconds the server may hold the request while the
                queue is empty. The read timeout is raised to ``wait + 5`` s.
            timeout: Overrides the timeout for this call.
            max_retries: Overrides the retries for this call.

        Returns:
            The claimed job (now ``running``), or ``None`` if the queue is empty.

        Raises:
            MachineQuarantined: The server gives this machine no work for now
                (it answered ``[]`` with the ``Kelpie-Quarantined-Until``
                header).
        """
        params: dict[str, str | int | float] = {
            "machine_id": machine_id,
            "container_group_id": container_group_id,
        }
        limits = normalize_timeout(self.timeout if timeout is None else timeout)
        if wait is not None:
            if wait < 0:
                raise ValueError(f"wait must not be negative, got {wait}")
            params["wait"] = f"{wait:g}"
            limits = (limits[0], max(limits[1], wait + CLAIM_WAIT_MARGIN))
        answer_headers: dict[str, str] = {}
        data = _expect_list(
            self._transport.request(
                "GET",
                "/work",
                params=params,
                idempotent=False,
                timeout=limits,
                max_retries=max_retries,
                response_headers=answer_headers,
            ),
            "GET /work",
        )
        if not data:
            until = answer_headers.get(QUARANTINE_HEADER.lower())
            if until:
                raise MachineQuarantined(machine_id, until)
            return None
        if len(data) != 1:
            raise ResponseValidationError(
                f"GET /work: expected at most one job, got {len(data)}"
            )
        return Job.from_json(data[0])

    def heartbeat(
        self,
        job_id: str,
        report: WorkerReport,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> JobStatus:
        """
        Worker: report that the job is still running (idempotent, so retried).

        Returns:
            The job's status; ``canceled`` means stop now.
        """
        data = _expect_mapping(
            self._request(
                "POST",
                f"/jobs/{_quote(job_id, 'job_id')}/heartbeat",
                json_body=report.to_json(),
                idempotent=True,
                timeout=timeout,
                max_retries=max_retries,
            ),
            "POST /jobs/{id}/heartbeat",
        )
        value = data.get("status")
        if not isinstance(value, str) or value not in JobStatus._value2member_map_:
            raise ResponseValidationError(
                f"POST /jobs/{{id}}/heartbeat: 'status' must be a job status, "
                f"got {value!r}"
            )
        return JobStatus(value)

    def _report(
        self,
        job_id: str,
        outcome: str,
        report: WorkerReport,
        timeout: Timeout | None,
        max_retries: int | None,
    ) -> None:
        body: dict[str, JSONValue] = report.to_json()
        self._request(
            "POST",
            f"/jobs/{_quote(job_id, 'job_id')}/{outcome}",
            json_body=body,
            idempotent=False,
            timeout=timeout,
            max_retries=max_retries,
        )

    def report_completed(
        self,
        job_id: str,
        report: WorkerReport,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Worker: report that the job finished successfully.

        Raises:
            ConflictError: This machine no longer holds the job.
            NotFoundError: No such job.
        """
        self._report(job_id, "completed", report, timeout, max_retries)

    def report_failed(
        self,
        job_id: str,
        report: WorkerReport,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Worker: report that the job failed on this machine.

        Raises:
            ConflictError: This machine no longer holds the job.
            NotFoundError: No such job.
        """
        self._report(job_id, "failed", report, timeout, max_retries)

    def release(
        self,
        job_id: str,
        report: WorkerReport,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """
        Worker: give the job back to the queue unfinished (e.g. on shutdown);
        counted as an interruption, not a failure.

        Raises:
            ConflictError: This machine no longer holds the job.
            NotFoundError: No such job.
        """
        self._report(job_id, "release", report, timeout, max_retries)

    # -- between heartbeats: progress and the holder's status ---------------------
    #
    # Optional additions to the protocol (a server written for the original
    # answers them 404): they carry progress and cancellation within seconds
    # without making heartbeats more frequent.

    def report_progress(
        self,
        job_id: str,
        report: WorkerReport,
        *,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> JobStatus:
        """
        Worker: send the job's latest progress record (``report.progress``)
        now, without extending the lease.

        Returns:
            The job's status as a heartbeat answers it; ``canceled`` means
            stop now.
        """
        data = self._request(
            "POST",
            f"/jobs/{_quote(job_id, 'job_id')}/progress",
            json_body=report.to_json(),
            idempotent=True,
            timeout=timeout,
            max_retries=max_retries,
        )
        return _job_status(data, "POST /jobs/{id}/progress")

    def ship_logs(
        self,
        job_id: str,
        *,
        machine_id: str,
        attempt: int,
        offset: int,
        lines: Sequence[Mapping[str, JSONValue]],
        container_group_id: str = "",
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> int:
        """
        Worker: append a batch of the attempt's output lines.

        Args:
            machine_id: This machine (it must hold, or have last held, the job).
            attempt: The claim's attempt.
            offset: The number of the batch's first line among all the lines
                this attempt wrote (counting lines dropped before sending).
            lines: ``{"stream": "stdout"|"stderr", "time": <epoch seconds>,
                "line": text}`` each.

        Returns:
            How many lines the server accepted.

        Raises:
            ConflictError: This machine and attempt no longer hold the job.
        """
        data = self._request(
            "POST",
            f"/jobs/{_quote(job_id, 'job_id')}/logs",
            json_body={
                "machine_id": machine_id,
                "container_group_id": container_group_id,
                "attempt": attempt,
                "offset": offset,
                "lines": list(lines),
            },
            idempotent=True,
            timeout=timeout,
            max_retries=max_retries,
        )
        accepted = _expect_mapping(data, "POST /jobs/{id}/logs").get("accepted")
        return accepted if isinstance(accepted, int) else 0

    def holder_status(
        self,
        job_id: str,
        *,
        machine_id: str,
        attempt: int | None = None,
        wait: float | None = None,
        timeout: Timeout | None = None,
        max_retries: int | None = None,
    ) -> JobStatus:
        """
        Worker: the job's status for its holder, without extending the lease.

        Args:
            machine_id: This machine.
            attempt: The claim's attempt, to tell this claim from later ones.
            wait: Long-poll: seconds the server may hold the request while
                the answer is ``running``; it answers at once when the job is
                canceled, finished or claimed by another machine. The read
                timeout is raised to ``wait + 5`` s.

        Returns:
            ``running`` while this machine holds the job, else ``canceled`` or
            the job's final status.
        """
        params: dict[str, str | int | float] = {"machine_id": machine_id}
        if attempt is not None:
            params["attempt"] = attempt
        limits = normalize_timeout(self.timeout if timeout is None else timeout)
        if wait is not None:
            if wait < 0:
                raise ValueError(f"wait must not be negative, got {wait}")
            params["wait"] = f"{wait:g}"
            limits = (limits[0], max(limits[1], wait + CLAIM_WAIT_MARGIN))
        data = self._request(
            "GET",
            f"/jobs/{_quote(job_id, 'job_id')}/status",
            params=params,
            idempotent=True,
            timeout=limits,
            max_retries=max_retries,
        )
        return _job_status(data, "GET /jobs/{id}/status")


def _job_status(data: Any, what: str) -> JobStatus:
    value = _expect_mapping(data, what).get("status")
    if not isinstance(value, str) or value not in JobStatus._value2member_map_:
        raise ResponseValidationError(
            f"{what}: 'status' must be a job status, got {value!r}"
        )
    return JobStatus(value)
