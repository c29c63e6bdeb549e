"""Which card a subscription's charges are collected from: the one rule, in Python and in SQL.

The subscription's own card, else the customer's default; a card detached in Stripe is no card (it
can never be charged again, https://docs.stripe.com/api/payment_methods/detach), so a charge without
a usable card fails as ``requires_payment_method`` and the customer is asked for a new one.
"""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.orm import Session

from billing.models import Customer, PaymentMethod, Subscription


def card_for(s: Session, sub: Subscription, customer: Customer) -> PaymentMethod | None:
    """The usable card for ``sub`` (the charge task, the recovery page and the console all ask here)."""
    for pm_id in (sub.payment_method_id, customer.default_payment_method_id):
        if pm_id is not None:
            pm = s.get(PaymentMethod, pm_id)
            if pm is not None and pm.detached_at is None:
                return pm
    return None


def card_on_file_sql():
    """SQL for the id of the card on file (the subscription's, else the customer's default), for
    set-based reports joined on ``Subscription`` and ``Customer``: the retry queue's card columns and
    the overview's breakdown by card country. A detached card still counts here: a report says which
    card a charge failed on, while :func:`card_for` says which card can be charged now."""
    return func.coalesce(Subscription.payment_method_id, Customer.default_payment_method_id)
