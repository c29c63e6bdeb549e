"""Every object the sandbox serves has exactly the fields Stripe's OpenAPI spec gives it, so a client that
reads any of them works against the sandbox as against Stripe.

The lists are the spec's properties of each resource at the sandbox's API version (``2026-10-28.endive``,
the version stripe-python 16 is generated from: ``stripe/_customer.py`` and siblings, "File generated from
our OpenAPI spec"), less what Stripe itself leaves out of a default answer:

* includable fields, returned only when named in ``expand[]`` (marked Expandable on the API reference and
  not an id: https://docs.stripe.com/api/customers/object, https://docs.stripe.com/api/charges/object);
* the hashes of other types: a PaymentMethod carries the hash of its own ``type`` only (``card`` here),
  a mandate the hash of its own ``type`` (``multi_use`` here);
* ``deleted``, which only a deleted object's stub has.

A field with no value is present as ``null`` (or Stripe's documented default), never missing.
"""

from __future__ import annotations

import typing

import httpx
import pytest
import stripe

COMMON = {"id", "object", "livemode"}

EXPECTED: dict[str, set[str]] = {
    "customer": COMMON | {
        "address", "balance", "business_name", "created", "currency", "customer_account", "default_source",
        "delinquent", "description", "discount", "email", "individual_name", "invoice_prefix", "invoice_settings",
        "metadata", "name", "next_invoice_sequence", "phone", "preferred_locales", "shipping", "tax_exempt",
        "test_clock"},
    "payment_method": COMMON | {
        "allow_redisplay", "billing_details", "card", "created", "customer", "customer_account", "metadata",
        "radar_options", "type"},
    "setup_intent": COMMON | {
        "allowed_payment_method_types", "application", "attach_to_self", "automatic_payment_methods",
        "cancellation_reason", "client_secret", "created", "customer", "customer_account", "description",
        "excluded_payment_method_types", "flow_directions", "last_setup_error", "latest_attempt",
        "managed_payments", "mandate", "metadata", "next_action", "on_behalf_of", "payment_method",
        "payment_method_configuration_details", "payment_method_options", "payment_method_types",
        "single_use_mandate", "status", "usage"},
    "payment_intent": COMMON | {
        "allowed_payment_method_types", "amount", "amount_capturable", "amount_details", "amount_received",
        "application", "application_fee_amount", "automatic_payment_methods", "canceled_at",
        "cancellation_reason", "capture_method", "client_secret", "confirmation_method", "created", "currency",
        "customer", "customer_account", "description", "excluded_payment_method_types", "hooks",
        "last_payment_error", "latest_charge", "managed_payments", "metadata", "next_action", "on_behalf_of",
        "payment_details", "payment_method", "payment_method_configuration_details", "payment_method_options",
        "payment_method_types", "payment_record", "presentment_details", "processing", "receipt_email", "review",
        "setup_future_usage", "shipping", "source", "statement_descriptor", "statement_descriptor_suffix",
        "status", "transfer_data", "transfer_group"},
    "mandate": COMMON | {
        "customer_acceptance", "multi_use", "on_behalf_of", "payment_method", "payment_method_details", "status",
        "type"},
    "event": COMMON | {"account", "api_version", "context", "created", "data", "pending_webhooks", "request", "type"},
    "charge": COMMON | {
        "amount", "amount_captured", "amount_refunded", "application", "application_fee", "application_fee_amount",
        "authorization_code", "balance_transaction", "billing_details", "calculated_statement_descriptor",
        "captured", "created", "currency", "customer", "description", "disputed", "failure_balance_transaction",
        "failure_code", "failure_message", "fraud_details", "level3", "metadata", "on_behalf_of", "outcome",
        "paid", "payment_intent", "payment_method", "payment_method_details", "presentment_details",
        "radar_options", "receipt_email", "receipt_number", "receipt_url", "refunded", "review", "shipping",
        "source", "source_transfer", "statement_descriptor", "statement_descriptor_suffix", "status", "transfer",
        "transfer_data", "transfer_group"},
}

INCLUDABLE = {
    "customer": {"cash_balance", "invoice_credit_balance", "sources", "subscriptions", "tax", "tax_ids"},
    "charge": {"refunds"},
}
DELETED_ONLY = {"customer": {"deleted"}}
SDK_CLASS = {"customer": stripe.Customer, "payment_method": stripe.PaymentMethod, "setup_intent": stripe.SetupIntent,
             "payment_intent": stripe.PaymentIntent, "mandate": stripe.Mandate, "event": stripe.Event,
             "charge": stripe.Charge}


def spec_fields(name: str) -> set[str]:
    """The resource's properties as generated from the spec into the installed stripe-python."""
    return {k for k in SDK_CLASS[name].__annotations__ if k == k.lower() and not k.startswith("_")}


def payment_method_types() -> set[str]:
    """The values the spec allows for ``PaymentMethod.type``: each names a hash of that type's details."""
    literal = next(a for a in typing.get_args(stripe.PaymentMethod.__annotations__["type"])
                   if typing.get_origin(a) is typing.Literal)
    return set(typing.get_args(literal))


def other_type_hashes(name: str) -> set[str]:
    if name == "payment_method":
        return (payment_method_types() & spec_fields(name)) - {"card"}
    if name == "mandate":
        return {"single_use"}
    return set()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_lists_are_the_spec_less_what_stripe_leaves_out(name):
    """If this fails after a stripe-python upgrade, the spec gained fields: the sandbox should serve them."""
    left_out = INCLUDABLE.get(name, set()) | DELETED_ONLY.get(name, set()) | other_type_hashes(name)
    assert EXPECTED[name] | left_out == spec_fields(name)
    assert not EXPECTED[name] & left_out


def raw(sb, method: str, path: str, **params) -> dict:
    """The sandbox's JSON as sent, not through the SDK's objects."""
    resp = httpx.request(method, f"{sb.url}{path}", auth=(sb.api_key, ""), timeout=10,
                         params=params if method == "GET" else None, data=params if method != "GET" else None)
    assert resp.status_code < 500, resp.text
    return resp.json()


@pytest.fixture
def served(sb, client, customer) -> dict[str, list[dict]]:
    """One of each object, in the states the product meets: a customer, a saved card, a SetupIntent with a
    mandate, a paid and a declined PaymentIntent with their charges, and the events about them."""
    si = client.v1.setup_intents.create(params={
        "customer": customer.id, "payment_method": "pm_card_visa", "confirm": True,
        "mandate_data": {"customer_acceptance": {"type": "online", "online": {
            "ip_address": "203.0.113.9", "user_agent": "Mozilla/5.0"}}}})
    paid = client.v1.payment_intents.create(params={
        "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": si.payment_method,
        "mandate": si.mandate, "off_session": True, "confirm": True})
    declined = client.v1.payment_methods.create(params={"type": "card", "card": {
        "number": "4000000000000341", "exp_month": 12, "exp_year": 2040, "cvc": "123"}})
    client.v1.payment_methods.attach(declined.id, params={"customer": customer.id})
    with pytest.raises(stripe.CardError) as failure:
        client.v1.payment_intents.create(params={
            "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": declined.id,
            "off_session": True, "confirm": True})
    failed_pi = failure.value.json_body["error"]["payment_intent"]["id"]
    pis = [raw(sb, "GET", f"/v1/payment_intents/{pid}") for pid in (paid.id, failed_pi)]
    return {
        "customer": [raw(sb, "GET", f"/v1/customers/{customer.id}")],
        "payment_method": [raw(sb, "GET", f"/v1/payment_methods/{pm}") for pm in (si.payment_method, declined.id)],
        "setup_intent": [raw(sb, "GET", f"/v1/setup_intents/{si.id}")],
        "payment_intent": pis,
        "mandate": [raw(sb, "GET", f"/v1/mandates/{si.mandate}")],
        "event": raw(sb, "GET", "/v1/events", limit=100)["data"],
        "charge": [raw(sb, "GET", f"/v1/charges/{pi['latest_charge']}") for pi in pis],
    }


def test_every_object_has_exactly_the_spec_fields(served):
    for name, objects in served.items():
        assert objects, name
        for obj in objects:
            assert obj["object"] == name
            assert set(obj) == EXPECTED[name], (name, sorted(set(obj) ^ EXPECTED[name]))


def test_objects_inside_events_and_errors_have_them_too(served):
    for event in served["event"]:
        inner = event["data"]["object"]
        if inner["object"] in EXPECTED:
            expected = EXPECTED[inner["object"]]
            assert set(inner) == expected, (event["type"], sorted(set(inner) ^ expected))


def test_fields_without_a_value_are_null_or_stripes_default(served):
    [cus] = served["customer"]
    assert (cus["discount"], cus["business_name"], cus["customer_account"], cus["next_invoice_sequence"]) == (
        None, None, None, 1)
    paid, failed = served["charge"]
    assert paid["status"] == "succeeded" and paid["receipt_url"] is None and paid["fraud_details"] == {}
    assert failed["status"] == "failed" and failed["failure_code"] == "card_declined"
    assert all(e["account"] is None and e["context"] is None for e in served["event"])


def test_includable_fields_come_only_when_expanded(sb, served):
    [cus] = served["customer"]
    expanded = raw(sb, "GET", f"/v1/customers/{cus['id']}", **{"expand[]": ["sources", "tax", "tax_ids"]})
    assert set(expanded) == EXPECTED["customer"] | {"sources", "tax", "tax_ids"}
    assert expanded["sources"]["object"] == "list" and expanded["sources"]["data"] == []
    assert expanded["tax"]["automatic_tax"] == "unrecognized_location"
    charge = served["charge"][0]
    with_refunds = raw(sb, "GET", f"/v1/charges/{charge['id']}", **{"expand[]": "refunds"})
    assert set(with_refunds) == EXPECTED["charge"] | {"refunds"}
    assert with_refunds["refunds"]["url"] == f"/v1/charges/{charge['id']}/refunds"
    # Asking for them once does not make them stick.
    assert set(raw(sb, "GET", f"/v1/customers/{cus['id']}")) == EXPECTED["customer"]
