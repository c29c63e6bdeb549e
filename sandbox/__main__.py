"""``python -m sandbox [--port P] …``: same flags as ``billing sandbox``."""

from __future__ import annotations

import argparse
import os

from sandbox.server import main


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sandbox", description="Local Stripe sandbox")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=12111)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-median-ms", type=float, default=0.0)
    p.add_argument("--latency-p99-ms", type=float, default=None)
    p.add_argument("--rate-global", type=float, default=100.0, help="requests/s, 0 lifts the limit")
    p.add_argument("--rate-endpoint", type=float, default=25.0, help="requests/s per endpoint, 0 lifts it")
    p.add_argument("--webhook-url", action="append", default=[],
                   help="repeatable; also SANDBOX_WEBHOOK_URL (comma-separated)")
    p.add_argument("--webhook-secret", default=os.environ.get("SANDBOX_WEBHOOK_SECRET"))
    a = p.parse_args(argv)
    urls = a.webhook_url or [u for u in os.environ.get("SANDBOX_WEBHOOK_URL", "").split(",") if u]
    if urls and not a.webhook_secret:
        p.error("--webhook-url needs --webhook-secret (or SANDBOX_WEBHOOK_SECRET)")
    main(host=a.host, port=a.port, seed=a.seed, latency_median_ms=a.latency_median_ms,
         latency_p99_ms=a.latency_p99_ms, rate_global=a.rate_global or None,
         rate_endpoint=a.rate_endpoint or None, webhook_endpoints=[(u, a.webhook_secret) for u in urls])


if __name__ == "__main__":
    cli()
