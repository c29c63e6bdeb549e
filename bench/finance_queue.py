"""How fast the finance console pages the retry queue when it is long.

Inserts N unpaid charges (default 100,000) with ``generate_series`` (spread over 20,000 customers,
cards in ten countries, a dozen decline codes, every open status), starts a real ``billing web``,
signs in as a staff member over HTTP and times ``GET /finance/queue`` (the first page, 50 rows): the
first request, then the median of repeats, then a few filtered and sorted first pages and a deep page.

    python bench/finance_queue.py [--charges 100000] [--repeats 20]

Runs on an embedded PostgreSQL under a temporary directory, stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED_SQL = """
INSERT INTO customers (email, name, country, stripe_customer_id)
SELECT 'customer' || g || '@example.com', 'Customer ' || g,
       (ARRAY['DE','FR','GB','US','NL','ES','IT','SE','AT','PL'])[1 + g %% 10], 'cus_bench' || g
FROM generate_series(1, %(customers)s) g;

INSERT INTO payment_methods (customer_id, stripe_payment_method_id, brand, last4, country, saved_at,
                             previous_authorization)
SELECT c.id, 'pm_bench' || c.id, 'visa', '4242', c.country,
       CASE WHEN c.id %% 7 = 0 THEN timestamptz '2020-06-01' ELSE timestamptz '2024-06-01' END, c.id %% 7 = 0
FROM customers c;

UPDATE customers c SET default_payment_method_id = p.id FROM payment_methods p WHERE p.customer_id = c.id;

INSERT INTO subscriptions (customer_id, payment_method_id, amount, currency, interval, interval_count, anchor_at,
                           next_period_index, next_charge_at, status)
SELECT c.id, c.default_payment_method_id, 500 + (c.id * 37) %% 9500,
       (ARRAY['eur','usd','gbp'])[1 + c.id %% 3], 'month', 1, now() - interval '2 years', %(periods)s,
       now() + interval '20 days', 'past_due'
FROM customers c;

INSERT INTO charges (subscription_id, period_index, period_start, period_end, amount, currency, status, attempts,
                     last_error_code, last_decline_code, first_failed_at, next_retry_at, retry_paused, notified_at,
                     created_at, updated_at)
SELECT s.id, p, s.anchor_at + p * interval '1 month', s.anchor_at + (p + 1) * interval '1 month', s.amount,
       s.currency,
       (ARRAY['requires_payment_method','requires_payment_method','requires_payment_method',
              'authentication_required','uncollectible','pending','void'])[1 + (s.id + p) %% 7],
       1 + (s.id + p) %% 6,
       CASE WHEN (s.id + p) %% 7 = 3 THEN 'authentication_required' ELSE 'card_declined' END,
       CASE WHEN (s.id + p) %% 7 = 3 THEN NULL ELSE
         (ARRAY['insufficient_funds','do_not_honor','generic_decline','expired_card','lost_card',
                'try_again_later','card_velocity_exceeded','incorrect_cvc','stolen_card','processing_error',
                'fraudulent','invalid_account'])[1 + (s.id * 7 + p) %% 12] END,
       now() - ((s.id + p) %% 60) * interval '1 day',
       CASE WHEN (s.id + p) %% 7 < 3 THEN now() + ((s.id * 13 + p) %% 14000) * interval '1 minute' END,
       (s.id + p) %% 23 = 0,
       now() - ((s.id + p) %% 60) * interval '1 day' + interval '2 minutes',
       now() - ((s.id + p) %% 60) * interval '1 day', now()
FROM subscriptions s, generate_series(0, %(periods)s - 1) p
LIMIT %(charges)s;
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(client: httpx.Client, path: str, params: dict | None = None) -> float:
    started = time.perf_counter()
    r = client.get(path, params=params)
    elapsed = time.perf_counter() - started
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--charges", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from billing import embedded, migrate

    with tempfile.TemporaryDirectory(prefix="billing-finance-bench-") as tmp:
        data = Path(tmp)
        db_url = embedded.database_url(data, extra_options="-c fsync=off -c synchronous_commit=off")
        plain = db_url.replace("+psycopg", "")
        env = {**os.environ, "BILLING_DATABASE_URL": db_url, "BILLING_DATA_DIR": str(data),
               "BILLING_STRIPE_API_KEY": "sk_test_bench", "BILLING_SECRET_KEY": "bench" * 8,
               "BILLING_BROKER_URL": "redis://127.0.0.1:1/0", "PYTHONUNBUFFERED": "1"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("BILLING_")})
        web = None
        try:
            migrate.upgrade(db_url)
            periods = 5
            customers = -(-args.charges // periods)
            started = time.perf_counter()
            with psycopg.connect(plain, autocommit=True) as conn:
                for statement in SEED_SQL.split(";\n\n"):
                    conn.execute(statement, {"customers": customers, "periods": periods, "charges": args.charges})
                conn.execute("VACUUM ANALYZE")
                total = conn.execute("SELECT count(*) FROM charges WHERE status <> 'paid'").fetchone()[0]
            print(f"inserted {total:,} unpaid charges for {customers:,} customers "
                  f"in {time.perf_counter() - started:.1f}s", flush=True)

            from billing import staff

            staff.add_staff("bench@example.com", "bench-password-123", "viewer")
            port = free_port()
            web = subprocess.Popen([sys.executable, "-m", "billing.cli", "web", "--port", str(port)], env=env,
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/finance/login").status_code == 200:
                            break
                    if time.monotonic() > deadline or web.poll() is not None:
                        raise SystemExit("billing web did not start")
                    time.sleep(0.2)
                login = client.get("/finance/login")
                token = re.search(r'name="csrf_token" value="([^"]*)"', login.text).group(1)
                r = client.post("/finance/login", data={"email": "bench@example.com", "password": "bench-password-123",
                                                        "csrf_token": token, "next": "/finance/queue"})
                assert r.status_code == 303, r.text[:300]

                first = timed(client, "/finance/queue")
                repeats = [timed(client, "/finance/queue") for _ in range(args.repeats)]
                print(f"first page of the queue (50 of {total:,} rows), over HTTP: first request "
                      f"{first * 1000:.0f} ms, median of {args.repeats} {statistics.median(repeats) * 1000:.0f} ms, "
                      f"max {max(repeats) * 1000:.0f} ms")
                cases = {
                    "sorted by amount, largest first": {"sort": "amount", "direction": "desc"},
                    "status=authentication_required": {"status": "authentication_required"},
                    "decline_code=lost_card": {"decline_code": "lost_card"},
                    "country=DE, sorted by opened": {"country": "DE", "sort": "created"},
                    "last 7 days": {"date_from": time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))},
                    "page 500 (offset 24,950)": {"page": "500"},
                }
                for label, params in cases.items():
                    times = [timed(client, "/finance/queue", params) for _ in range(5)]
                    print(f"  {label}: median {statistics.median(times) * 1000:.0f} ms")
        finally:
            if web is not None and web.poll() is None:
                web.terminate()
                web.wait(15)
            embedded.stop(data)


if __name__ == "__main__":
    main()
