"""API shape: keys, errors, customers, payment methods, intents, mandates, events, search."""

from __future__ import annotations

import httpx
import pytest
import stripe


def test_bad_or_missing_key_is_401(sb):
    bad = stripe.StripeClient("sk_live_nope", base_addresses={"api": sb.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError) as info:
        bad.v1.customers.create(params={})
    assert info.value.http_status == 401
    resp = httpx.post(sb.url + "/v1/customers")
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(sb.url + "/v1/customers", auth=("sk_test_basic", ""))
    assert ok.status_code == 200


def test_any_sk_test_key_is_accepted(sb):
    other = stripe.StripeClient("sk_test_someone_else", base_addresses={"api": sb.url})
    assert other.v1.customers.create(params={}).id.startswith("cus_")


def test_customer_crud_and_metadata(client):
    cus = client.v1.customers.create(params={"email": "a@example.com", "name": "A",
                                              "metadata": {"account": "42", "tier": "gold"}})
    assert cus.object == "customer" and cus.id.startswith("cus_")
    assert cus.livemode is False and isinstance(cus.created, int)
    assert cus.metadata.to_dict() == {"account": "42", "tier": "gold"}
    cus = client.v1.customers.update(cus.id, params={"name": "B", "metadata": {"tier": "", "x": "1"}})
    assert cus.name == "B"
    assert cus.metadata.to_dict() == {"account": "42", "x": "1"}
    assert client.v1.customers.retrieve(cus.id).email == "a@example.com"
    deleted = client.v1.customers.delete(cus.id)
    assert deleted.deleted is True
    assert client.v1.customers.retrieve(cus.id).deleted is True


def test_missing_objects_are_404_resource_missing(client):
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.retrieve("pi_missing")
    assert info.value.http_status == 404
    assert info.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.customers.retrieve("cus_missing")
    assert info.value.http_status == 404


def test_missing_param_is_400(client):
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"currency": "eur"})
    assert info.value.http_status == 400
    assert info.value.param == "amount"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"amount": 10, "currency": "eur"})
    assert info.value.code == "amount_too_small"


def test_payment_method_attach_list_detach(client, customer):
    pm = client.v1.payment_methods.create(params={
        "type": "card", "card": {"number": "4242424242424242", "exp_month": 4, "exp_year": 2031, "cvc": "123"}})
    assert pm.customer is None
    pm = client.v1.payment_methods.attach(pm.id, params={"customer": customer.id})
    assert pm.customer == customer.id
    listed = client.v1.payment_methods.list(params={"customer": customer.id, "type": "card"})
    assert [p.id for p in listed.data] == [pm.id]
    assert client.v1.customers.payment_methods.list(customer.id).data[0].id == pm.id
    pm = client.v1.payment_methods.detach(pm.id)
    assert pm.customer is None
    assert client.v1.payment_methods.list(params={"customer": customer.id, "type": "card"}).data == []
    with pytest.raises(stripe.InvalidRequestError):  # a detached PaymentMethod cannot be reused
        client.v1.payment_methods.attach(pm.id, params={"customer": customer.id})


def test_decline_card_is_refused_on_attach_but_0341_is_not(client, customer):
    with pytest.raises(stripe.CardError) as info:
        client.v1.payment_methods.attach("pm_card_visa_chargeDeclined", params={"customer": customer.id})
    assert info.value.json_body["error"]["decline_code"] == "generic_decline"
    pm = client.v1.payment_methods.attach("pm_card_chargeCustomerFail", params={"customer": customer.id})
    assert pm.customer == customer.id


def test_pm_card_ids_make_fresh_payment_methods(client):
    a = client.v1.payment_methods.retrieve("pm_card_visa")
    b = client.v1.payment_methods.retrieve("pm_card_visa")
    assert a.id != b.id and a.id.startswith("pm_")
    assert a.card.last4 == "4242"


def test_payment_intent_lifecycle_and_list(client, customer):
    pi = client.v1.payment_intents.create(params={
        "amount": 1500, "currency": "EUR", "customer": customer.id, "metadata": {"charge_id": "7"},
        "payment_method_types": ["card"], "setup_future_usage": "off_session"})
    assert pi.status == "requires_payment_method" and pi.currency == "eur"
    assert pi.client_secret.startswith(pi.id + "_secret_")
    pi = client.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert pi.status == "succeeded" and pi.amount_received == 1500
    assert pi.latest_charge.startswith("ch_")
    pm = client.v1.payment_methods.retrieve(pi.payment_method)
    assert pm.customer == customer.id  # setup_future_usage attaches on success
    other = client.v1.payment_intents.create(params={"amount": 900, "currency": "eur", "customer": customer.id})
    canceled = client.v1.payment_intents.cancel(other.id, params={"cancellation_reason": "abandoned"})
    assert canceled.status == "canceled"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.cancel(pi.id)
    assert info.value.code == "payment_intent_unexpected_state"
    listed = client.v1.payment_intents.list(params={"customer": customer.id, "limit": 1})
    assert len(listed.data) == 1 and listed.has_more is True
    assert listed.data[0].id == other.id  # newest first
    expanded = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge", "payment_method"]})
    assert expanded.latest_charge.object == "charge"
    assert expanded.latest_charge.amount == 1500
    assert expanded.payment_method.card.last4 == "4242"


def test_reconfirm_after_decline_with_new_payment_method(client, customer):
    with pytest.raises(stripe.CardError) as info:
        client.v1.payment_intents.create(params={
            "amount": 3000, "currency": "usd", "customer": customer.id, "confirm": True, "off_session": True,
            "payment_method": "pm_card_visa_chargeDeclinedInsufficientFunds"})
    pi_id = info.value.json_body["error"]["payment_intent"]["id"]
    pi = client.v1.payment_intents.confirm(pi_id, params={"payment_method": "pm_card_visa", "off_session": True})
    assert pi.status == "succeeded"
    assert pi.last_payment_error is None
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.confirm(pi_id)
    assert info.value.code == "payment_intent_unexpected_state"


def test_setup_intent_two_step_and_cancel(client, customer):
    si = client.v1.setup_intents.create(params={"customer": customer.id})
    assert si.status == "requires_payment_method" and si.usage == "off_session"
    assert si.id.startswith("seti_")
    si = client.v1.setup_intents.confirm(si.id, params={"payment_method": "pm_card_visa"})
    assert si.status == "succeeded" and si.mandate is None
    assert client.v1.payment_methods.retrieve(si.payment_method).customer == customer.id
    other = client.v1.setup_intents.create(params={"customer": customer.id, "usage": "on_session"})
    assert client.v1.setup_intents.cancel(other.id).status == "canceled"


def test_mandate_from_mandate_data_and_payment_with_mandate(client, customer):
    si = client.v1.setup_intents.create(params={
        "customer": customer.id, "payment_method": "pm_card_visa", "confirm": True,
        "mandate_data": {"customer_acceptance": {"type": "online", "online": {
            "ip_address": "203.0.113.9", "user_agent": "Mozilla/5.0"}}}})
    assert si.status == "succeeded" and si.mandate.startswith("mandate_")
    mandate = client.v1.mandates.retrieve(si.mandate)
    assert mandate.object == "mandate" and mandate.status == "active" and mandate.type == "multi_use"
    assert mandate.payment_method == si.payment_method
    pi = client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": si.payment_method,
        "mandate": mandate.id, "off_session": True, "confirm": True})
    assert pi.status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={
            "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": si.payment_method,
            "mandate": "mandate_nope", "off_session": True, "confirm": True})
    assert info.value.param == "mandate"
    client.v1.payment_methods.detach(si.payment_method)
    assert client.v1.mandates.retrieve(si.mandate).status == "inactive"


def test_india_card_with_mandate_options_gets_e_mandate_after_authentication(client, customer, sb):
    si = client.v1.setup_intents.create(params={
        "customer": customer.id, "payment_method": "pm_card_in", "confirm": True,
        "payment_method_options": {"card": {"mandate_options": {
            "reference": "sub-1", "amount": 5000, "amount_type": "maximum", "currency": "inr",
            "interval": "month", "start_date": sb.control.now()}}}})
    assert si.status == "requires_action"
    sb.control.complete_3ds(si.id)
    si = client.v1.setup_intents.retrieve(si.id)
    assert si.status == "succeeded" and si.mandate.startswith("mandate_")
    plain = client.v1.setup_intents.create(params={
        "customer": customer.id, "payment_method": "pm_card_in", "confirm": True})
    assert plain.status == "succeeded" and plain.mandate is None


def test_search_by_metadata(client, customer):
    for i in range(3):
        client.v1.payment_intents.create(params={
            "amount": 1000 + i, "currency": "eur", "customer": customer.id, "metadata": {"attempt": f"a-{i}"}})
    found = client.v1.payment_intents.search(params={"query": "metadata['attempt']:'a-1'"})
    assert [p.amount for p in found.data] == [1001]
    both = client.v1.payment_intents.search(
        params={"query": f"customer:'{customer.id}' AND status:'requires_payment_method'"})
    assert len(both.data) == 3
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.search(params={"query": "nonsense"})


def test_events_list_and_retrieve(client, customer):
    client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
        "confirm": True})
    events = client.v1.events.list(params={"type": "payment_intent.succeeded"})
    assert len(events.data) == 1
    ev = client.v1.events.retrieve(events.data[0].id)
    assert ev.id.startswith("evt_") and ev.data.object.object == "payment_intent"
    types = [e.type for e in client.v1.events.list(params={"limit": 100}).data]
    assert "payment_intent.created" in types and "charge.succeeded" in types


def test_unknown_url_is_404(sb):
    resp = httpx.get(sb.url + "/v1/nothing_here", headers={"Authorization": f"Bearer {sb.api_key}"})
    assert resp.status_code == 404
    assert "Unrecognized request URL" in resp.json()["error"]["message"]
