"""Rate limits and object locks (https://docs.stripe.com/rate-limits).

Stripe limits requests per second globally (100/s live, 25/s in sandboxes) and per endpoint
(25/s by default), answering 429 with code ``rate_limit``; and it answers 429 ``lock_timeout``
when concurrent requests fight over one object. Both are token buckets / per-object locks here,
in real (wall) time.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RateLimiter:
    def __init__(self, global_rate: float | None, endpoint_rate: float | None) -> None:
        self.configure(global_rate, endpoint_rate)

    def configure(self, global_rate: float | None, endpoint_rate: float | None) -> None:
        self.global_rate = global_rate or None
        self.endpoint_rate = endpoint_rate or None
        self.global_bucket = TokenBucket(self.global_rate) if self.global_rate else None
        self.endpoint_buckets: dict[str, TokenBucket] = {}

    def allow(self, endpoint: str) -> bool:
        if self.endpoint_rate:
            bucket = self.endpoint_buckets.get(endpoint)
            if bucket is None:
                bucket = self.endpoint_buckets[endpoint] = TokenBucket(self.endpoint_rate)
            if not bucket.take():
                return False
        return not (self.global_bucket and not self.global_bucket.take())


class ObjectLocks:
    """One writer per object; others wait up to ``wait_s`` then get ``lock_timeout``."""

    def __init__(self, wait_s: float = 0.0) -> None:
        self.wait_s = wait_s
        self.held: dict[str, asyncio.Event] = {}

    async def acquire(self, key: str) -> bool:
        deadline = time.monotonic() + self.wait_s
        while key in self.held:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.held[key].wait(), remaining)
            except TimeoutError:
                return False
        self.held[key] = asyncio.Event()
        return True

    def release(self, key: str) -> None:
        ev = self.held.pop(key, None)
        if ev is not None:
            ev.set()
