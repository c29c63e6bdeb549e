"""The dunning policy, as a pure function: no database, no clock (``now`` is passed in)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from billing.dunning import (
    DECLINE_TABLE,
    DeclineClass,
    DunningConfig,
    NotificationKind,
    classify_decline,
    decide,
    decide_give_up,
    explain_decline,
    give_up_at,
)
from billing.models import ChargeStatus, SubscriptionStatus
from billing.outcomes import OutcomeKind, PaymentOutcome

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
CFG = DunningConfig()
DAY = timedelta(days=1)


def declined(decline_code=None, advice_code=None, error_code="card_declined"):
    return PaymentOutcome(OutcomeKind.declined, payment_intent_id="pi_1", error_code=error_code,
                          decline_code=decline_code, advice_code=advice_code)


# ------------------------------------------------------------------------------------ classification

SOFT_CODES = ["insufficient_funds", "try_again_later", "processing_error", "generic_decline", "do_not_honor",
              "issuer_not_available", "approve_with_id", "reenter_transaction", "call_issuer",
              "card_velocity_exceeded", "withdrawal_count_limit_exceeded"]
HARD_CODES = ["lost_card", "stolen_card", "pickup_card", "fraudulent", "expired_card", "incorrect_number",
              "invalid_account", "card_not_supported", "restricted_card", "security_violation",
              "revocation_of_authorization", "revocation_of_all_authorizations", "stop_payment_order",
              "do_not_try_again", "transaction_not_allowed", "currency_not_supported", "merchant_blacklist",
              "new_account_information_available", "incorrect_cvc"]


@pytest.mark.parametrize("code", SOFT_CODES)
def test_soft_decline_codes(code):
    assert classify_decline(code, None, "card_declined") is DeclineClass.soft


@pytest.mark.parametrize("code", HARD_CODES)
def test_hard_decline_codes(code):
    assert classify_decline(code, None, "card_declined") is DeclineClass.hard


@pytest.mark.parametrize("code", [*SOFT_CODES, "some_code_stripe_adds_next_year", None])
def test_advice_do_not_try_again_makes_any_code_hard(code):
    assert classify_decline(code, "do_not_try_again", "card_declined") is DeclineClass.hard


@pytest.mark.parametrize("code", SOFT_CODES)
def test_advice_confirm_card_data_needs_new_details(code):
    assert classify_decline(code, "confirm_card_data") is DeclineClass.hard


def test_advice_try_again_later_outranks_the_decline_code():
    assert classify_decline("do_not_honor", "try_again_later") is DeclineClass.soft
    assert classify_decline("generic_decline", "try_again_later") is DeclineClass.soft


def test_unknown_code_is_soft_and_bounded_by_the_schedule():
    assert classify_decline("brand_new_code", None, "card_declined") is DeclineClass.soft
    assert classify_decline(None, None, None) is DeclineClass.soft


@pytest.mark.parametrize("error_code", ["expired_card", "incorrect_number", "incorrect_cvc"])
def test_card_error_code_without_decline_code(error_code):
    assert classify_decline(None, None, error_code) is DeclineClass.hard


def test_every_table_entry_has_plain_words():
    for code, (cls, words) in DECLINE_TABLE.items():
        assert isinstance(cls, DeclineClass)
        assert words and code not in words and words.endswith(".")


def test_explanations_do_not_reveal_fraud_signals():
    for code in ("fraudulent", "stolen_card", "lost_card", "merchant_blacklist"):
        text = explain_decline(code).lower()
        assert "fraud" not in text and "stolen" not in text and "lost" not in text
    assert "funds" in explain_decline("insufficient_funds")
    assert "confirm" in explain_decline("insufficient_funds", "confirm_card_data")
    assert explain_decline("never_seen") == "Your bank declined the payment."


# ----------------------------------------------------------------------------------------- outcomes

def test_succeeded():
    d = decide(PaymentOutcome(OutcomeKind.succeeded), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.paid
    assert d.notify is None and d.next_retry_at is None and d.reminders == () and not d.give_up and not d.alert


def test_succeeded_after_failures_reactivates_and_optionally_thanks():
    d = decide(PaymentOutcome(OutcomeKind.succeeded), failures=3, first_failed_at=T0, now=T0 + 3 * DAY,
               config=CFG)
    assert d.notify is None
    d = decide(PaymentOutcome(OutcomeKind.succeeded), failures=3, first_failed_at=T0, now=T0 + 3 * DAY,
               config=replace(CFG, notify_recovered=True))
    assert d.notify is NotificationKind.payment_succeeded


def test_processing_keeps_the_subscription_as_it_was():
    d = decide(PaymentOutcome(OutcomeKind.processing), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.processing
    assert d.notify is None and d.next_retry_at is None
    d = decide(PaymentOutcome(OutcomeKind.processing), failures=2, first_failed_at=T0, now=T0 + DAY,
               config=CFG)
    assert d.notify is None


def test_authentication_required_waits_for_the_customer():
    out = PaymentOutcome(OutcomeKind.authentication_required, error_code="authentication_required")
    d = decide(out, failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.authentication_required
    assert d.notify is NotificationKind.authentication_required
    # No blind off-session retry: no retry time at all, only the give-up time at the horizon.
    assert d.next_retry_at is None
    assert d.give_up_at == T0 + timedelta(days=14) == give_up_at(T0, CFG)
    assert d.reminders == (T0 + DAY, T0 + 3 * DAY, T0 + 7 * DAY)
    assert d.first_failed_at == T0 and not d.give_up and not d.alert


def test_declined_with_authentication_required_code_is_treated_as_authentication():
    d = decide(declined("authentication_required"), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.authentication_required
    assert d.notify is NotificationKind.authentication_required


def test_authentication_required_late_keeps_reminders_inside_the_horizon():
    out = PaymentOutcome(OutcomeKind.authentication_required)
    d = decide(out, failures=4, first_failed_at=T0, now=T0 + 10 * DAY, config=CFG)
    assert d.reminders == (T0 + 11 * DAY, T0 + 13 * DAY)
    assert d.next_retry_at is None and d.give_up_at == T0 + 14 * DAY and d.first_failed_at == T0


def test_first_soft_decline_emails_and_schedules_a_retry():
    d = decide(declined("generic_decline"), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.requires_payment_method
    assert d.notify is NotificationKind.payment_failed
    assert d.next_retry_at == T0 + DAY
    assert d.decline_class is DeclineClass.soft and d.reminders == () and not d.give_up
    assert d.first_failed_at == T0


def test_later_soft_declines_do_not_email_again():
    d = decide(declined("generic_decline"), failures=2, first_failed_at=T0, now=T0 + DAY, config=CFG)
    assert d.notify is None
    assert d.next_retry_at == T0 + 2 * DAY


def test_default_schedule_is_eight_retries_within_two_weeks():
    assert len(CFG.retry_schedule) == 8
    assert CFG.retry_schedule[-1] < CFG.give_up_after == timedelta(days=14)


def test_schedule_boundaries_eighth_retry_then_give_up():
    expected_days = [1, 2, 3, 5, 7, 9, 11, 13]
    now, first = T0, None
    for attempt, day in enumerate(expected_days, start=1):
        d = decide(declined("do_not_honor"), failures=attempt, first_failed_at=first, now=now, config=CFG)
        assert not d.give_up, attempt
        assert d.next_retry_at == T0 + timedelta(days=day), attempt
        first, now = d.first_failed_at, d.next_retry_at
    # Attempt 9 is the 8th retry; when it fails too, the schedule is exhausted.
    d = decide(declined("do_not_honor"), failures=9, first_failed_at=first, now=now, config=CFG)
    assert d.give_up
    assert d.charge_status is ChargeStatus.uncollectible
    assert d.notify is NotificationKind.final_notice and d.next_retry_at is None


def test_late_retry_is_not_scheduled_in_the_past():
    # The queue was paused: attempt 2 fails on day 4, past the day-2 slot.
    d = decide(declined("do_not_honor"), failures=2, first_failed_at=T0, now=T0 + 4 * DAY, config=CFG)
    assert d.next_retry_at == T0 + 4 * DAY + CFG.min_retry_gap


def test_retry_that_would_fall_after_the_horizon_gives_up():
    d = decide(declined("do_not_honor"), failures=8, first_failed_at=T0,
               now=T0 + 14 * DAY - timedelta(minutes=30), config=CFG)
    assert d.give_up and d.charge_status is ChargeStatus.uncollectible


def test_try_again_later_retries_sooner():
    d = decide(declined("do_not_honor", "try_again_later"), failures=1, first_failed_at=None, now=T0,
               config=CFG)
    assert d.next_retry_at == T0 + timedelta(hours=4)
    d = decide(declined("processing_error"), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.next_retry_at == T0 + timedelta(hours=4)


def test_insufficient_funds_retries_later():
    d = decide(declined("insufficient_funds"), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.next_retry_at == T0 + 3 * DAY and d.notify is NotificationKind.payment_failed


@pytest.mark.parametrize("code", ["stolen_card", "expired_card", "incorrect_number", "revocation_of_authorization"])
def test_hard_decline_emails_and_waits_without_retrying(code):
    d = decide(declined(code), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.requires_payment_method
    assert d.notify is NotificationKind.payment_failed
    assert d.next_retry_at is None and not d.give_up and not d.alert
    assert d.decline_class is DeclineClass.hard
    assert d.reminders == (T0 + DAY, T0 + 3 * DAY, T0 + 7 * DAY)


def test_do_not_try_again_advice_stops_retries_for_a_soft_code():
    d = decide(declined("insufficient_funds", "do_not_try_again"), failures=1, first_failed_at=None,
               now=T0, config=CFG)
    assert d.next_retry_at is None and d.decline_class is DeclineClass.hard


def test_hard_decline_after_soft_ones_emails_because_the_customer_must_act():
    d = decide(declined("expired_card"), failures=3, first_failed_at=T0, now=T0 + 2 * DAY, config=CFG)
    assert d.notify is NotificationKind.payment_failed and d.next_retry_at is None


@pytest.mark.parametrize("kind", [OutcomeKind.invalid_request, OutcomeKind.canceled])
def test_invalid_request_alerts_and_does_not_retry(kind):
    out = PaymentOutcome(kind, error_code="resource_missing", message="No such PaymentMethod")
    d = decide(out, failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.requires_payment_method
    assert d.notify is NotificationKind.payment_failed
    assert d.alert and d.next_retry_at is None and not d.give_up


@pytest.mark.parametrize("out", [
    declined("generic_decline"), declined("stolen_card"),
    PaymentOutcome(OutcomeKind.authentication_required), PaymentOutcome(OutcomeKind.invalid_request)])
def test_any_failure_past_the_horizon_gives_up(out):
    d = decide(out, failures=2, first_failed_at=T0, now=T0 + 14 * DAY, config=CFG)
    assert d.give_up and d.charge_status is ChargeStatus.uncollectible
    assert d.notify is NotificationKind.final_notice and d.reminders == () and d.next_retry_at is None


# --------------------------------------------------------------------------------------- give-up sweep

def test_decide_give_up_waits_until_the_horizon():
    assert decide_give_up(None, T0, CFG) is None
    assert decide_give_up(T0, T0 + 14 * DAY - timedelta(seconds=1), CFG) is None
    d = decide_give_up(T0, T0 + 14 * DAY, CFG)
    assert d is not None and d.give_up
    assert d.charge_status is ChargeStatus.uncollectible
    assert d.notify is NotificationKind.final_notice


# ------------------------------------------------------------------------------------ configurability

def test_final_subscription_status_canceled_still_gives_the_charge_up():
    # What the subscription becomes is derived from its charges (billing.state), not decided here.
    cfg = DunningConfig(final_subscription_status="canceled")
    assert decide_give_up(T0, T0 + 15 * DAY, cfg).give_up
    d = decide(declined("generic_decline"), failures=9, first_failed_at=T0, now=T0 + 13 * DAY, config=cfg)
    assert d.charge_status is ChargeStatus.uncollectible and d.give_up


def test_from_settings_takes_the_final_status():
    class S:
        final_subscription_status = "canceled"

    assert DunningConfig.from_settings(S()).final_subscription_status is SubscriptionStatus.canceled


def test_custom_schedule_and_horizon():
    cfg = DunningConfig(retry_schedule=(timedelta(hours=12), 2 * DAY), give_up_after=3 * DAY,
                        try_again_later_schedule=(timedelta(hours=1),), insufficient_funds_schedule=(DAY,),
                        reminder_schedule=(DAY,))
    d = decide(declined("do_not_honor"), failures=1, first_failed_at=None, now=T0, config=cfg)
    assert d.next_retry_at == T0 + timedelta(hours=12)
    d = decide(declined("do_not_honor"), failures=3, first_failed_at=T0, now=T0 + 2 * DAY, config=cfg)
    assert d.give_up
    d = decide(PaymentOutcome(OutcomeKind.authentication_required), failures=1, first_failed_at=None,
               now=T0, config=cfg)
    assert d.give_up_at == T0 + 3 * DAY and d.reminders == (T0 + DAY,)
    assert decide_give_up(T0, T0 + 3 * DAY, cfg).give_up


@pytest.mark.parametrize("kwargs", [
    {"final_subscription_status": "active"},
    {"retry_schedule": (2 * DAY, DAY)},
    {"retry_schedule": (timedelta(0),)},
    {"retry_schedule": (DAY, 20 * DAY)},
    {"give_up_after": timedelta(0)},
])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        DunningConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        CFG.give_up_after = DAY  # type: ignore[misc]


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="timezone"):
        decide(declined(), failures=1, first_failed_at=None, now=datetime(2025, 1, 1), config=CFG)
    with pytest.raises(ValueError, match="failures"):
        decide(declined(), failures=-1, first_failed_at=None, now=T0, config=CFG)


def test_staff_retries_and_abandoned_attempts_do_not_use_up_the_schedule():
    """Failures count, not attempts: eleven abandoned attempts and a staff retry later, the first real
    decline still gets the first retry day, not a final notice (the outage case)."""
    d = decide(declined("insufficient_funds"), failures=1, first_failed_at=None, now=T0, config=CFG)
    assert d.charge_status is ChargeStatus.requires_payment_method and not d.give_up
    assert d.next_retry_at == T0 + CFG.insufficient_funds_schedule[0]
    assert d.notify is NotificationKind.payment_failed
    # A staff retry declined an hour later does not count: the schedule's slot stays where it was.
    again = decide(declined("insufficient_funds"), failures=1, first_failed_at=T0, now=T0 + timedelta(hours=1),
                   config=CFG)
    assert again.next_retry_at == d.next_retry_at and again.notify is None
