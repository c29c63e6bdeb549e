"""Row factories for tests on the real database (warehouse ``tests/common/db/`` in miniature).

Each ``make_*`` adds one row with sensible defaults, applies keyword overrides, flushes (so ids and
server defaults exist) and returns the ORM object. The caller owns the transaction and commits.

- ``make_payment_method`` becomes the customer's default card unless ``default=False``.
- ``make_subscription`` charges the customer's default card unless ``payment_method_id`` is given.
- ``make_charge`` takes the period from the subscription's anchor and ``period_index``.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from billing import periods
from billing.models import Charge, ChargeStatus, Customer, PaymentMethod, Subscription, SubscriptionStatus

_seq = itertools.count(1)

DEFAULT_ANCHOR = datetime(2025, 1, 15, 9, 0, tzinfo=UTC)


def _n() -> int:
    return next(_seq)


def _apply(obj: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if not hasattr(type(obj), key):
            raise TypeError(f"{type(obj).__name__} has no column {key!r}")
        setattr(obj, key, value)


def make_customer(session: Session, **kw: Any) -> Customer:
    n = _n()
    customer = Customer(email=f"customer{n}@example.com", name=f"Customer {n}", country="FR",
                        stripe_customer_id=f"cus_test{n:08d}")
    _apply(customer, kw)
    session.add(customer)
    session.flush()
    return customer


def make_payment_method(session: Session, customer: Customer, *, default: bool = True, **kw: Any) -> PaymentMethod:
    n = _n()
    pm = PaymentMethod(customer_id=customer.id, stripe_payment_method_id=f"pm_test{n:08d}", brand="visa",
                       last4="4242", exp_month=12, exp_year=2034, country="FR", fingerprint=f"fp{n:014d}",
                       mandate_id=None, setup_intent_id=f"seti_test{n:08d}", saved_at=datetime(2024, 12, 1, tzinfo=UTC),
                       previous_authorization=False)
    _apply(pm, kw)
    session.add(pm)
    session.flush()
    if default and customer.default_payment_method_id is None:
        customer.default_payment_method_id = pm.id
        session.flush()
    return pm


def make_subscription(session: Session, customer: Customer, **kw: Any) -> Subscription:
    anchor = kw.get("anchor_at", DEFAULT_ANCHOR)
    sub = Subscription(customer_id=customer.id, payment_method_id=customer.default_payment_method_id,
                       amount=1999, currency="eur", interval="month", interval_count=1, anchor_at=anchor,
                       next_period_index=0, next_charge_at=anchor, status=SubscriptionStatus.active.value)
    _apply(sub, kw)
    session.add(sub)
    session.flush()
    return sub


def make_charge(session: Session, subscription: Subscription, **kw: Any) -> Charge:
    index = kw.pop("period_index", 0)
    start = periods.period_start(subscription.anchor_at, subscription.interval, subscription.interval_count, index)
    end = periods.period_start(subscription.anchor_at, subscription.interval, subscription.interval_count, index + 1)
    charge = Charge(subscription_id=subscription.id, period_index=index, period_start=start, period_end=end,
                    amount=subscription.amount, currency=subscription.currency, status=ChargeStatus.pending.value,
                    attempts=0, retry_paused=False)
    _apply(charge, kw)
    session.add(charge)
    session.flush()
    return charge
