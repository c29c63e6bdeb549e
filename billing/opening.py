"""Opening due periods, set-based: one SQL statement opens a whole batch of subscriptions.

The billing run (:func:`billing.charging.run_due`) first lists the subscriptions due when it starts
(:func:`due_ids`, a range of the partial index ``ix_subscriptions_due``, so a run with nothing due reads
little: the few rows due, and until autovacuum has been by, the old versions of the rows the last run
advanced; migration 0009 has subscriptions vacuumed early), then walks that list by id in batches (no
exclusion list, a constant number of parameters). Each batch is one statement (:data:`OPEN_BATCH`), a
CTE that

1. locks the batch's subscriptions that are still due, still ``active`` and still have no open charge
   (``FOR UPDATE SKIP LOCKED``: concurrent runs split the work instead of queueing on each other);
2. leaves any row another transaction changed after this statement's snapshot (see below);
3. computes each period's bounds in SQL, exactly as :func:`billing.periods.period_bounds` does;
4. inserts the charges ``ON CONFLICT (subscription_id, period_index) DO NOTHING`` — the unique
   constraint stays the backstop — and advances only the subscriptions whose charge it inserted;
5. returns, for every subscription it kept, the charge it opened (or none, on a conflict).

Step 2 closes a window ``SKIP LOCKED`` alone leaves open: if another run commits a subscription's
advance after this statement took its snapshot, ``FOR UPDATE`` hands back the *new* row version and
re-checks the plain conditions on it, but the ``NOT EXISTS`` open-charge check was answered from the
old snapshot and cannot see the charge that run just opened. The row's ``xmin`` (the transaction that
wrote the version) then differs from the version the snapshot sees, and the row is left to the next
run, which sees everything.

Period bounds: period ``k`` starts at ``anchor + k × interval_count × interval``, always from the
anchor. PostgreSQL's interval arithmetic clamps the day of month like ``billing.periods._add_months``
(Jan 31 + 1 month is Feb 28 or 29, + 2 months is Mar 31), and is done on UTC wall-clock time so the
session's time zone cannot shift it (https://www.postgresql.org/docs/current/functions-datetime.html).
A period ending past year 9999, which Python's ``datetime`` cannot hold, is NULL here and fails the
insert: the batch then goes row by row and that one subscription is logged, as in Python.
"""

from __future__ import annotations

from array import array
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from billing import state
from billing.models import Interval, SubscriptionStatus

# Word for word the predicate of the partial index ix_charges_open (billing.models.Charge), so the
# planner can use it: final statuses as literals, not parameters.
NO_OPEN_CHARGE = ("NOT EXISTS (SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status NOT IN ("
                  + ", ".join(f"'{status.value}'" for status in sorted(state.FINAL)) + "))")
_DUE = f"s.status = '{SubscriptionStatus.active.value}' AND s.next_charge_at <= :now AND {NO_OPEN_CHARGE}"

# Beyond what Python's datetime can represent (billing.periods would raise there).
_LAST_INSTANT = "'9999-12-31 23:59:59.999999+00'::timestamptz"


def period_start_sql(index: str) -> str:
    """SQL for the start of period ``index`` of the subscription row ``f`` (UTC, clamped like Python)."""
    steps = f"({index}) * f.interval_count"
    units = {Interval.day: "days", Interval.week: "weeks", Interval.month: "months", Interval.year: "years"}
    cases = " ".join(f"WHEN '{interval.value}' THEN make_interval({unit} => {steps})"
                     for interval, unit in units.items())
    return f"""((f.anchor_at AT TIME ZONE 'UTC') + CASE f."interval" {cases} END) AT TIME ZONE 'UTC'"""


DUE_IDS = text(f"SELECT s.id FROM subscriptions s WHERE {_DUE} ORDER BY s.id")

OPEN_BATCH = text(f"""
WITH locked AS MATERIALIZED (
    SELECT s.id, s.xmin AS version, s.anchor_at, s."interval", s.interval_count, s.next_period_index,
           s.amount, s.currency
    FROM subscriptions s
    WHERE s.id = ANY(:ids) AND {_DUE}
    ORDER BY s.id
    FOR UPDATE OF s SKIP LOCKED
), kept AS MATERIALIZED (
    SELECT f.id, f.next_period_index, f.amount, f.currency,
           {period_start_sql("f.next_period_index")} AS period_start,
           {period_start_sql("f.next_period_index + 1")} AS period_end
    FROM locked f JOIN subscriptions seen ON seen.id = f.id AND seen.xmin = f.version
), opened AS (
    INSERT INTO charges (subscription_id, period_index, period_start, period_end, amount, currency, status,
                         attempts)
    SELECT k.id, k.next_period_index, k.period_start,
           CASE WHEN k.period_end <= {_LAST_INSTANT} THEN k.period_end END, k.amount, k.currency, 'pending', 0
    FROM kept k ORDER BY k.id
    ON CONFLICT (subscription_id, period_index) DO NOTHING
    RETURNING id, subscription_id, period_index, period_start, period_end
), advanced AS (
    UPDATE subscriptions s
    SET next_period_index = o.period_index + 1, current_period_start = o.period_start,
        current_period_end = o.period_end, next_charge_at = o.period_end
    FROM opened o WHERE s.id = o.subscription_id
    RETURNING s.id
)
SELECT k.id AS subscription_id, o.id AS charge_id
FROM kept k LEFT JOIN opened o ON o.subscription_id = k.id
ORDER BY k.id
""")


def due_ids(session: Session, now: datetime) -> array:
    """Ids of the subscriptions due at ``now``, ascending: 8 bytes each, streamed from a server-side
    cursor so a run of any size holds no more than that."""
    ids = array("q")
    # A cursor is planned for its first rows by default (cursor_tuple_fraction 0.1): a walk of the whole
    # table by id. The run reads every row, and the partial index answers "nothing due" in a probe.
    session.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
    result = session.execute(DUE_IDS.execution_options(yield_per=10_000), {"now": now})
    for part in result.scalars().partitions():
        ids.extend(part)
    return ids


def open_batch(session: Session, ids: list[int], now: datetime) -> tuple[list[int], list[int]]:
    """Open the periods of ``ids`` still due, in one statement. Returns (charge ids opened, ids of
    subscriptions whose period already had a charge: not advanced, to be looked at)."""
    opened: list[int] = []
    conflicts: list[int] = []
    for subscription_id, charge_id in session.execute(OPEN_BATCH, {"ids": ids, "now": now}):
        if charge_id is None:
            conflicts.append(subscription_id)
        else:
            opened.append(charge_id)
    return opened, conflicts
