"""Billing through the calendar with a frozen clock: month ends, a leap day, retry dates, yen.

The code under test reads the time itself here (no ``now=`` passed), so these runs see what a
worker would see on those days. Real worker processes are not started inside a freeze; the gateway
is the hand-written fake, the database the real one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from sqlalchemy import select

from billing import charging, reconciler
from billing.models import Charge, Subscription
from tests import factories
from tests.fakes import FakeGateway, declined


def subscribe(session_factory, *, anchor: datetime, amount: int = 1999, currency: str = "eur") -> int:
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, amount=amount, currency=currency, anchor_at=anchor,
                                          next_charge_at=anchor)
        s.commit()
        return sub.id


def run_and_charge(gateway) -> list[int]:
    ids = charging.run_due(enqueue=lambda _id: None).created
    for charge_id in ids:
        charging.process_charge(charge_id, gateway=gateway)
    return ids


def test_a_year_of_month_ends_through_a_leap_february(clean_db, session_factory):
    sub_id = subscribe(session_factory, anchor=datetime(2024, 1, 31, 9, 0, tzinfo=UTC))
    gw = FakeGateway()
    opened = []
    with freeze_time("2024-01-31 09:00:01") as frozen:
        for _ in range(13):
            opened += run_and_charge(gw)
            assert run_and_charge(gw) == []  # nothing more is due until the next period starts
            with session_factory() as s:
                next_at = s.get(Subscription, sub_id).next_charge_at
            frozen.move_to(next_at + timedelta(seconds=1))
    with session_factory() as s:
        starts = [c.period_start.date().isoformat() for c in s.scalars(select(Charge).order_by(Charge.period_index))]
    assert starts[:4] == ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]
    assert starts[-2:] == ["2024-12-31", "2025-01-31"]
    assert len(starts) == len(set(starts)) == 13 and gw.created() == 13


def test_retry_dates_follow_the_clock_and_the_horizon(clean_db, session_factory):
    subscribe(session_factory, anchor=datetime(2028, 2, 28, 23, 30, tzinfo=UTC), amount=1500, currency="jpy")
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds", "try_again_later"))
    with freeze_time("2028-02-28 23:30:05") as frozen:
        [charge_id] = run_and_charge(gw)
        with session_factory() as s:
            charge = s.get(Charge, charge_id)
            first_retry = charge.next_retry_at
            assert charge.status == "requires_payment_method" and (charge.amount, charge.currency) == (1500, "jpy")
        # Retries come due one by one as the clock reaches them (across the leap day), never early.
        retries = 0
        while True:
            with session_factory() as s:
                charge = s.get(Charge, charge_id)
            if charge.status != "requires_payment_method" or charge.next_retry_at is None:
                break
            frozen.move_to(charge.next_retry_at - timedelta(seconds=1))
            assert charging.retry_due(enqueue=lambda _id: None) == []
            frozen.tick(timedelta(seconds=2))
            assert charging.retry_due(enqueue=lambda _id: None) == [charge_id]
            charging.process_charge(charge_id, gateway=gw)
            retries += 1
        assert first_retry == datetime(2028, 2, 29, 3, 30, 5, tzinfo=UTC)  # four hours: try again later
        assert charge.status == "uncollectible"
        assert retries <= 8 and datetime.now(UTC) < datetime(2028, 2, 28, 23, 30, 5, tzinfo=UTC) + timedelta(days=14)
        assert reconciler.give_up_overdue(now=datetime.now(UTC)) == []  # already given up, once
    assert gw.created() == 1  # every retry re-confirmed the period's one PaymentIntent
