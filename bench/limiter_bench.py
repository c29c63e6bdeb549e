"""The shared Stripe request budget under load: how much of it is used, and what it costs in Redis.

Worker processes (separate interpreters, as separate machines would be) each run threads that do
what a charge does: take a slot for ``POST /v1/payment_intents`` from the limiter, then wait out a
Stripe call (lognormal latency, 300 ms median, 900 ms p99). Demand is several times the budget, so the
limiter is throttling the whole time. Each process counts the commands its Redis client sends (one
per round trip; what a Lua script runs inside Redis is not a call).

Prints, each as a ratio to its goal:

* budget use: grants per second in the steady part of the run as a share of the configured rate
  (goal ≥ 0.99);
* Redis calls per grant while throttled (goal ≤ 2);
* the most grants in any one-second window (never above the rate, plus one where a window's two
  edges both land on a grant, plus scheduling jitter).

    python bench/limiter_bench.py [--processes 2] [--threads 16] [--rate 25] [--seconds 12] [--busy 0]

An embedded Redis under a temporary directory is started and stopped.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENDPOINT = "POST /v1/payment_intents"
BUDGET_GOAL = 0.99
CALLS_GOAL = 2.0
WARMUP_S = 2.0


def _latency(median: float) -> float:
    # lognormal with the given median and p99 = 3 × median (z(0.99) ≈ 2.326)
    return random.lognormvariate(math.log(median), math.log(3) / 2.326)


def _worker(redis_url: str, threads: int, rate: float, global_rate: float, latency: float, go, stop_at, out) -> None:
    import itertools

    import redis

    from billing.ratelimit import RedisRateLimiter

    calls = itertools.count()  # next() on it is atomic under the GIL

    class CountingRedis(redis.Redis):
        def execute_command(self, *args, **options):
            next(calls)
            return super().execute_command(*args, **options)

    limiter = RedisRateLimiter(CountingRedis.from_url(redis_url), global_rate=global_rate, endpoint_rate=rate,
                               max_wait=60)
    grants: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        while time.time() < stop_at.value:
            limiter.acquire(ENDPOINT)
            with lock:
                grants.append(time.time())
            time.sleep(_latency(latency))

    out.put("ready")
    go.wait()
    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((grants, next(calls)))


def _burn(stop_at) -> None:
    while time.time() < stop_at.value:
        sum(i * i for i in range(10_000))


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max((bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rate", type=float, default=25.0, help="the endpoint's budget, requests/s")
    parser.add_argument("--global-rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--busy", type=int, default=0, help="CPU-burning processes beside the workers")
    args = parser.parse_args()

    import redis

    from billing import embedded

    with tempfile.TemporaryDirectory(prefix="billing-limiter-") as tmp:
        data = Path(tmp)
        redis_url = embedded.broker_url(data)
        try:
            client = redis.Redis.from_url(redis_url)
            client.flushdb()
            ctx = multiprocessing.get_context("spawn")
            out, go, stop_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
            procs = [ctx.Process(target=_worker, args=(redis_url, args.threads, args.rate, args.global_rate,
                                                       args.latency_ms / 1000, go, stop_at, out))
                     for _ in range(args.processes)]
            for p in procs:
                p.start()
            for _ in procs:
                assert out.get(timeout=120) == "ready"
            burners = [ctx.Process(target=_burn, args=(stop_at,)) for _ in range(args.busy)]
            start = time.time()
            stop_at.value = start + args.seconds
            for b in burners:
                b.start()
            go.set()
            results = [out.get(timeout=args.seconds + 120) for _ in procs]
            grants = sorted(g for process_grants, _ in results for g in process_grants)
            calls = sum(n for _, n in results)
            for p in procs + burners:
                p.join(30)
        finally:
            embedded.stop(data)

    steady = [t for t in grants if start + WARMUP_S <= t < start + args.seconds]
    steady_rate = len(steady) / (args.seconds - WARMUP_S)
    use = steady_rate / args.rate
    per_grant = calls / max(1, len(grants))
    demand = args.processes * args.threads / (args.latency_ms / 1000)
    print(f"limiter under load:      {args.processes} process(es) × {args.threads} threads, {args.latency_ms:.0f} ms "
          f"median call, demand ≈ {demand:.0f}/s against {args.rate:g}/s" + (f", {args.busy} CPU burner(s)"
                                                                              if args.busy else ""))
    print(f"  budget use:            {steady_rate:.2f} grants/s = {use:.3f} of the configured {args.rate:g}/s  "
          f"({use / BUDGET_GOAL:.3f}× the ≥ {BUDGET_GOAL} goal; ≥ 1 meets it)")
    print(f"  Redis calls per grant: {per_grant:.2f} while throttled ({calls} calls, {len(grants)} grants)  "
          f"({CALLS_GOAL / per_grant:.2f}× the ≤ {CALLS_GOAL:g} goal; ≥ 1 meets it)")
    print(f"  most in any 1 s:       {max_in_any_window(grants)} (rate {args.rate:g})")


if __name__ == "__main__":
    main()
