"""How fast a billing run charges, against Stripe's own budget.

1,000 due subscriptions; the sandbox at 300 ms median latency with Stripe's limits (25 req/s per
endpoint, 100 req/s overall); real ``billing worker`` processes; ``billing run-due --wait`` timed from
start to the last charge decided. Prints charges/s and that rate as a fraction of the 25/s a single
endpoint (POST /v1/payment_intents) allows, the 429s the sandbox served, and the SQL statements one
charge costs (counted in-process over a sample of charges against the same sandbox).

    python bench/run_due_bench.py [--subscriptions 1000] [--workers 2] [--concurrency 16]

Everything runs on embedded servers under a temporary directory and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.scale import insert_enrolled_customer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--sample", type=int, default=50, help="charges run in-process to count SQL statements")
    args = parser.parse_args()

    from billing import embedded, migrate
    from sandbox.testing import SandboxServer

    with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp:
        data = Path(tmp)
        db_url = embedded.database_url(data, extra_options="-c fsync=off -c synchronous_commit=off")
        redis_url = embedded.broker_url(data)
        migrate.upgrade(db_url)
        sandbox = SandboxServer(rate_global=None, rate_endpoint=None).start()
        env = {**os.environ, "BILLING_DATABASE_URL": db_url, "BILLING_BROKER_URL": redis_url,
               "BILLING_DATA_DIR": str(data), "BILLING_STRIPE_API_KEY": sandbox.api_key,
               "BILLING_STRIPE_API_BASE": sandbox.url, "BILLING_SECRET_KEY": "bench" * 8,
               "BILLING_SMTP_URL": "smtp://127.0.0.1:1", "PYTHONUNBUFFERED": "1"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("BILLING_")})
        workers: list[subprocess.Popen] = []
        try:
            print(f"seeding {args.subscriptions} customers with saved cards (limits lifted while seeding)…",
                  flush=True)
            now = datetime.now(UTC)
            # The sample is due a day earlier, so a run "as of" then opens only the sample.
            seed(range(args.sample), now - timedelta(days=1), db_url)
            sql_per_charge = count_sql(now - timedelta(hours=12))
            seed(range(args.sample, args.sample + args.subscriptions), now - timedelta(minutes=1), db_url)

            sandbox.control.set_latency(args.latency_ms, args.latency_ms * 3)
            sandbox.control.set_rate_limits(100, 25)
            before = sandbox.control.requests()
            for i in range(args.workers):
                log = open(data / f"worker-{i}.log", "wb")
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "billing.cli", "worker", "--concurrency", str(args.concurrency)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            wait_ready(data, args.workers)

            print(f"run-due --wait: {args.subscriptions} charges, {args.workers} worker(s) × "
                  f"{args.concurrency} threads, {args.latency_ms:.0f} ms median latency…", flush=True)
            started = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "billing.cli", "run-due", "--wait"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            elapsed = time.monotonic() - started
            after = sandbox.control.requests()
            created = sorted(entry["created"] for entry in sandbox.control.ledger())[args.sample:]
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
            sandbox.stop()
            embedded.stop(data)

    charges = args.subscriptions
    served_429 = _count_429(after) - _count_429(before)
    rate = charges / elapsed
    print(out.strip())
    print(f"charges/s:               {rate:.1f}  ({rate / 25:.2f} of the 25/s PaymentIntent budget)")
    print(f"wall time:               {elapsed:.1f} s for {charges} charges (process start, opening the periods "
          "and the last answers included)")
    if len(created) > 1 and created[-1] > created[0]:
        steady = (len(created) - 1) / (created[-1] - created[0])
        print(f"steady rate at Stripe:   {steady:.1f} charges/s  ({steady / 25:.2f} of the budget; first to last "
              "successful charge in the sandbox's ledger)")
    print(f"429s served by Stripe:   {served_429}")
    print(f"SQL statements/charge:   {sql_per_charge:.1f}  (claim + apply, in-process sample of {args.sample})")


def _count_429(counters: dict) -> int:
    return int(counters.get("rate_limited", 0)) + int(counters.get("lock_timeouts", 0))


def seed(numbers: range, due: datetime, db_url: str) -> None:
    from billing.stripe_gateway import get_gateway

    gw = get_gateway()
    rows = []
    for i in numbers:
        cus = gw.create_customer(email=f"bench{i}@example.com", name=f"Bench {i}", idempotency_key=f"bench-cus-{i}")
        card = gw.attach_payment_method("pm_card_visa", cus)
        rows.append((i, cus, card.payment_method_id, card.fingerprint))
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn, conn.cursor() as cur:
        for i, cus, pm, fp in rows:
            cid, pmid = insert_enrolled_customer(cur, i, cus, pm, fp)
            cur.execute("INSERT INTO subscriptions (customer_id, payment_method_id, amount, currency, interval, "
                        "interval_count, anchor_at, next_period_index, next_charge_at, status) "
                        "VALUES (%s, %s, 1999, 'eur', 'month', 1, %s, 0, %s, 'active')", (cid, pmid, due, due))
        conn.commit()


def count_sql(as_of: datetime) -> float:
    """Open the sample's charges and run them in this process, counting statements sent to PostgreSQL
    (the run that opened them included, spread over the charges)."""
    from billing import charging
    from billing.db import get_engine

    statements = 0

    def count(*_args, **_kw):
        nonlocal statements
        statements += 1

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        ids = charging.run_due(now=as_of, enqueue=lambda _id: None).created
        for charge_id in ids:
            charging.process_charge(charge_id)
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    return statements / max(1, len(ids))


def wait_ready(data: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(" ready." in p.read_text(errors="replace") for p in data.glob("worker-*.log")) < n:
        if time.monotonic() > deadline:
            raise SystemExit("workers did not start")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
