"""Webhooks: signed deliveries verified by stripe.Webhook.construct_event, retries, faults."""

from __future__ import annotations

import json
import time

import stripe

from sandbox.testing import SandboxServer
from tests.sandbox.conftest import WEBHOOK_SECRET, Inbox


def _charge(client, customer, pm="pm_card_visa"):
    return client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": pm, "confirm": True})


def test_signed_delivery_verifies_with_construct_event(client, customer, inbox, sb):
    sb.control.advance(3 * 86400)  # sandbox time moves; signatures stay on wall time
    pi = _charge(client, customer)
    got = inbox.wait_for(lambda rs: any(json.loads(r["body"])["type"] == "payment_intent.succeeded" for r in rs))
    record = next(r for r in got if json.loads(r["body"])["type"] == "payment_intent.succeeded")
    event = stripe.Webhook.construct_event(record["body"], record["headers"]["Stripe-Signature"], WEBHOOK_SECRET)
    assert event.type == "payment_intent.succeeded"
    assert event.data.object.id == pi.id
    assert record["headers"]["Content-Type"].startswith("application/json")
    listed = client.v1.events.retrieve(event.id)
    assert listed.type == "payment_intent.succeeded"


def test_event_types_for_setup_payment_and_methods(client, customer, inbox, sb):
    si = client.v1.setup_intents.create(params={"customer": customer.id, "confirm": True,
                                                "payment_method": "pm_card_authenticationRequiredOnSetup"})
    sb.control.complete_3ds(si.id)
    si = client.v1.setup_intents.retrieve(si.id)
    client.v1.payment_methods.detach(si.payment_method)
    try:
        _charge(client, customer, "pm_card_visa_chargeDeclined")
    except stripe.CardError:
        pass
    pi = client.v1.payment_intents.create(params={"amount": 700, "currency": "eur"})
    client.v1.payment_intents.cancel(pi.id)
    wanted = {"setup_intent.requires_action", "setup_intent.succeeded", "payment_method.attached",
              "payment_method.detached", "payment_intent.created", "payment_intent.payment_failed",
              "payment_intent.canceled"}
    inbox.wait_for(lambda rs: wanted <= {json.loads(r["body"])["type"] for r in rs})


def test_setup_failure_event(client, customer, inbox, sb):
    si = client.v1.setup_intents.create(params={"customer": customer.id, "confirm": True,
                                                "payment_method": "pm_card_authenticationRequired"})
    sb.control.fail_3ds(si.id)
    inbox.wait_for(lambda rs: "setup_intent.setup_failed" in {json.loads(r["body"])["type"] for r in rs})


def test_non_2xx_is_retried(client, customer, inbox, sb):
    inbox.plan = [500, 503]  # first two deliveries fail, then 200
    client.v1.customers.update(customer.id, params={"name": "Retried"})
    got = inbox.wait_for(lambda rs: sum(1 for r in rs if r["status"] == 200) >= 1)
    first_ok = next(r for r in got if r["status"] == 200)
    event_id = json.loads(first_ok["body"])["id"]
    attempts = [r for r in got if json.loads(r["body"])["id"] == event_id]
    assert [r["status"] for r in attempts] == [500, 503, 200]
    deadline = time.monotonic() + 10
    while True:  # the sandbox logs the attempt just after the receiver answered
        deliveries = [d for d in sb.control.webhook_deliveries() if d["event"] == event_id]
        if len(deliveries) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert [d["delivered"] for d in deliveries] == [False, False, True]


def test_duplicate_fault(client, customer, inbox, sb):
    sb.control.add_fault("duplicate", event_type="payment_intent.succeeded", count=1)
    pi = _charge(client, customer)
    got = inbox.wait_for(lambda rs: sum(1 for r in rs if json.loads(r["body"])["type"] ==
                                        "payment_intent.succeeded") >= 2)
    ids = [json.loads(r["body"])["id"] for r in got if json.loads(r["body"])["type"] == "payment_intent.succeeded"]
    assert len(ids) == 2 and ids[0] == ids[1]
    assert json.loads(got[-1]["body"])["data"]["object"]["id"] == pi.id


def test_reorder_fault(client, customer, inbox, sb):
    sb.control.add_fault("reorder", event_type="payment_intent.created", count=1, delay_ms=400)
    _charge(client, customer)
    got = inbox.wait_for(lambda rs: "payment_intent.created" in {json.loads(r["body"])["type"] for r in rs})
    types = [json.loads(r["body"])["type"] for r in got]
    assert types.index("payment_intent.succeeded") < types.index("payment_intent.created")


def test_endpoints_from_configuration_survive_reset():
    box = Inbox()
    try:
        with SandboxServer(webhook_endpoints=[(box.url, WEBHOOK_SECRET)], rate_global=None,
                           rate_endpoint=None) as server:
            server.control.reset()
            client = stripe.StripeClient(server.api_key, base_addresses={"api": server.url})
            client.v1.customers.create(params={"email": "cfg@example.com"})
            got = box.wait_for(lambda rs: len(rs) >= 1)
            event = stripe.Webhook.construct_event(got[0]["body"], got[0]["headers"]["Stripe-Signature"],
                                                   WEBHOOK_SECRET)
            assert event.type == "customer.created"
    finally:
        box.close()
