"""A request Stripe refuses is not a card decline: the gateway's classification, the policy's decision,
the words staff read and the metric's label — pure functions, no HTTP, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import stripe

from billing.dunning import DunningConfig, decide, explain_refusal
from billing.metrics import refusal_label
from billing.models import ChargeStatus
from billing.outcomes import OutcomeKind, PaymentOutcome
from billing.stripe_gateway import _outcome_from_error, outcome_from_error

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- the gateway: Stripe's error object → our outcome ------------------------------------------------

@pytest.mark.parametrize("error", [
    {"type": "invalid_request_error", "code": "amount_too_small", "param": "amount",
     "message": "Amount must be at least €0.50 eur"},
    {"type": "invalid_request_error", "code": "amount_too_large", "param": "amount"},
    {"type": "invalid_request_error", "code": "resource_missing", "param": "customer",
     "message": "No such customer: 'cus_gone'"},
    {"type": "invalid_request_error", "code": "parameter_invalid_integer", "param": "amount"},
    {"type": "invalid_request_error", "param": "currency", "message": "Invalid currency: xyz."},
])
def test_invalid_request_errors_are_refusals_not_declines(error):
    out = outcome_from_error(error)
    assert out.kind is OutcomeKind.refused and out.is_failure
    assert out.error_code == error.get("code", "invalid_request")
    assert out.decline_code is None


@pytest.mark.parametrize(("error", "kind"), [
    ({"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
      "payment_intent": {"id": "pi_1"}}, OutcomeKind.declined),
    ({"type": "card_error", "code": "authentication_required", "payment_intent": {"id": "pi_1"}},
     OutcomeKind.authentication_required),
    ({"type": "card_error", "code": "expired_card"}, OutcomeKind.declined),
    # Some Stripe-compatible servers label declines invalid_request_error: the code still says "card".
    ({"type": "invalid_request_error", "code": "card_declined"}, OutcomeKind.declined),
    ({"type": "invalid_request_error", "code": "card_declined", "decline_code": "do_not_honor"}, OutcomeKind.declined),
])
def test_card_errors_stay_declines(error, kind):
    out = outcome_from_error(error)
    assert out.kind is kind
    assert out.payment_intent_id == (error.get("payment_intent") or {}).get("id")


def test_the_sdk_exceptions_take_the_same_path():
    refused = stripe.InvalidRequestError(
        "No such customer: 'cus_gone'", "customer", code="resource_missing", http_status=404,
        json_body={"error": {"type": "invalid_request_error", "code": "resource_missing", "param": "customer"}})
    declined = stripe.CardError(
        "Your card was declined.", None, "card_declined", http_status=402,
        json_body={"error": {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline"}})
    assert _outcome_from_error(refused).kind is OutcomeKind.refused
    assert _outcome_from_error(refused).error_code == "resource_missing"
    assert _outcome_from_error(declined).kind is OutcomeKind.declined


# --- the policy: held for staff, nothing sent, nothing scheduled -------------------------------------

@pytest.mark.parametrize("first_failed_at", [None, T0 - timedelta(days=2), T0 - timedelta(days=30)])
@pytest.mark.parametrize("attempt_number", [1, 4])
def test_a_refusal_is_held_for_review_without_email_or_retry(first_failed_at, attempt_number):
    out = PaymentOutcome(OutcomeKind.refused, error_code="amount_too_small")
    d = decide(out, failures=attempt_number, first_failed_at=first_failed_at, now=T0, config=DunningConfig())
    assert d.charge_status is ChargeStatus.needs_review
    # An open failure: the subscription opens no next period over it.
    assert d.notify is None and d.reminders == () and d.next_retry_at is None
    # Even past the dunning horizon: never given up behind staff's back, never a final notice.
    assert not d.give_up
    # The customer's dunning clock has not started if they were never asked to pay.
    assert d.first_failed_at == first_failed_at
    assert d.alert


def test_a_decline_is_still_a_decline():
    out = PaymentOutcome(OutcomeKind.declined, error_code="card_declined", decline_code="insufficient_funds")
    d = decide(out, failures=1, first_failed_at=None, now=T0, config=DunningConfig())
    assert d.charge_status is ChargeStatus.requires_payment_method and d.notify is not None


# --- what staff read, what the metric counts ---------------------------------------------------------

def test_staff_read_why_stripe_refused():
    assert "minimum" in explain_refusal("amount_too_small")
    assert "customer" in explain_refusal("resource_missing")
    assert "parameter" in explain_refusal("parameter_invalid_integer")
    for code in ("amount_too_small", "something_new", None):
        assert "not the card" in explain_refusal(code)
        assert "bank" not in explain_refusal(code)


@pytest.mark.parametrize(("code", "label"), [
    ("amount_too_small", "amount_too_small"), ("resource_missing", "resource_missing"),
    ("parameter_invalid_integer", "parameter_invalid_integer"), (None, "invalid_request"),
    ("cus_12345 is not a code", "other"),
])
def test_refusal_metric_labels_are_bounded(code, label):
    assert refusal_label(code) == label
