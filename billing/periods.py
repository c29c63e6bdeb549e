"""Billing periods: pure date arithmetic.

Period ``k`` of a subscription starts at ``anchor + k × (interval_count × interval)``, computed
from the anchor every time rather than by adding to the previous period, so a subscription
anchored on the 31st is charged on Feb 28 (29 in leap years) and on Mar 31 again, never drifting
to the 28th for good. All times are timezone-aware UTC.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta

from billing.models import Interval


def _add_months(anchor: datetime, months: int) -> datetime:
    total = anchor.month - 1 + months
    year, month = anchor.year + total // 12, total % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_start(anchor: datetime, interval: str, interval_count: int, index: int) -> datetime:
    steps = index * interval_count
    match Interval(interval):
        case Interval.day:
            return anchor + timedelta(days=steps)
        case Interval.week:
            return anchor + timedelta(weeks=steps)
        case Interval.month:
            return _add_months(anchor, steps)
        case Interval.year:
            return _add_months(anchor, 12 * steps)


def period_bounds(anchor: datetime, interval: str, interval_count: int, index: int) -> tuple[datetime, datetime]:
    return (period_start(anchor, interval, interval_count, index),
            period_start(anchor, interval, interval_count, index + 1))
