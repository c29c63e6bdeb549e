"""Each documented test card's behaviour on setup, on-session payment and off-session payment
(https://docs.stripe.com/testing), written out independently of sandbox/cards.py."""

from __future__ import annotations

import pytest
import stripe

OK, TDS, AUTH = "ok", "3ds", "authentication_required"


def decline(code: str, decline_code: str | None, advice: str | None = None) -> tuple:
    return ("decline", code, decline_code, advice)


INSUFF = decline("card_declined", "insufficient_funds", "try_again_later")
GENERIC = decline("card_declined", "generic_decline")
LOST = decline("card_declined", "lost_card", "do_not_try_again")

# number, pm alias, country, setup, on-session, off-session (never set up), off-session after setup
CARDS = [
    ("4242424242424242", "pm_card_visa", "US", OK, OK, OK, OK),
    ("5555555555554444", "pm_card_mastercard", "US", OK, OK, OK, OK),
    ("4000002500003155", "pm_card_authenticationRequiredOnSetup", "FR", TDS, TDS, AUTH, OK),
    ("4000002760003184", "pm_card_authenticationRequired", "DE", TDS, TDS, AUTH, AUTH),
    ("4000003800000446", "pm_card_authenticationRequiredSetupForOffSession", "IT", TDS, TDS, OK, OK),
    ("4000008260003178", "pm_card_authenticationRequiredChargeDeclinedInsufficientFunds", "GB", TDS, TDS, AUTH,
     INSUFF),
    ("4000000000000341", "pm_card_chargeCustomerFail", "US", OK, GENERIC, GENERIC, GENERIC),
    ("4000000000009995", "pm_card_visa_chargeDeclinedInsufficientFunds", "US", INSUFF, INSUFF, INSUFF, None),
    ("4000000000000002", "pm_card_visa_chargeDeclined", "US", GENERIC, GENERIC, GENERIC, None),
    ("4000000000009987", "pm_card_visa_chargeDeclinedLostCard", "US", LOST, LOST, LOST, None),
    ("4000000000009979", "pm_card_visa_chargeDeclinedStolenCard", "US",
     decline("card_declined", "stolen_card", "do_not_try_again"),
     decline("card_declined", "stolen_card", "do_not_try_again"),
     decline("card_declined", "stolen_card", "do_not_try_again"), None),
    ("4000000000000069", "pm_card_chargeDeclinedExpiredCard", "US", decline("expired_card", "expired_card"),
     decline("expired_card", "expired_card"), decline("expired_card", "expired_card"), None),
    ("4000000000000119", "pm_card_chargeDeclinedProcessingError", "US",
     decline("processing_error", "processing_error", "try_again_later"),
     decline("processing_error", "processing_error", "try_again_later"),
     decline("processing_error", "processing_error", "try_again_later"), None),
    ("4000000000000127", "pm_card_chargeDeclinedIncorrectCvc", "US",
     decline("incorrect_cvc", "incorrect_cvc", "confirm_card_data"),
     decline("incorrect_cvc", "incorrect_cvc", "confirm_card_data"),
     decline("incorrect_cvc", "incorrect_cvc", "confirm_card_data"), None),
    ("4000000000003220", "pm_card_threeDSecure2Required", "US", TDS, TDS, AUTH, AUTH),
]

COUNTRIES = [
    ("4000002500000003", "pm_card_fr", "FR"),
    ("4000002760000016", "pm_card_de", "DE"),
    ("4000008260000000", "pm_card_gb", "GB"),
    ("4242424242424242", "pm_card_us", "US"),
    ("4000003560000008", "pm_card_in", "IN"),
    ("4000000760000002", "pm_card_br", "BR"),
]


def _pay(client, customer_id, pm, off_session: bool):
    params = {"amount": 2000, "currency": "eur", "payment_method": pm, "confirm": True}
    if customer_id:
        params["customer"] = customer_id
    if off_session:
        params["off_session"] = True
    return client.v1.payment_intents.create(params=params)


def _check(expected, call, intent_key: str):
    if expected in (OK, TDS):
        obj = call()
        assert obj.status == ("succeeded" if expected == OK else "requires_action")
        if expected == TDS:
            assert obj.next_action.type in ("use_stripe_sdk", "redirect_to_url")
        return obj
    with pytest.raises(stripe.CardError) as info:
        call()
    err = info.value
    assert err.http_status == 402
    assert err.error.type == "card_error"
    body = err.json_body["error"]
    intent = body[intent_key]
    assert intent["status"] == "requires_payment_method"
    last = intent["last_payment_error" if intent_key == "payment_intent" else "last_setup_error"]
    if expected == AUTH:
        assert err.code == "authentication_required"
        assert last["code"] == "authentication_required"
    else:
        _, code, decline_code, advice = expected
        assert err.code == code
        assert body.get("decline_code") == decline_code
        assert body.get("advice_code") == advice
        assert last["decline_code"] == decline_code
    return None


@pytest.mark.parametrize("row", CARDS, ids=[r[0] for r in CARDS])
def test_card_setup_on_and_off_session(client, customer, sb, row):
    _, alias, country, setup, on_session, off_unset, off_after = row

    # setup (SetupIntent, usage=off_session by default)
    def do_setup():
        return client.v1.setup_intents.create(
            params={"customer": customer.id, "payment_method": alias, "confirm": True})

    si = _check(setup, do_setup, "setup_intent")
    if si is not None:
        assert si.usage == "off_session"

    # on-session payment
    _check(on_session, lambda: _pay(client, None, alias, off_session=False), "payment_intent")

    # off-session payment with a card never set up
    other = client.v1.customers.create(params={"email": "b@example.com"})
    _check(off_unset, lambda: _pay(client, other.id, alias, off_session=True), "payment_intent")

    # off-session after a completed setup
    if off_after is not None:
        third = client.v1.customers.create(params={"email": "c@example.com"})
        si = client.v1.setup_intents.create(
            params={"customer": third.id, "payment_method": alias, "confirm": True})
        if si.status == "requires_action":
            sb.control.complete_3ds(si.id)
            si = client.v1.setup_intents.retrieve(si.id)
        assert si.status == "succeeded"
        pm = client.v1.payment_methods.retrieve(si.payment_method)
        assert pm.customer == third.id
        assert pm.card.country == country
        _check(off_after, lambda: _pay(client, third.id, pm.id, off_session=True), "payment_intent")


@pytest.mark.parametrize("row", CARDS, ids=[r[0] for r in CARDS])
def test_card_numbers_create_payment_methods(client, row):
    number, _, country, *_ = row
    pm = client.v1.payment_methods.create(params={
        "type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}})
    assert pm.id.startswith("pm_")
    assert pm.card.last4 == number[-4:]
    assert pm.card.country == country
    assert pm.card.exp_month == 12 and pm.card.exp_year == 2034
    again = client.v1.payment_methods.create(params={
        "type": "card", "card": {"number": number, "exp_month": 1, "exp_year": 2035, "cvc": "999"}})
    assert again.id != pm.id
    assert again.card.fingerprint == pm.card.fingerprint


@pytest.mark.parametrize(("number", "alias", "country"), COUNTRIES)
def test_country_cards(client, number, alias, country):
    by_alias = client.v1.payment_methods.retrieve(alias)
    assert by_alias.card.country == country
    assert by_alias.card.brand == "visa"
    assert by_alias.card.funding in ("credit", "debit", "prepaid", "unknown")
    by_number = client.v1.payment_methods.create(params={
        "type": "card", "card": {"number": number, "exp_month": 6, "exp_year": 2033, "cvc": "314"}})
    assert by_number.card.country == country
    assert by_number.card.fingerprint == by_alias.card.fingerprint
    pi = _pay(client, None, by_number.id, off_session=False)
    assert pi.status == "succeeded"


def test_fingerprints_differ_between_cards(client):
    a = client.v1.payment_methods.retrieve("pm_card_visa")
    b = client.v1.payment_methods.retrieve("pm_card_mastercard")
    assert a.card.fingerprint != b.card.fingerprint
    assert a.card.brand == "visa" and b.card.brand == "mastercard"


def test_off_session_error_carries_payment_intent_and_charge(client, customer):
    with pytest.raises(stripe.CardError) as info:
        _pay(client, customer.id, "pm_card_visa_chargeDeclinedInsufficientFunds", off_session=True)
    body = info.value.json_body["error"]
    pi = client.v1.payment_intents.retrieve(body["payment_intent"]["id"])
    assert pi.status == "requires_payment_method"
    assert pi.last_payment_error.decline_code == "insufficient_funds"
    assert pi.latest_charge.startswith("ch_")
    assert body["charge"] == pi.latest_charge
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert charge.status == "failed" and charge.failure_code == "card_declined"
    assert body["doc_url"].startswith("https://stripe.com/docs/error-codes/")


@pytest.mark.parametrize(("card", "code"), [
    ({"number": "4242424242424241", "exp_month": 12, "exp_year": 2034}, "incorrect_number"),
    ({"number": "4242424242424242", "exp_month": 13, "exp_year": 2034}, "invalid_expiry_month"),
    ({"number": "4242424242424242", "exp_month": 1, "exp_year": 2001}, "invalid_expiry_year"),
    ({"number": "4242424242424242", "exp_month": 1, "exp_year": 2034, "cvc": "12"}, "invalid_cvc"),
])
def test_invalid_card_details_are_card_errors(client, card, code):
    with pytest.raises(stripe.CardError) as info:
        client.v1.payment_methods.create(params={"type": "card", "card": card})
    assert info.value.code == code
    assert info.value.http_status == 402
