"""
In-process rate limits: failed authentications per client address, and
requests per API key.

Both are kept in this process's memory, so each server replica counts on its
own: behind a load balancer with N replicas a client gets up to N times the
limit.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

__all__ = [
    "AUTH_FAILURE_LIMIT",
    "AUTH_FAILURE_WINDOW",
    "FailureLimiter",
    "KeyRateLimiter",
]

#: Failed authentications from one address within ``AUTH_FAILURE_WINDOW``
#: seconds after which it is answered 429.
AUTH_FAILURE_LIMIT = 20
#: The window (seconds) over which failed authentications are counted.
AUTH_FAILURE_WINDOW = 60.0
#: The most addresses (or keys) tracked at once; the oldest are forgotten.
_MAX_TRACKED = 100_000


class FailureLimiter:
    """
    Counts failed authentications per client address in a sliding window.

    Args:
        limit: Failures within ``window`` after which the address is refused.
        window: Seconds.
        clock: A monotonic clock (seconds).
    """

    def __init__(
        self,
        limit: int = AUTH_FAILURE_LIMIT,
        window: float = AUTH_FAILURE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """
        Seconds until the address may try again, or ``None`` if it may now.
        """
        with self._lock:
            times = self._failures.get(address)
            if times is None:
                return None
            now = self._clock()
            self._expire(times, now)
            if not times:
                del self._failures[address]
                return None
            if len(times) < self.limit:
                return None
            # Wait until enough failures leave the window to fall under it.
            oldest = times[len(times) - self.limit]
            return max(1, math.ceil(oldest + self.window - now))

    def failed(self, address: str) -> None:
        """
        Count one failed authentication from the address.
        """
        with self._lock:
            now = self._clock()
            times = self._failures.get(address)
            if times is None:
                if len(self._failures) >= _MAX_TRACKED:
                    del self._failures[next(iter(self._failures))]
                times = self._failures[address] = collections.deque()
            self._expire(times, now)
            times.append(now)
            # A client that keeps failing while refused stays refused; only
            # the last ``limit`` failures matter.
            while len(times) > self.limit:
                times.popleft()

    def _expire(self, times: collections.deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()


class KeyRateLimiter:
    """
    A token bucket per API key: ``per_minute`` requests a minute, in bursts
    of up to ``per_minute``.

    Args:
        per_minute: The sustained rate, and the burst.
        clock: A monotonic clock (seconds).
    """

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> int | None:
        """
        Spend one request of the key; ``None`` if allowed, else the seconds
        until it may try again.
        """
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(key_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * self._rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                return max(1, math.ceil((1.0 - tokens) / self._rate))
            if key_id not in self._buckets and len(self._buckets) >= _MAX_TRACKED:
                del self._buckets[next(iter(self._buckets))]
            self._buckets[key_id] = (tokens - 1.0, now)
            return None
