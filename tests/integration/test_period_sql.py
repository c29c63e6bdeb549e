"""The billing run computes period bounds in SQL (billing.opening); they must be exactly
billing.periods' bounds, for any anchor, interval, count and period, whatever the session's time zone.

Hypothesis draws batches of cases (anchors on any instant, with month ends and Feb 29 drawn often) and
each batch is evaluated in one query; the session time zone is set to zones with odd offsets and DST,
since the SQL must work on UTC wall-clock time as Python does."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from billing.models import Interval
from billing.opening import period_start_sql
from billing.periods import period_bounds

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Pacific/Chatham", "Asia/Kolkata", "Australia/Lord_Howe"]

# Month ends and leap days are where clamping happens: draw them on purpose, at any time of day.
month_ends = st.builds(
    lambda y, md, h, mi, s, us: datetime(y, *md, h, mi, s, us, tzinfo=UTC),
    st.integers(1990, 2100), st.sampled_from([(1, 31), (1, 30), (1, 29), (3, 31), (5, 31), (8, 31), (10, 31),
                                              (12, 31), (4, 30), (2, 28)]),
    st.integers(0, 23), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999_999))
leap_days = st.builds(lambda y, h, us: datetime(y, 2, 29, h, 0, 0, us, tzinfo=UTC),
                      st.sampled_from([1992, 2000, 2024, 2028, 2096]), st.integers(0, 23), st.integers(0, 999_999))
anywhen = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2150, 12, 31), timezones=st.just(UTC))
YEARS_PER_STEP = {"day": 1 / 365, "week": 7 / 365, "month": 1 / 12, "year": 1}
# Both bounds within Python's datetime (year 9999); past it, billing.periods raises and the run logs it.
cases = st.tuples(st.one_of(month_ends, leap_days, anywhen), st.sampled_from([i.value for i in Interval]),
                  st.integers(1, 24), st.integers(0, 400)).filter(
    lambda c: c[0].year + (c[3] + 1) * c[2] * YEARS_PER_STEP[c[1]] < 9990)


def sql_bounds(session, zone: str, batch: list[tuple[datetime, str, int, int]]) -> list[tuple[datetime, datetime]]:
    session.execute(text("SELECT set_config('TimeZone', :zone, true)"), {"zone": zone})
    rows = session.execute(text(f"""
        SELECT {period_start_sql("f.k")}, {period_start_sql("f.k + 1")}
        FROM unnest(CAST(:anchors AS timestamptz[]), CAST(:intervals AS text[]), CAST(:counts AS int[]),
                    CAST(:ks AS int[])) WITH ORDINALITY AS f(anchor_at, "interval", interval_count, k, n)
        ORDER BY f.n"""), {"anchors": [c[0] for c in batch], "intervals": [c[1] for c in batch],
                            "counts": [c[2] for c in batch], "ks": [c[3] for c in batch]}).all()
    return [tuple(row) for row in rows]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(cases, min_size=1, max_size=40), zone=st.sampled_from(ZONES))
@example(batch=[(datetime(2026, 1, 31, 9, 30, tzinfo=UTC), "month", 1, k) for k in range(14)], zone="Europe/Paris")
@example(batch=[(datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC), "year", 1, k) for k in range(9)],
         zone="America/New_York")
@example(batch=[(datetime(2025, 3, 30, 0, 30, tzinfo=UTC), i.value, 1, k) for i in Interval for k in range(3)],
         zone="Europe/Paris")  # a DST change in Paris: UTC periods do not notice it
def test_sql_period_bounds_are_python_period_bounds(session_factory, batch, zone):
    with session_factory() as s:
        got = sql_bounds(s, zone, batch)
    want = [period_bounds(anchor, interval, count, k) for anchor, interval, count, k in batch]
    assert got == want


def test_a_31st_anchor_clamps_then_returns(session_factory):
    with session_factory() as s:
        got = sql_bounds(s, "UTC", [(datetime(2027, 12, 31, tzinfo=UTC), "month", 1, k) for k in range(4)])
    assert [start.date().isoformat() for start, _ in got] == ["2027-12-31", "2028-01-31", "2028-02-29",
                                                              "2028-03-31"]
