"""Rows for a billing run at scale, written by set-based SQL (one ``INSERT … SELECT generate_series``
per table), not the ORM: a million subscriptions in seconds. Used by the at-scale test and bench.

The mix a real book has: every ``due_every``-th subscription has a period that has started; among
those, some are on hold (``past_due``), canceled, or still have an open charge (one open period at a
time: those must not open another), and the calendar is mixed (day, week, month, year; one or two of
them a period). The rest are due in the future.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

CUSTOMERS = 1000


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def seed_subscriptions(database_url: str, *, total: int, due_every: int, now: datetime,
                       behind: bool = False) -> set[int]:
    """Insert ``total`` subscriptions (and their customers); return the ids a run at ``now`` must open.

    A due subscription is in its period 1 or 2 (``next_period_index``), started up to a day before
    ``now``; ``behind=True`` anchors it 400 days back instead, so once opened its next period is due
    too (one open period at a time is then all that stops a second one)."""
    with psycopg.connect(plain(database_url)) as conn, conn.cursor() as cur:
        first = cur.execute("SELECT coalesce(max(id), 0) FROM customers").fetchone()[0]
        cur.execute("INSERT INTO customers (email, name, country, stripe_customer_id) "
                    "SELECT 'scale' || g || '@example.com', 'Scale ' || g, 'FR', 'cus_scale' || g "
                    "FROM generate_series(%(first)s + 1, %(first)s + %(n)s) g", {"first": first, "n": CUSTOMERS})
        # g decides everything: due or not, interval, status. A due subscription is in its period 1 or
        # 2 (next_period_index), which started up to a day before now (or 400 days back, ``behind``).
        cur.execute("""
            INSERT INTO subscriptions (customer_id, amount, currency, interval, interval_count, anchor_at,
                                       next_period_index, next_charge_at, status)
            SELECT customer_id, amount, 'eur', iv, n, CASE WHEN due AND NOT %(behind)s THEN started - CASE iv
                       WHEN 'day' THEN make_interval(days => k * n) WHEN 'week' THEN make_interval(weeks => k * n)
                       WHEN 'month' THEN make_interval(months => k * n) ELSE make_interval(years => k * n) END
                   ELSE %(now)s - interval '400 days' - (g %% 31) * interval '1 day' END,
                   k, CASE WHEN due THEN started ELSE %(now)s + interval '1 hour' + (g %% 86400) * interval '1 min' END,
                   CASE WHEN due AND g %% 97 = 0 THEN 'past_due' WHEN due AND g %% 89 = 0 THEN 'canceled'
                        ELSE 'active' END
            FROM (SELECT g, %(first)s + 1 + g %% %(customers)s AS customer_id, 1000 + g %% 500 AS amount,
                         (ARRAY['month', 'month', 'month', 'year', 'week', 'day'])[1 + g %% 6] AS iv,
                         1 + g %% 2 AS n, 1 + g / 7 %% 2 AS k, g %% %(due_every)s = 0 AS due,
                         %(now)s - (g %% 86400) * interval '1 second' AS started
                  FROM generate_series(1, %(total)s) g) x""",
                    {"first": first, "customers": CUSTOMERS, "now": now, "due_every": due_every, "total": total,
                     "behind": behind})
        # A few due ones still have their previous period open: they must wait for it to be decided.
        cur.execute("""
            INSERT INTO charges (subscription_id, period_index, period_start, period_end, amount, currency, status,
                                 attempts)
            SELECT s.id, s.next_period_index - 1, s.anchor_at, s.next_charge_at, s.amount, s.currency,
                   (ARRAY['pending', 'processing', 'requires_payment_method', 'needs_review'])[1 + s.id %% 4], 0
            FROM subscriptions s
            WHERE s.next_charge_at <= %(now)s AND s.status = 'active' AND s.id %% 53 = 0""", {"now": now})
        # And some have their previous period settled, which does not hold the next one back.
        cur.execute("""
            INSERT INTO charges (subscription_id, period_index, period_start, period_end, amount, currency, status,
                                 attempts)
            SELECT s.id, s.next_period_index - 1, s.anchor_at, s.next_charge_at, s.amount, s.currency,
                   (ARRAY['paid', 'void', 'uncollectible'])[1 + s.id %% 3], 0
            FROM subscriptions s
            WHERE s.next_charge_at <= %(now)s AND s.status = 'active' AND s.id %% 53 <> 0 AND s.id %% 7 = 0""",
                    {"now": now})
        conn.commit()
        cur.execute("ANALYZE customers; ANALYZE subscriptions; ANALYZE charges")
        due = cur.execute("""
            SELECT s.id FROM subscriptions s
            WHERE s.status = 'active' AND s.next_charge_at <= %(now)s
              AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.subscription_id = s.id
                              AND c.status NOT IN ('paid', 'void', 'uncollectible'))""", {"now": now}).fetchall()
        conn.commit()
    return {row[0] for row in due}


def insert_enrolled_customer(cur, i: int, stripe_customer_id: str, stripe_pm_id: str,
                             fingerprint: str | None) -> tuple[int, int]:
    """One customer whose card is saved at Stripe (the benches' sandbox customers): the customer row,
    its card row, and the card as its default. Returns ``(customer_id, payment_method_id)``."""
    cid = cur.execute("INSERT INTO customers (email, name, country, stripe_customer_id) "
                      "VALUES (%s, %s, 'FR', %s) RETURNING id",
                      (f"bench{i}@example.com", f"Bench {i}", stripe_customer_id)).fetchone()[0]
    pmid = cur.execute("INSERT INTO payment_methods (customer_id, stripe_payment_method_id, brand, last4, "
                       "country, fingerprint, saved_at) VALUES (%s, %s, 'visa', '4242', 'US', %s, now()) "
                       "RETURNING id", (cid, stripe_pm_id, fingerprint)).fetchone()[0]
    cur.execute("UPDATE customers SET default_payment_method_id = %s WHERE id = %s", (pmid, cid))
    return cid, pmid
