"""Per-key request rate limits: one token bucket per key, in memory, O(1) per request.

A bucket holds up to ``burst`` tokens and gains ``rate_per_s`` per second; a request takes
one or is refused with the time until the next token. A key's bucket is charged only once
its secret checked out (so nobody can spend another key's budget by naming its id); failed
attempts are charged to the client's address instead. A full bucket is the same as no
bucket, so when there are many keys the full ones are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 10_000


@dataclass
class TokenBucket:
    """``tokens`` as of ``updated`` (a monotonic time in seconds)."""

    rate_per_s: float
    burst: int
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate_per_s)
        self.updated = now

    def full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.updated) * self.rate_per_s >= self.burst


class RateLimiter:
    """Token buckets by key id."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key_id: str) -> float:
        """0.0 if ``key_id`` may make a request now, else the seconds to wait."""
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:
                self._drop_full(now)
            bucket = TokenBucket(self.rate_per_s, self.burst, float(self.burst), now)
            self._buckets[key_id] = bucket
        return bucket.take(now)

    def wait(self, key_id: str) -> float:
        """The seconds until ``key_id`` could make a request (0.0: now); takes nothing."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return 0.0
        bucket.refill(self._clock())
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def _drop_full(self, now: float) -> None:
        full = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_buckets:  # all busy: forget the oldest
            oldest = min(self._buckets, key=lambda key: self._buckets[key].updated)
            del self._buckets[oldest]
