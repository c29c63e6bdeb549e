from datetime import UTC, datetime

import pytest

from billing.periods import period_bounds, period_start


def utc(*args):
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("anchor", "index", "expected"), [
    (utc(2024, 1, 31), 1, utc(2024, 2, 29)),   # leap year clamps to the 29th
    (utc(2025, 1, 31), 1, utc(2025, 2, 28)),
    (utc(2025, 1, 31), 2, utc(2025, 3, 31)),   # back to the 31st, no drift
    (utc(2025, 11, 30), 3, utc(2026, 2, 28)),  # across a year end
    (utc(2025, 12, 15, 9, 30), 1, utc(2026, 1, 15, 9, 30)),
])
def test_monthly_periods_clamp_to_month_end_without_drift(anchor, index, expected):
    assert period_start(anchor, "month", 1, index) == expected


def test_yearly_from_leap_day_falls_on_feb_28_then_back_to_29():
    anchor = utc(2024, 2, 29)
    assert period_start(anchor, "year", 1, 1) == utc(2025, 2, 28)
    assert period_start(anchor, "year", 1, 4) == utc(2028, 2, 29)


def test_interval_count_and_bounds():
    start, end = period_bounds(utc(2025, 1, 1), "week", 2, 1)
    assert (start, end) == (utc(2025, 1, 15), utc(2025, 1, 29))
    assert period_bounds(utc(2025, 1, 1), "day", 1, 0) == (utc(2025, 1, 1), utc(2025, 1, 2))


def test_unknown_interval_is_refused():
    with pytest.raises(ValueError):
        period_start(utc(2025, 1, 1), "fortnight", 1, 1)
