"""
A fleet of claiming clients for the fault tests: each claims a job over HTTP,
reports it completed, and rides out errors (503, refused connections) the way
the worker does: wait a little and try again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

import attrs

from kelpie_sdk.client import Client
from kelpie_sdk.errors import APIError, ConflictError, KelpieError
from kelpie_sdk.models import WorkerReport


@attrs.define
class Tally:
    """What the fleet saw, shared by its threads."""

    claims: list[tuple[str, str, int]] = attrs.field(factory=list)
    completed: collections.Counter[str] = attrs.field(factory=collections.Counter)
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def error(self, exc: BaseException) -> None:
        status = getattr(exc, "status_code", None)
        with self.lock:
            self.errors[str(status) if status else type(exc).__name__] += 1


def run_fleet(
    urls: Sequence[str],
    key: str,
    group: str,
    *,
    clients: int,
    jobs: int,
    deadline_s: float,
    started: Callable[[Tally], object] = lambda _: None,
) -> Tally:
    """
    Run ``clients`` threads until ``jobs`` completions were accepted or the
    deadline passes; client ``n``
    starts on ``urls[n % len(urls)]`` and moves to the next URL when its
    server stops answering.
    """
    tally = Tally()

    def done() -> bool:
        with tally.lock:
            return len(tally.completed) >= jobs

    stop_at = time.monotonic() + deadline_s

    def one(n: int) -> None:
        machine = f"m-{n}"
        which = n % len(urls)
        api = Client(urls[which], key, max_retries=0, timeout=(2, 10))
        try:
            while not done() and time.monotonic() < stop_at:
                try:
                    job = api.claim_work(machine_id=machine, container_group_id=group)
                except (APIError, KelpieError) as exc:
                    tally.error(exc)
                    if getattr(exc, "status_code", None) is None and len(urls) > 1:
                        api.close()
                        which = (which + 1) % len(urls)
                        api = Client(urls[which], key, max_retries=0, timeout=(2, 10))
                    time.sleep(0.1)
                    continue
                if job is None:
                    time.sleep(0.05)
                    continue
                with tally.lock:
                    tally.claims.append((job.id, machine, job.attempt))
                report = WorkerReport(
                    machine_id=machine, container_group_id=group, attempt=job.attempt
                )
                while time.monotonic() < stop_at:
                    try:
                        api.report_completed(job.id, report)
                    except ConflictError:
                        break  # the lease lapsed and the job moved on
                    except (APIError, KelpieError) as exc:
                        tally.error(exc)
                        if getattr(exc, "status_code", None) is None and len(urls) > 1:
                            api.close()
                            which = (which + 1) % len(urls)
                            api = Client(
                                urls[which], key, max_retries=0, timeout=(2, 10)
                            )
                        time.sleep(0.1)
                        continue
                    with tally.lock:
                        tally.completed[job.id] += 1
                    break
        finally:
            api.close()

    started(tally)
    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 30)
    return tally
