"""The limiter books slots ahead (billing.ratelimit), against a real Redis: one call per request however
long it waits, one sleep of exactly the booked wait, slots back to back, and an idle endpoint served
in the global budget's first gap rather than behind a busy endpoint's queue."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis

from billing.ratelimit import GLOBAL_KEY, RateLimitTimeout, RedisRateLimiter


class CountingRedis(redis.Redis):
    """Counts the commands this client sends (round trips; what a script runs inside Redis is not one)."""

    calls = itertools.count()

    def execute_command(self, *args, **options):
        next(self.calls)
        return super().execute_command(*args, **options)


@pytest.fixture
def counting_client(redis_url, redis_client):
    client = CountingRedis.from_url(redis_url)
    client.calls = itertools.count()
    yield client
    client.close()


def booked(redis_client) -> list[int]:
    return [int(score) for _, score in redis_client.zrange(GLOBAL_KEY, 0, -1, withscores=True)]


def test_a_throttled_request_costs_one_redis_call_and_one_exact_sleep(counting_client):
    sleeps: list[float] = []
    limiter = RedisRateLimiter(counting_client, global_rate=100, endpoint_rate=2, sleep=sleeps.append)
    waits = [limiter.try_acquire("POST /v1/payment_intents")]  # takes the slot that is free now
    for _ in range(5):
        limiter.acquire("POST /v1/payment_intents")
    # Slots 0.5 s apart, booked without waiting: each acquire slept once, for exactly its slot.
    assert sleeps == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5], abs=0.05)
    assert waits == [0.0]
    # One script call per request (plus loading the script into Redis once).
    assert next(counting_client.calls) <= 6 + 2


def test_throttled_slots_are_booked_back_to_back(redis_client):
    # Eight threads booking as fast as they can (sleep is a no-op, so every booking is ahead of now).
    limiter = RedisRateLimiter(redis_client, global_rate=100, endpoint_rate=20, max_wait=60, sleep=lambda _s: None)

    def book() -> None:
        for _ in range(5):
            limiter.acquire("POST /v1/payment_intents")

    threads = [threading.Thread(target=book) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots = booked(redis_client)
    # Forty slots (the first, booked for right then, may be pruned already), each 1/20 s after the last to
    # the microsecond: while requests wait, the budget is never left idle (nothing is lost to wake-ups or
    # round trips) and never exceeded.
    assert len(slots) >= 39
    assert {b - a for a, b in itertools.pairwise(slots)} == {50_000}


def test_an_idle_endpoint_takes_the_first_global_gap_not_a_place_behind_a_busy_endpoint(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=10, endpoint_rate=2, max_wait=60,
                               sleep=lambda _s: None)
    for _ in range(4):  # a busy endpoint: slots now, +0.5, +1.0, +1.5 s
        limiter.acquire("POST /v1/payment_intents")
    started = time.monotonic()
    limiter.acquire("GET /v1/customers/:id")
    limiter.acquire("POST /v1/refunds")
    assert time.monotonic() - started < 0.05  # (the waits were booked, not slept: sleep is a no-op here)
    slots = booked(redis_client)
    first = slots[0]
    offsets = sorted(round((s - first) / 1000) for s in slots)  # ms after the first slot
    # The two idle endpoints went into the gaps 0.1 and 0.2 s in, not after the busy one's last slot.
    assert offsets == [0, 100, 200, 500, 1000, 1500]


def test_a_slot_beyond_max_wait_is_not_booked(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=100, endpoint_rate=1, max_wait=0.5,
                               sleep=lambda _s: None)
    limiter.acquire("POST /v1/setup_intents")
    with pytest.raises(RateLimitTimeout):
        limiter.acquire("POST /v1/setup_intents")
    assert len(booked(redis_client)) == 1  # the refused request took nothing
    limiter.acquire("POST /v1/setup_intents", max_wait=5)  # a caller willing to wait 5 s gets the slot 1 s out
    assert len(booked(redis_client)) == 2
