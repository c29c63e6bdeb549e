"""Events whose delivery failed are listed with ``delivery_success=false``, as on Stripe
(https://docs.stripe.com/api/events/list, https://docs.stripe.com/webhooks/process-undelivered-events); the
``drop`` fault makes a delivery that never arrives."""

from __future__ import annotations

import json
import time

import pytest
import stripe


def _charge(client, customer):
    return client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
        "confirm": True})


def _settled(sb, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = sb.control.webhook_deliveries()
        if len(deliveries) >= count:
            return deliveries
        time.sleep(0.02)
    raise AssertionError(f"expected {count} delivery attempts, got {sb.control.webhook_deliveries()}")


def test_a_dropped_delivery_never_arrives_and_is_listed_as_undelivered(client, customer, inbox, sb):
    sb.control.add_fault("drop", event_type="payment_intent.succeeded", count=1)
    pi = _charge(client, customer)
    inbox.wait_for(lambda rs: any(json.loads(r["body"])["type"] == "charge.succeeded" for r in rs))
    time.sleep(0.3)  # room for a delivery that should not come
    assert "payment_intent.succeeded" not in {e["type"] for e in inbox.events()}
    [dropped] = [d for d in sb.control.webhook_deliveries() if d["type"] == "payment_intent.succeeded"]
    assert dropped["delivered"] is False and dropped["error"] == "dropped by fault"

    undelivered = client.v1.events.list(params={"delivery_success": False, "limit": 100}).data
    assert [(e.type, e.data.object.id) for e in undelivered] == [("payment_intent.succeeded", pi.id)]
    assert undelivered[0].pending_webhooks == 1
    delivered = client.v1.events.list(params={"delivery_success": True, "limit": 100}).data
    assert "payment_intent.succeeded" not in {e.type for e in delivered} and len(delivered) >= 3
    # types[] and created[] combine with it, as the backfill asks.
    narrowed = client.v1.events.list(params={"delivery_success": False, "types": ["payment_intent.succeeded",
                                                                                "setup_intent.succeeded"],
                                             "created": {"gte": undelivered[0].created}}).data
    assert [e.id for e in narrowed] == [undelivered[0].id]


def test_failed_deliveries_stay_undelivered_until_one_succeeds(client, customer, inbox, sb):
    inbox.plan = [500] * 50  # every attempt fails while the plan lasts (retries are compressed here)
    _charge(client, customer)
    _settled(sb, 4 * 3)  # each event: the first attempt and its 3 retries, all answered 500
    assert {e.type for e in client.v1.events.list(params={"delivery_success": False, "limit": 100}).data} >= {
        "payment_intent.created", "charge.succeeded", "payment_intent.succeeded"}


def test_events_without_endpoints_count_as_delivered(client, customer, sb):
    _charge(client, customer)
    assert client.v1.events.list(params={"delivery_success": False}).data == []
    assert len(client.v1.events.list(params={"delivery_success": True, "limit": 100}).data) >= 3


def test_a_non_boolean_is_refused(client, sb):
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.events.list(params={"delivery_success": "maybe"})
    assert info.value.param == "delivery_success"
