"""The worker's charging phases against both Stripe stand-ins.

Where localstripe differs from Stripe (a 3DS card off-session answered 200 ``requires_action``,
declines sent as ``invalid_request_error`` without their PaymentIntent, Idempotency-Key ignored),
the worker must still reach the same result: the same charge status, and never a second
PaymentIntent for one period.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import charging
from billing.models import Charge
from billing.stripe_gateway import StripeGateway
from tests import factories
from tests.conformance.test_conformance import saved_card
from tests.integration.billing_helpers import lease_runs_out

pytestmark = pytest.mark.usefixtures("clean_db")

CARDS = {
    "4242424242424242": ("paid", None),
    "4000000000000341": ("requires_payment_method", "card_declined"),
    "4000002760003184": ("authentication_required", "authentication_required"),
}


def subscribe(backend, session_factory, number: str) -> tuple[int, str]:
    customer = backend.client.v1.customers.create({"email": f"{number}@example.com", "name": number})
    pm = saved_card(backend, customer, number)
    with session_factory() as s:
        row = factories.make_customer(s, email=f"{number}@example.com", stripe_customer_id=customer.id)
        factories.make_payment_method(s, row, stripe_payment_method_id=pm.id, fingerprint=None)
        due = datetime.now(UTC) - timedelta(minutes=1)
        factories.make_subscription(s, row, anchor_at=due, next_charge_at=due)
        s.commit()
    return customer.id, pm.id


def payment_intents_of(backend, customer_id: str) -> list:
    # Unfiltered: localstripe cannot list by customer.
    return [pi for pi in backend.client.v1.payment_intents.list({"limit": 100}).data if pi.customer == customer_id]


@pytest.mark.parametrize("number", sorted(CARDS))
def test_each_outcome_is_classified_the_same_on_both(backend, session_factory, number):
    gateway = StripeGateway(api_key=backend.api_key, api_base=backend.api_base)
    customer_id, _ = subscribe(backend, session_factory, number)
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    expected_status, expected_code = CARDS[number]
    assert charging.process_charge(charge_id, gateway=gateway) == expected_status
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        assert charge.last_error_code == expected_code
        # The period's PaymentIntent is known, so its retries re-confirm that one.
        assert charge.payment_intent_id is not None
    assert len(payment_intents_of(backend, customer_id)) == 1


def test_lost_response_never_becomes_a_second_payment_intent(backend, session_factory):
    gateway = StripeGateway(api_key=backend.api_key, api_base=backend.api_base)
    customer_id, _ = subscribe(backend, session_factory, "4242424242424242")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    # The worker claims the charge and sends the request; Stripe processes it, the answer is lost
    # and the worker dies.
    claim = charging._claim(charge_id, datetime.now(UTC), manual=False)
    charging._call_stripe(gateway, claim)
    lease_runs_out(charge_id)
    # Whoever picks the charge up next (once the dead worker's lease has lapsed) resumes the attempt:
    # it must find that PaymentIntent, not make another (localstripe ignores the idempotency key, so
    # only the lookup prevents it).
    assert charging.process_charge(charge_id, gateway=gateway) == "paid"
    intents = payment_intents_of(backend, customer_id)
    assert len(intents) == 1 and intents[0].status == "succeeded"
    with session_factory() as s:
        assert s.scalars(select(Charge.payment_intent_id)).one() == intents[0].id
