"""One Stripe request budget shared by every worker thread, process and machine, kept in Redis.

Stripe allows 100 requests/s per account in live mode (25 in test mode) and 25/s per endpoint by
default (https://docs.stripe.com/rate-limits). Each process counting on its own would multiply that by
the number of workers, so the budget lives in Redis and every request first reserves a slot there.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket without a refill job) run in
one Lua script, with no burst allowance: per bucket, consecutive slots are at least ``1/rate`` apart,
so any one-second window holds at most ``rate`` slots (plus one, where a window's two edges both land
on a slot). A request reserves the first instant free in *both* its endpoint bucket and the global
bucket, atomically, and the caller sleeps until then. Reserving rather than polling means no retry
storm and first-come first-served order, and a reserved slot is never handed to anybody else. Times
come from Redis (``TIME``), the one clock every machine shares.

If the wait would exceed ``max_wait``, nothing is reserved and :class:`RateLimitTimeout` (a
:class:`~billing.outcomes.TemporaryStripeError`) is raised: the request was not sent, and the caller
retries it later with the same idempotency key like any other temporary error.

If Redis itself is unreachable the limiter lets the request through (and logs it): without Redis the
workers receive no tasks anyway, and a Stripe 429 is itself handled as a temporary error.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping

import redis

from billing.outcomes import TemporaryStripeError
from billing.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT = 30.0
# One hash tag, so the keys of one reservation share a Redis Cluster slot as a multi-key script needs.
KEY_PREFIX = "billing:ratelimit:{stripe}:"

# KEYS: bucket keys (global first). ARGV: max_wait_us, then one emission interval (µs) per key.
# Each key holds its bucket's TAT (theoretical arrival time, µs): the earliest instant its next slot
# may start. Returns {reserved (0/1), wait_us}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local slot = now
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat > slot then slot = tat end
end
local wait = slot - now
if wait > max_wait then
  return {0, wait}
end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i + 1])
  local tat = slot + interval
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return {1, wait}
"""


class RateLimitTimeout(TemporaryStripeError):
    """No slot within ``max_wait``: the request was not sent; send it later with the same key."""


def endpoint_key(endpoint: str) -> str:
    return KEY_PREFIX + "endpoint:" + endpoint


GLOBAL_KEY = KEY_PREFIX + "global"


class RedisRateLimiter:
    """``acquire(endpoint)`` blocks until both the global and the endpoint's bucket have a slot.

    ``endpoint`` names a Stripe endpoint with object ids replaced, e.g. ``"POST /v1/payment_intents"``
    or ``"POST /v1/payment_intents/:id/confirm"`` (see :func:`endpoint_for`). ``endpoint_rates``
    overrides the per-endpoint default for the few endpoints Stripe limits differently.
    """

    def __init__(self, client: redis.Redis, *, global_rate: float, endpoint_rate: float,
                 endpoint_rates: Mapping[str, float] | None = None, max_wait: float = DEFAULT_MAX_WAIT,
                 sleep: Callable[[float], None] = time.sleep):
        if global_rate <= 0 or endpoint_rate <= 0:
            raise ValueError("rates must be positive")
        self._client = client
        self._script = client.register_script(_RESERVE)
        self.global_rate = global_rate
        self.endpoint_rate = endpoint_rate
        self.endpoint_rates = dict(endpoint_rates or {})
        self.max_wait = max_wait
        self._sleep = sleep

    def rate_for(self, endpoint: str) -> float:
        return self.endpoint_rates.get(endpoint, self.endpoint_rate)

    def reserve(self, endpoint: str, max_wait: float | None = None) -> float | None:
        """Reserve the next free slot; the seconds until it starts, or None if that is beyond max_wait."""
        max_wait = self.max_wait if max_wait is None else max_wait
        intervals = [round(1e6 / self.global_rate), round(1e6 / self.rate_for(endpoint))]
        reserved, wait_us = self._script(keys=[GLOBAL_KEY, endpoint_key(endpoint)],
                                         args=[round(max_wait * 1e6), *intervals])
        return int(wait_us) / 1e6 if int(reserved) else None

    def acquire(self, endpoint: str, max_wait: float | None = None) -> float:
        """Block until a slot for ``endpoint`` starts; returns the seconds waited."""
        try:
            wait = self.reserve(endpoint, max_wait)
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, sending without a reservation",
                        extra={"endpoint": endpoint, "error": type(exc).__name__})
            return 0.0
        if wait is None:
            raise RateLimitTimeout(f"no Stripe request slot for {endpoint} within {self.max_wait:.0f}s")
        if wait > 0:
            self._sleep(wait)
        return wait


def endpoint_for(method: str, path: str) -> str:
    """``("post", "/v1/payment_intents/pi_123/confirm")`` → ``"POST /v1/payment_intents/:id/confirm"``.

    Stripe paths alternate collection and object id after the version (``/v1/customers/cus_1/sources/
    card_2``), except for collection-level actions such as ``/v1/customers/search``.
    """
    segments = path.split("?")[0].strip("/").split("/")
    parts = [":id" if i >= 2 and i % 2 == 0 and seg not in _COLLECTION_ACTIONS else seg
             for i, seg in enumerate(segments)]
    return f"{method.upper()} /{'/'.join(parts)}"


_COLLECTION_ACTIONS = {"search", "preview", "upcoming"}


def limiter_from_settings(settings: Settings, client: redis.Redis | None = None) -> RedisRateLimiter:
    if client is None:
        client = _client_for(_broker_url(settings))
    return RedisRateLimiter(client, global_rate=settings.stripe_rate_limit_global,
                            endpoint_rate=settings.stripe_rate_limit_endpoint)


def _broker_url(settings: Settings) -> str:
    if settings.broker_url:
        return settings.broker_url
    from billing import embedded

    return embedded.broker_url(settings.data_dir)


@functools.cache
def _client_for(url: str) -> redis.Redis:
    # Short timeouts: a slow Redis must not hold a Stripe call hostage (acquire lets it through).
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
