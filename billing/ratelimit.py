"""One Stripe request budget shared by every worker thread, process and machine, kept in Redis.

Stripe allows 100 requests/s per account in live mode (25 in test mode) and 25/s per endpoint by
default (https://docs.stripe.com/rate-limits). Each process counting on its own would multiply that by
the number of workers, so the budget lives in Redis and every request first takes a slot there.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket without a refill job) run in
one Lua script, with no burst allowance: per bucket, consecutive grants are at least ``1/rate`` apart,
so any one-second window holds at most ``rate`` of them (plus one, where a window's two edges both land
on a grant). A request is granted only when *both* its endpoint bucket and the global bucket are free
at that instant, and then both advance atomically; otherwise the script says how long until they
will be, and the caller sleeps that long and asks again. Slots are not reserved ahead: a reservation
for a busy endpoint would hold a global slot that requests to idle endpoints could have used. Times
come from Redis (``TIME``), the one clock every machine shares.

If no slot comes within ``max_wait``, :class:`RateLimitTimeout` (a
:class:`~billing.outcomes.TemporaryStripeError`) is raised: the request was not sent, and the caller
retries it later with the same idempotency key like any other temporary error.

If Redis itself is unreachable the limiter lets the request through (and logs it): without Redis the
workers receive no tasks anyway, and a Stripe 429 is itself handled as a temporary error.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Mapping

import redis

from billing.outcomes import TemporaryStripeError
from billing.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT = 30.0
# One hash tag, so the keys one request touches share a Redis Cluster slot as a multi-key script needs.
KEY_PREFIX = "billing:ratelimit:{stripe}:"

# KEYS: bucket keys (global first). ARGV: one emission interval (µs) per key. Each key holds its
# bucket's TAT (theoretical arrival time, µs since the epoch): the earliest instant its next request
# may go. Returns 0 when granted, else the µs until every bucket is free.
_TRY_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat - now > wait then wait = tat - now end
end
if wait > 0 then
  return wait
end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  redis.call('SET', key, string.format('%.0f', now + interval), 'PX', math.ceil(interval / 1000) + 1000)
end
return 0
"""


class RateLimitTimeout(TemporaryStripeError):
    """No slot within ``max_wait``: the request was not sent; send it later with the same key."""


def endpoint_key(endpoint: str) -> str:
    return KEY_PREFIX + "endpoint:" + endpoint


GLOBAL_KEY = KEY_PREFIX + "global"


class RedisRateLimiter:
    """``acquire(endpoint)`` blocks until both the global and the endpoint's bucket grant a request.

    ``endpoint`` names a Stripe endpoint with object ids replaced, e.g. ``"POST /v1/payment_intents"``
    or ``"POST /v1/payment_intents/:id/confirm"`` (see :func:`endpoint_for`). ``endpoint_rates``
    overrides the per-endpoint default for the few endpoints Stripe limits differently.
    """

    def __init__(self, client: redis.Redis, *, global_rate: float, endpoint_rate: float,
                 endpoint_rates: Mapping[str, float] | None = None, max_wait: float = DEFAULT_MAX_WAIT,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if global_rate <= 0 or endpoint_rate <= 0:
            raise ValueError("rates must be positive")
        self._client = client
        self._script = client.register_script(_TRY_ACQUIRE)
        self.global_rate = global_rate
        self.endpoint_rate = endpoint_rate
        self.endpoint_rates = dict(endpoint_rates or {})
        self.max_wait = max_wait
        self._sleep = sleep
        self._clock = clock

    def rate_for(self, endpoint: str) -> float:
        return self.endpoint_rates.get(endpoint, self.endpoint_rate)

    def try_acquire(self, endpoint: str) -> float:
        """0.0 if a request may go now (and it is counted), else the seconds until one may."""
        intervals = [round(1e6 / self.global_rate), round(1e6 / self.rate_for(endpoint))]
        wait_us = self._script(keys=[GLOBAL_KEY, endpoint_key(endpoint)], args=intervals)
        return int(wait_us) / 1e6

    def acquire(self, endpoint: str, max_wait: float | None = None) -> float:
        """Block until a request to ``endpoint`` may go; returns the seconds waited."""
        max_wait = self.max_wait if max_wait is None else max_wait
        started = self._clock()
        slept = False
        while True:
            try:
                wait = self.try_acquire(endpoint)
            except redis.RedisError as exc:
                log.warning("rate limiter unavailable, sending without it",
                            extra={"endpoint": endpoint, "error": type(exc).__name__})
                return self._clock() - started if slept else 0.0
            waited = self._clock() - started
            if wait == 0:
                return waited if slept else 0.0
            if waited + wait > max_wait:
                raise RateLimitTimeout(f"no Stripe request slot for {endpoint} within {max_wait:g}s")
            # Waiters woken for the same slot race for it; a little jitter spreads the losers' retries.
            self._sleep(wait + random.uniform(0, 0.002))
            slept = True


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
        client = redis_client_for(resolve_broker_url(settings))
    return RedisRateLimiter(client, global_rate=settings.stripe_rate_limit_global,
                            endpoint_rate=settings.stripe_rate_limit_endpoint)


def resolve_broker_url(settings: Settings) -> str:
    """The configured Redis, else the embedded one under the data dir (started on first use)."""
    if settings.broker_url:
        return settings.broker_url
    from billing import embedded

    return embedded.broker_url(settings.data_dir)


@functools.cache
def redis_client_for(url: str) -> redis.Redis:
    # Short timeouts: a slow Redis must not hold a Stripe call hostage (acquire lets it through).
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
