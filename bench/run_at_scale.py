"""The billing run at scale: 100,000 due subscriptions out of 1,000,000, opened and enqueued.

Rows are written by set-based SQL (:mod:`tests.scale`) into an embedded PostgreSQL; the run is
``billing.charging.run_due`` in this process with the product's own Celery enqueue, against an
embedded Redis that no worker drains, so every message it published is counted there afterwards
(``LLEN`` of the task queue). Then a second run, with nothing due, is timed.

Prints the seconds and periods opened per second, each as a ratio to its goal: 100,000 opened and
enqueued in ≤ 10 s, and the empty second run well under a second (≤ 1 s here).

    python bench/run_at_scale.py [--subscriptions 1000000] [--due-every 10]

Everything runs under a temporary directory and is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCAN_GOAL_S = 10.0
EMPTY_RUN_GOAL_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=1_000_000)
    parser.add_argument("--due-every", type=int, default=10, help="one subscription in N is due")
    args = parser.parse_args()

    import redis

    from billing import embedded, migrate
    from tests.scale import seed_subscriptions

    with tempfile.TemporaryDirectory(prefix="billing-scale-") as tmp:
        data = Path(tmp)
        db_url = embedded.database_url(data, extra_options="-c fsync=off -c synchronous_commit=off")
        redis_url = embedded.broker_url(data)
        try:
            migrate.upgrade(db_url)
            os.environ.update({"BILLING_DATABASE_URL": db_url, "BILLING_BROKER_URL": redis_url,
                               "BILLING_DATA_DIR": str(data), "BILLING_SECRET_KEY": "bench" * 8,
                               "BILLING_STRIPE_API_KEY": "sk_test_bench"})
            now = datetime.now(UTC)
            print(f"seeding {args.subscriptions:,} subscriptions, one in {args.due_every} due…", flush=True)
            started = time.monotonic()
            due = seed_subscriptions(db_url, total=args.subscriptions, due_every=args.due_every, now=now)
            print(f"  seeded in {time.monotonic() - started:.1f} s; {len(due):,} to open", flush=True)

            from billing import charging
            from workers.tasks import enqueue_charge

            queue = redis.Redis.from_url(redis_url)
            queue.flushdb()
            started = time.monotonic()
            report = charging.run_due(now=now, enqueue=enqueue_charge)
            scan = time.monotonic() - started
            messages, published = enqueued_charges(queue)
            started = time.monotonic()
            again = charging.run_due(now=now, enqueue=enqueue_charge)
            empty = time.monotonic() - started
        finally:
            embedded.stop(data)

    opened = len(report.created)
    wrong = len(set(report.created)) != opened or opened != len(due)
    print(f"run-due at scale:        {opened:,} opened (expected {len(due):,}{', MISMATCH' if wrong else ''}), "
          f"{published:,} enqueued in {messages:,} message(s), {len(report.failed_subscriptions)} failed")
    print(f"  scan:                  {scan:.2f} s, {opened / scan:,.0f} opened/s  "
          f"({SCAN_GOAL_S / scan:.2f}× the ≤ {SCAN_GOAL_S:g} s goal; ≥ 1 meets it)")
    print(f"  second run, none due:  {empty:.3f} s, {len(again.created)} opened  "
          f"({EMPTY_RUN_GOAL_S / empty:.2f}× the ≤ {EMPTY_RUN_GOAL_S:g} s goal; ≥ 1 meets it)")


def enqueued_charges(queue) -> tuple[int, int]:
    """(messages, charge ids they carry): a ``charge_attempt`` message carries one, a batch
    (``charge_attempts``, fanned out by a worker) its whole list."""
    messages = queue.lrange("billing", 0, -1)
    charges = 0
    for raw in messages:
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        charges += len(args[0]) if message["headers"]["task"].endswith(".charge_attempts") else 1
    return len(messages), charges


if __name__ == "__main__":
    main()
