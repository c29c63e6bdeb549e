"""3-D Secure without a browser: requires_action, then the control endpoint completes or fails it."""

from __future__ import annotations

import httpx
import pytest
import stripe


def _setup(client, customer, pm="pm_card_authenticationRequiredOnSetup"):
    si = client.v1.setup_intents.create(params={"customer": customer.id, "payment_method": pm, "confirm": True})
    assert si.status == "requires_action"
    assert si.next_action.type == "use_stripe_sdk"
    return si


def test_setup_3ds_complete_attaches_the_card(client, customer, sb):
    si = _setup(client, customer)
    sb.control.complete_3ds(si.id)
    si = client.v1.setup_intents.retrieve(si.id)
    assert si.status == "succeeded" and si.next_action is None
    pm = client.v1.payment_methods.retrieve(si.payment_method)
    assert pm.customer == customer.id
    pi = client.v1.payment_intents.create(params={
        "amount": 1200, "currency": "eur", "customer": customer.id, "payment_method": pm.id,
        "off_session": True, "confirm": True})
    assert pi.status == "succeeded"


def test_setup_3ds_fail(client, customer, sb):
    si = _setup(client, customer)
    pm_id = si.payment_method
    sb.control.fail_3ds(si.id)
    si = client.v1.setup_intents.retrieve(si.id)
    assert si.status == "requires_payment_method"
    assert si.last_setup_error.code == "setup_intent_authentication_failure"
    assert client.v1.payment_methods.retrieve(pm_id).customer is None


def test_payment_3ds_complete_and_fail(client, customer, sb):
    pi = client.v1.payment_intents.create(params={
        "amount": 5000, "currency": "eur", "customer": customer.id,
        "payment_method": "pm_card_authenticationRequired", "confirm": True})
    assert pi.status == "requires_action"
    sb.control.complete_3ds(pi.id)
    pi = client.v1.payment_intents.retrieve(pi.id)
    assert pi.status == "succeeded"
    assert [e["payment_intent"] for e in sb.control.ledger()] == [pi.id]

    pi2 = client.v1.payment_intents.create(params={
        "amount": 5000, "currency": "eur", "customer": customer.id,
        "payment_method": "pm_card_authenticationRequired", "confirm": True})
    sb.control.fail_3ds(pi2.id)
    pi2 = client.v1.payment_intents.retrieve(pi2.id)
    assert pi2.status == "requires_payment_method"
    assert pi2.last_payment_error.code == "payment_intent_authentication_failure"
    assert len(sb.control.ledger()) == 1


def test_insufficient_funds_after_authentication(client, customer, sb):
    pi = client.v1.payment_intents.create(params={
        "amount": 5000, "currency": "gbp", "customer": customer.id,
        "payment_method": "pm_card_authenticationRequiredChargeDeclinedInsufficientFunds", "confirm": True})
    assert pi.status == "requires_action"
    sb.control.complete_3ds(pi.id)
    pi = client.v1.payment_intents.retrieve(pi.id)
    assert pi.status == "requires_payment_method"
    assert pi.last_payment_error.decline_code == "insufficient_funds"
    assert sb.control.ledger() == []


def test_recovery_of_off_session_authentication_required(client, customer, sb):
    """Off-session fails with authentication_required; the customer comes back and authenticates
    that same PaymentIntent (https://docs.stripe.com/payments/save-and-reuse#handle-errors)."""
    pm = client.v1.payment_methods.attach("pm_card_authenticationRequired", params={"customer": customer.id})
    with pytest.raises(stripe.CardError) as info:
        client.v1.payment_intents.create(params={
            "amount": 2500, "currency": "eur", "customer": customer.id, "payment_method": pm.id,
            "off_session": True, "confirm": True})
    assert info.value.code == "authentication_required"
    pi_id = info.value.json_body["error"]["payment_intent"]["id"]
    pi = client.v1.payment_intents.confirm(pi_id, params={"payment_method": pm.id,
                                                          "return_url": "https://shop.example/back"})
    assert pi.status == "requires_action"
    assert pi.next_action.type == "redirect_to_url"
    assert pi.next_action.redirect_to_url.return_url == "https://shop.example/back"
    sb.control.complete_3ds(pi_id)
    assert client.v1.payment_intents.retrieve(pi_id).status == "succeeded"


def test_challenge_page_and_form_redirect(client, customer, sb):
    si = _setup(client, customer)
    page = httpx.get(sb.url + f"/_sandbox/3ds/{si.id}")
    assert page.status_code == 200 and "Complete authentication" in page.text
    resp = httpx.post(sb.url + f"/_sandbox/3ds/{si.id}",
                      data={"outcome": "complete", "return_url": "https://shop.example/done"})
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("https://shop.example/done?setup_intent=" + si.id)


def test_3ds_control_on_intent_without_pending_challenge_is_400(client, customer, sb):
    si = client.v1.setup_intents.create(params={"customer": customer.id, "payment_method": "pm_card_visa",
                                                "confirm": True})
    resp = httpx.post(sb.url + f"/_sandbox/3ds/{si.id}", json={"outcome": "complete"})
    assert resp.status_code == 400
