"""One Stripe request budget shared by every worker thread, process and machine, kept in Redis.

Stripe allows 100 requests/s per account in live mode (25 in sandboxes) and 25/s per endpoint by
default (https://docs.stripe.com/rate-limits). Each process counting on its own would multiply that by
the number of workers, so the budget lives in Redis and every request first takes a slot there.

A request *reserves* its slot: one Lua script call finds the earliest instant at which both its
endpoint's budget and the global budget have room, books it, and returns how long until then; the
caller sleeps exactly that long and sends. So a request costs one Redis call however long it waits,
no waiter polls, and no waiter wakes to find its slot taken: back-to-back reservations keep the
budget busy to the microsecond, where asking again after each wait lost the wake-up and round trip
on every grant (and woke every waiting thread at once). A burst allowance would only paper over that
loss; with reservations the budget is used in full without one, and no one-second window ever holds
more booked slots than the rate (plus one, where a window's two edges both land on a slot). A thread
the operating system wakes late sends late, a few ms closer to the next slot; Stripe's limiter is a
token bucket (https://stripe.com/blog/rate-limiters), as the sandbox's is, which refills meanwhile.

* Each endpoint is a GCRA bucket (the generic cell rate algorithm, a token bucket without a refill
  job): its key holds the TAT, the earliest instant its next request may go; slots are handed out in
  order, ``1/rate`` apart.
* The global budget is a calendar of booked instants (a sorted set): a request takes the first
  instant, at or after its endpoint's, that is ``1/global rate`` clear of every booked one. A
  request for an idle endpoint therefore goes into the first free gap, not behind the queue of a busy
  endpoint, whose far-off reservations would otherwise hold global slots it could have used.

Times come from Redis (``TIME``), the one clock every machine shares; sleeping is local, but both run
at the same rate. A slot further off than ``max_wait`` is not booked: :class:`RateLimitTimeout` (a
:class:`~billing.outcomes.TemporaryStripeError`) says the request was not sent, and the caller retries
it later with the same idempotency key like any other temporary error.

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
# One hash tag, so the keys one request touches share a Redis Cluster slot as a multi-key script needs.
KEY_PREFIX = "billing:ratelimit:{stripe}:"

# KEYS: the global calendar (sorted set of booked instants), the endpoint's TAT. ARGV: global and
# endpoint emission intervals (µs), the longest wait worth booking (µs), 1 to book a future slot or 0
# to take only one free right now. Times are µs since the epoch: exact in Lua's doubles, and formatted
# with %.0f wherever they become strings (Lua's own conversion keeps 14 digits of the 16). Returns
# {1, µs until the booked slot} when booked, {0, µs until the first free slot} when not.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local global_interval, endpoint_interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_wait, book_ahead = tonumber(ARGV[3]), ARGV[4] == '1'
local at = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0'))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - global_interval))
for _, booked in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%.0f', at - global_interval), '+inf')) do
  booked = tonumber(booked)
  if booked >= at + global_interval then break end
  at = booked + global_interval
end
local wait = at - now
if (wait > 0 and not book_ahead) or wait > max_wait then
  return {0, wait}
end
local slot = string.format('%.0f', at)
redis.call('ZADD', KEYS[1], slot, slot)
redis.call('PEXPIRE', KEYS[1], math.ceil((wait + global_interval) / 1000) + 1000)
redis.call('SET', KEYS[2], string.format('%.0f', at + endpoint_interval),
           'PX', math.ceil((wait + endpoint_interval) / 1000) + 1000)
return {1, wait}
"""


class RateLimitTimeout(TemporaryStripeError):
    """No slot within ``max_wait``: the request was not sent; send it later with the same key."""


def endpoint_key(endpoint: str) -> str:
    return KEY_PREFIX + "endpoint:" + endpoint


# A sorted set of booked instants (an earlier version kept a TAT string under "global": a new name,
# so processes of both versions during a rolling deploy never read each other's value as theirs).
GLOBAL_KEY = KEY_PREFIX + "global-slots"


class RedisRateLimiter:
    """``acquire(endpoint)`` blocks until both the global and the endpoint's budget grant a request.

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
        self._script = client.register_script(_RESERVE)
        self.global_rate = global_rate
        self.endpoint_rate = endpoint_rate
        self.endpoint_rates = dict(endpoint_rates or {})
        self.max_wait = max_wait
        self._sleep = sleep
        self._clock = clock

    def rate_for(self, endpoint: str) -> float:
        return self.endpoint_rates.get(endpoint, self.endpoint_rate)

    def _reserve(self, endpoint: str, *, max_wait: float, book_ahead: bool) -> tuple[bool, float]:
        args = [round(1e6 / self.global_rate), round(1e6 / self.rate_for(endpoint)), round(max_wait * 1e6),
                1 if book_ahead else 0]
        booked, wait_us = self._script(keys=[GLOBAL_KEY, endpoint_key(endpoint)], args=args)
        return bool(booked), int(wait_us) / 1e6

    def try_acquire(self, endpoint: str) -> float:
        """0.0 if a request may go now (and it is counted), else the seconds until one may (nothing
        is booked)."""
        booked, wait = self._reserve(endpoint, max_wait=0.0, book_ahead=False)
        return 0.0 if booked else wait

    def acquire(self, endpoint: str, max_wait: float | None = None) -> float:
        """Book the next slot for ``endpoint`` and sleep until it; returns the seconds waited."""
        max_wait = self.max_wait if max_wait is None else max_wait
        started = self._clock()
        try:
            booked, wait = self._reserve(endpoint, max_wait=max_wait, book_ahead=True)
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, sending without it",
                        extra={"endpoint": endpoint, "error": type(exc).__name__})
            return 0.0
        if not booked:
            raise RateLimitTimeout(f"no Stripe request slot for {endpoint} within {max_wait:g}s")
        if wait <= 0:
            return 0.0
        self._sleep(wait)
        return self._clock() - started


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
