"""The shared Stripe request budget, against a real Redis: separate processes (as separate machines
would), each with its own limiter and threads, never exceed the global or a per-endpoint rate in any
one-second window, and together still use most of the budget."""

from __future__ import annotations

import multiprocessing
import threading
import time
from bisect import bisect_left

import pytest
import redis

from billing.outcomes import TemporaryStripeError
from billing.ratelimit import RateLimitTimeout, RedisRateLimiter, endpoint_for, limiter_from_settings

GLOBAL_RATE = 40.0
ENDPOINT_RATE = 15.0
ENDPOINTS = ("POST /v1/payment_intents", "POST /v1/payment_intents/:id/confirm", "GET /v1/payment_intents/:id")
DURATION = 3.0


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open window [t, t + window) that starts at an event."""
    times = sorted(times)
    return max((bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def _hammer(redis_url: str, proc_no: int, threads: int, go, start_at, out) -> None:
    client = redis.Redis.from_url(redis_url)
    limiter = RedisRateLimiter(client, global_rate=GLOBAL_RATE, endpoint_rate=ENDPOINT_RATE, max_wait=30)
    grants: list[tuple[float, str, float]] = []
    lock = threading.Lock()

    def run(thread_no: int) -> None:
        endpoint = ENDPOINTS[(proc_no + thread_no) % len(ENDPOINTS)]
        while time.time() < start_at + DURATION:
            waited = limiter.acquire(endpoint)
            with lock:
                grants.append((time.time(), endpoint, waited))

    out.put("ready")
    go.wait()
    start_at = start_at.value
    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(grants)


def test_many_processes_stay_within_global_and_endpoint_rates(redis_url, redis_client):
    ctx = multiprocessing.get_context("spawn")
    out, go, start = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_hammer, args=(redis_url, n, 4, go, start, out)) for n in range(4)]
    for p in procs:
        p.start()
    for _ in procs:  # every process hammers from the same instant, once all have started
        assert out.get(timeout=60) == "ready"
    start.value = start_at = time.time()
    go.set()
    grants = [g for _ in procs for g in out.get(timeout=60)]
    for p in procs:
        p.join(10)

    times = [t for t, _, _ in grants]
    # Allowed: the rate, plus one where both edges of a window land on a slot, plus one for the jitter
    # between a slot starting and this test reading the clock on a busy two-core box.
    assert max_in_any_window(times) <= GLOBAL_RATE + 2
    by_endpoint = {e: [t for t, ep, _ in grants if ep == e] for e in ENDPOINTS}
    for endpoint, ts in by_endpoint.items():
        assert max_in_any_window(ts) <= ENDPOINT_RATE + 2, endpoint
    # The global budget (40/s) is below the endpoints' sum (45/s), so it is the one that binds — and
    # it is used, not wasted: the limiter throttles, it does not starve.
    first, last = min(times) - start_at, max(times) - start_at
    assert len(grants) >= 0.8 * GLOBAL_RATE * DURATION, (len(grants), first, last)
    assert any(w > 0 for _, _, w in grants)


def test_endpoint_limit_binds_when_below_global(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=1000, endpoint_rate=10, max_wait=5)
    granted: list[float] = []
    deadline = time.time() + 2.0

    def run() -> None:
        while time.time() < deadline:
            limiter.acquire("POST /v1/customers")
            granted.append(time.time())

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max_in_any_window(granted) <= 10 + 2
    assert len(granted) >= 0.8 * 10 * 2


def test_grants_are_spaced_and_global_is_shared_across_endpoints(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=10, endpoint_rate=5, max_wait=10)
    assert limiter.try_acquire("GET /v1/a") == 0
    assert limiter.try_acquire("GET /v1/b") == pytest.approx(0.1, abs=0.02)  # global: 1/10 s apart
    time.sleep(0.11)
    assert limiter.try_acquire("GET /v1/b") == 0
    assert limiter.try_acquire("GET /v1/a") == pytest.approx(0.09, abs=0.02)  # endpoint a: 1/5 s apart
    waited = limiter.acquire("GET /v1/a")
    assert 0.05 < waited < 0.3


def test_no_slot_within_max_wait_is_a_temporary_error_and_takes_nothing(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=100, endpoint_rate=1, max_wait=0.3)
    assert limiter.acquire("POST /v1/setup_intents") == 0
    with pytest.raises(RateLimitTimeout) as err:
        limiter.acquire("POST /v1/setup_intents")
    assert isinstance(err.value, TemporaryStripeError)
    # The refused request took no slot: the next is still one second after the first.
    assert limiter.try_acquire("POST /v1/setup_intents") == pytest.approx(1.0, abs=0.05)


def test_per_endpoint_overrides(redis_client):
    limiter = RedisRateLimiter(redis_client, global_rate=100, endpoint_rate=25,
                               endpoint_rates={"GET /v1/customers/search": 1})
    assert limiter.try_acquire("GET /v1/customers/search") == 0
    assert limiter.try_acquire("GET /v1/customers/search") == pytest.approx(1.0, abs=0.02)
    time.sleep(0.02)
    assert limiter.try_acquire("GET /v1/customers") == 0


def test_redis_down_lets_requests_through():
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    limiter = RedisRateLimiter(dead, global_rate=1, endpoint_rate=1)
    assert limiter.acquire("POST /v1/payment_intents") == 0.0


def test_built_from_settings(redis_client):
    from billing.settings import Settings

    limiter = limiter_from_settings(Settings(stripe_rate_limit_global=25, stripe_rate_limit_endpoint=5),
                                    client=redis_client)
    assert (limiter.global_rate, limiter.endpoint_rate) == (25, 5)


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("post", "/v1/payment_intents", "POST /v1/payment_intents"),
    ("post", "/v1/payment_intents/pi_3Mtw/confirm", "POST /v1/payment_intents/:id/confirm"),
    ("get", "/v1/customers/search?query=x", "GET /v1/customers/search"),
    ("get", "/v1/customers/cus_1/payment_methods/pm_2", "GET /v1/customers/:id/payment_methods/:id"),
])
def test_endpoint_names(method, path, expected):
    assert endpoint_for(method, path) == expected
