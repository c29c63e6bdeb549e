"""The dunning policy: what to do after each charge outcome. Pure functions, no I/O.

Given what Stripe answered (a :class:`~billing.outcomes.PaymentOutcome`), which attempt it was and
when the charge first failed, :func:`decide` returns the charge's and subscription's new status, when
to retry, which email to send now, which reminders to schedule and whether to give up. The charging
phases apply the :class:`Decision` in the same transaction as the outcome; the periodic sweep calls
:func:`decide_give_up` for charges that wait on the customer.

Where the rules come from (docs.stripe.com):

- Soft vs hard declines: Stripe's decline-code table, https://docs.stripe.com/declines/codes, and the
  codes Stripe itself never retries, https://docs.stripe.com/billing/revenue-recovery/smart-retries
  (section "non-retryable decline codes").
- Advice codes (``try_again_later``, ``do_not_try_again``, ``confirm_card_data``) override the
  decline code: https://docs.stripe.com/declines/card (section "Retrying issuer declines").
- The retry budget: Stripe recommends Smart Retries with "8 tries within 2 weeks" as the default,
  https://docs.stripe.com/payments/off-session-payments/smart-retries. We cannot run Stripe's model,
  so :class:`DunningConfig` spreads eight retries over the same two weeks on a fixed schedule.
- ``authentication_required`` off-session means the issuer wants the customer present; retrying the
  same card off-session again only collects more declines, so the customer gets a link instead:
  https://docs.stripe.com/payments/save-and-reuse (charging the saved card later, off-session).
- A request Stripe refuses (``invalid_request_error``, https://docs.stripe.com/api/errors) is not a
  decline: the card was never tried. The charge is held for staff (``needs_review``), with no email.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise

from billing.models import ChargeStatus, SubscriptionStatus
from billing.outcomes import OutcomeKind, PaymentOutcome


class DeclineClass(enum.StrEnum):
    # Retrying the same card later may succeed (funds arrive, issuer recovers).
    soft = "soft"
    # Retrying the same card will not succeed: the customer must act (new card, new details, bank).
    hard = "hard"


class NotificationKind(enum.StrEnum):
    authentication_required = "authentication_required"
    payment_failed = "payment_failed"
    reminder = "reminder"
    final_notice = "final_notice"
    payment_succeeded = "payment_succeeded"


# Kinds whose email carries a recovery link (a fresh token is issued when the email is sent).
LINK_KINDS = frozenset({NotificationKind.authentication_required, NotificationKind.payment_failed,
                        NotificationKind.reminder})


def _days(*values: float) -> tuple[timedelta, ...]:
    return tuple(timedelta(days=v) for v in values)


_S, _H = DeclineClass.soft, DeclineClass.hard

# The one table: Stripe decline code (or card error code when Stripe sends no decline code) → class
# and the plain words we show the customer. Source: https://docs.stripe.com/declines/codes; the hard
# ones are those Stripe lists as non-retryable for Smart Retries
# (https://docs.stripe.com/billing/revenue-recovery/smart-retries#non-retryable-decline-codes) plus
# the ones whose "next steps" say the customer must use another card or fix its details.
# Fraud-related codes get the same neutral words as a generic decline, as Stripe advises, so the
# email never tells a fraudster why the card failed.
_GENERIC = "Your bank declined the payment without giving a reason."
_NEW_CARD = "Your bank declined the payment and will not accept this card for it."
DECLINE_TABLE: dict[str, tuple[DeclineClass, str]] = {
    # Soft: the issuer might approve a later try.
    "insufficient_funds": (_S, "The card did not have enough funds available."),
    "try_again_later": (_S, "Your bank could not approve the payment at that moment."),
    "processing_error": (_S, "An error occurred while processing the card."),
    "issuer_not_available": (_S, "Your bank could not be reached."),
    "reenter_transaction": (_S, "Your bank could not process the payment at that moment."),
    "approve_with_id": (_S, "Your bank could not authorise the payment at that moment."),
    "generic_decline": (_S, _GENERIC),
    "do_not_honor": (_S, _GENERIC),
    "call_issuer": (_S, "Your bank declined the payment and asks you to contact them."),
    "card_velocity_exceeded": (_S, "The card has reached its balance, credit or spending limit."),
    "withdrawal_count_limit_exceeded": (_S, "The card has reached its spending limit."),
    "duplicate_transaction": (_S, "Your bank saw a very similar payment shortly before."),
    "no_action_taken": (_S, _GENERIC),
    "not_permitted": (_S, _GENERIC),
    # Hard: the same card will not be approved; new card or new details needed.
    "lost_card": (_H, _NEW_CARD),
    "stolen_card": (_H, _NEW_CARD),
    "pickup_card": (_H, _NEW_CARD),
    "fraudulent": (_H, _NEW_CARD),
    "merchant_blacklist": (_H, _NEW_CARD),
    "highest_risk_level": (_H, _NEW_CARD),
    "security_violation": (_H, _NEW_CARD),
    "restricted_card": (_H, _NEW_CARD),
    "do_not_try_again": (_H, _NEW_CARD),
    "expired_card": (_H, "The card has expired."),
    "incorrect_number": (_H, "The card number is no longer valid."),
    "invalid_number": (_H, "The card number is no longer valid."),
    "incorrect_cvc": (_H, "The card's security code did not match."),
    "invalid_cvc": (_H, "The card's security code did not match."),
    "invalid_expiry_month": (_H, "The card's expiry date is not valid."),
    "invalid_expiry_year": (_H, "The card's expiry date is not valid."),
    "incorrect_zip": (_H, "The card's postal code did not match."),
    "invalid_account": (_H, "The card, or the account it belongs to, is no longer valid."),
    "new_account_information_available": (_H, "Your bank has issued new details for this card."),
    "card_not_supported": (_H, "The card does not support this kind of payment."),
    "currency_not_supported": (_H, "The card does not support this currency."),
    "transaction_not_allowed": (_H, "The card does not allow this kind of payment."),
    "service_not_allowed": (_H, "The card does not allow this kind of payment."),
    "invalid_amount": (_H, "Your bank did not accept the amount of the payment."),
    "revocation_of_authorization": (_H, "You asked your bank to stop these payments."),
    "revocation_of_all_authorizations": (_H, "You asked your bank to stop these payments."),
    "stop_payment_order": (_H, "You asked your bank to stop these payments."),
    "testmode_decline": (_H, "A test card was used in live mode."),
    "incorrect_pin": (_H, _NEW_CARD),
    "invalid_pin": (_H, _NEW_CARD),
    "pin_try_exceeded": (_H, _NEW_CARD),
    "offline_pin_required": (_H, _NEW_CARD),
    "online_or_offline_pin_required": (_H, _NEW_CARD),
}

# Advice codes outrank the decline code (https://docs.stripe.com/declines/card#retrying-issuer-declines):
# the issuer's own word on whether a retry can work. ``confirm_card_data`` means "not without new
# card details", which for an automatic off-session retry is the same as never.
ADVICE_TABLE: dict[str, tuple[DeclineClass, str | None]] = {
    "try_again_later": (_S, None),
    "do_not_try_again": (_H, _NEW_CARD),
    "confirm_card_data": (_H, "Your bank needs you to confirm or update the card details."),
}

_UNKNOWN_EXPLANATION = "Your bank declined the payment."


# Words for finance staff (never for the customer) on why Stripe refused a request: the
# invalid_request_error codes of https://docs.stripe.com/error-codes that a charge can meet.
REFUSAL_TABLE: dict[str, str] = {
    "amount_too_small": "The amount is below Stripe's minimum for this currency "
                        "(docs.stripe.com, \"Minimum and maximum charge amounts\").",
    "amount_too_large": "The amount is above Stripe's maximum for this currency.",
    "resource_missing": "Stripe does not know the customer, card or mandate any more (deleted, or from "
                        "another account).",
    "parameter_missing": "Stripe refused the request: a required parameter is missing.",
    "parameter_unknown": "Stripe refused the request: it has a parameter Stripe does not know.",
    "payment_method_unexpected_state": "The card is not in a state Stripe can charge (e.g. detached).",
    "payment_intent_unexpected_state": "The payment is not in a state Stripe can confirm.",
    "processing_timeout": "The payment was still processing at Stripe days later; check it in the Stripe "
                          "dashboard, then retry or void it.",
    "payment_intent_requires_capture": "The payment was authorised but not captured (this worker never asks "
                                       "for manual capture); capture or cancel it in the Stripe dashboard.",
    "payment_intent_requires_confirmation": "The payment was created but not confirmed; retry it or void it.",
}
_REFUSED = "Stripe refused the request itself, not the card; nothing was charged and the customer was not told."


def explain_refusal(error_code: str | None) -> str:
    """Why a ``needs_review`` charge is held, for staff: the request, not the card, was refused."""
    if error_code in REFUSAL_TABLE:
        return f"{REFUSAL_TABLE[error_code]} {_REFUSED}"
    if error_code and error_code.startswith("parameter_invalid"):
        return f"Stripe refused a parameter of the request. {_REFUSED}"
    if error_code and error_code.startswith("payment_intent_"):
        return f"The payment is in a state ({error_code.removeprefix('payment_intent_')}) this worker cannot settle."
    return _REFUSED


def classify_decline(decline_code: str | None, advice_code: str | None = None,
                     error_code: str | None = None) -> DeclineClass:
    """Soft or hard, by advice code first, then decline code, then card error code.

    A code we do not know is soft, as Smart Retries retries every code it does not list as
    non-retryable; the retry budget still bounds how often it is tried.
    """
    if advice_code in ADVICE_TABLE:
        return ADVICE_TABLE[advice_code][0]
    for code in (decline_code, error_code):
        if code in DECLINE_TABLE:
            return DECLINE_TABLE[code][0]
    return DeclineClass.soft


def explain_decline(decline_code: str | None, advice_code: str | None = None,
                    error_code: str | None = None) -> str:
    """Plain words for the customer's email (never Stripe's raw message, which may name fraud rules)."""
    advice_words = ADVICE_TABLE[advice_code][1] if advice_code in ADVICE_TABLE else None
    if advice_words:
        return advice_words
    for code in (decline_code, error_code):
        if code in DECLINE_TABLE:
            return DECLINE_TABLE[code][1]
    return _UNKNOWN_EXPLANATION


@dataclass(frozen=True)
class DunningConfig:
    """Knobs of the policy. Offsets count from the charge's first failure, not from the last try.

    Default retry schedule, days after the first failure: 1, 2, 3, 5, 7, 9, 11, 13 — eight retries
    inside two weeks, Stripe's recommended Smart Retries default. Dense at first (most soft declines
    that recover do so within days), then every other day so the tries straddle a weekend and a
    payday, and the last one lands a day before the give-up horizon.
    """

    retry_schedule: tuple[timedelta, ...] = _days(1, 2, 3, 5, 7, 9, 11, 13)
    # advice_code try_again_later (and the issuer-side outages below): the issuer asks for a retry
    # soon, so the first one comes after hours, not a day.
    try_again_later_schedule: tuple[timedelta, ...] = (timedelta(hours=4), *_days(1, 2, 4, 6, 8, 10, 13))
    try_again_later_codes: frozenset[str] = frozenset(
        {"try_again_later", "processing_error", "issuer_not_available", "reenter_transaction"})
    # insufficient_funds: retrying tomorrow rarely helps; start later so a salary can land.
    insufficient_funds_schedule: tuple[timedelta, ...] = _days(3, 5, 7, 8, 10, 11, 12, 13)
    # Mails to a customer whose action we wait for (authentication, new card), after the failure.
    reminder_schedule: tuple[timedelta, ...] = _days(1, 3, 7)
    # After this long since the first failure the charge is given up, whatever its state.
    give_up_after: timedelta = timedelta(days=14)
    # A retry whose scheduled time already passed (queue paused, worker down) waits at least this.
    min_retry_gap: timedelta = timedelta(hours=1)
    final_subscription_status: SubscriptionStatus = SubscriptionStatus.unpaid
    # Tell a customer who had a failed payment that it went through in the end.
    notify_recovered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "final_subscription_status", SubscriptionStatus(self.final_subscription_status))
        if self.final_subscription_status not in (SubscriptionStatus.unpaid, SubscriptionStatus.canceled):
            raise ValueError("final_subscription_status must be unpaid or canceled")
        if self.give_up_after <= timedelta(0):
            raise ValueError("give_up_after must be positive")
        for name in ("retry_schedule", "try_again_later_schedule", "insufficient_funds_schedule",
                     "reminder_schedule"):
            steps = getattr(self, name)
            if any(s <= timedelta(0) for s in steps) or any(b <= a for a, b in pairwise(steps)):
                raise ValueError(f"{name} must be positive and strictly increasing")
            if steps and steps[-1] >= self.give_up_after:
                raise ValueError(f"{name} must end before give_up_after")

    @classmethod
    def from_settings(cls, settings, **overrides) -> DunningConfig:
        """The defaults, with ``BILLING_FINAL_SUBSCRIPTION_STATUS`` applied."""
        return cls(final_subscription_status=settings.final_subscription_status, **overrides)

    def schedule_for(self, decline_code: str | None, advice_code: str | None) -> tuple[timedelta, ...]:
        if advice_code == "try_again_later" or decline_code in self.try_again_later_codes:
            return self.try_again_later_schedule
        if decline_code == "insufficient_funds":
            return self.insufficient_funds_schedule
        return self.retry_schedule


@dataclass(frozen=True)
class Decision:
    """What to do now. The caller applies it in the transaction that records the outcome.

    ``notify`` is the email for this failure event (key it by charge and attempt so a redelivery
    writes it once); ``reminders`` are send times for reminder emails (key them by charge and index:
    one set per charge, however often it enters a waiting state). ``first_failed_at`` is the value the
    charge should hold afterwards.
    """

    charge_status: ChargeStatus
    next_retry_at: datetime | None = None
    notify: NotificationKind | None = None
    reminders: tuple[datetime, ...] = ()
    give_up: bool = False
    alert: bool = False
    decline_class: DeclineClass | None = None
    first_failed_at: datetime | None = None
    reason: str = ""
    # When the sweep gives a charge that still waits up; stored apart from ``next_retry_at``, which is
    # only ever the next automatic retry.
    give_up_at: datetime | None = None


def give_up_at(first_failed_at: datetime, config: DunningConfig) -> datetime:
    return first_failed_at + config.give_up_after


def _require_aware(**values: datetime | None) -> None:
    for name, value in values.items():
        if value is not None and value.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware")


def _give_up(first_failed_at: datetime | None, config: DunningConfig, reason: str,
             decline_class: DeclineClass | None = None) -> Decision:
    return Decision(charge_status=ChargeStatus.uncollectible,
                    notify=NotificationKind.final_notice, give_up=True,
                    decline_class=decline_class, first_failed_at=first_failed_at, reason=reason)


def decide_give_up(first_failed_at: datetime | None, now: datetime, config: DunningConfig) -> Decision | None:
    """For the periodic sweep: the give-up decision for a charge waiting on the customer (authentication
    required, hard decline, invalid request) once its horizon has passed; ``None`` while it has not."""
    _require_aware(first_failed_at=first_failed_at, now=now)
    if first_failed_at is None or now < give_up_at(first_failed_at, config):
        return None
    return _give_up(first_failed_at, config, "no payment within the dunning horizon")


def _reminders(now: datetime, horizon: datetime, config: DunningConfig) -> tuple[datetime, ...]:
    return tuple(t for t in (now + step for step in config.reminder_schedule) if t < horizon)


def _held_for_review(outcome: PaymentOutcome, first_failed_at: datetime | None) -> Decision:
    """Stripe refused the request itself: the card was never tried, so this is nothing the customer
    did and nothing they can fix. No email, no reminder, no retry and no give-up horizon: staff fix
    the cause (amount, currency, customer) and retry, or void. The subscription is ``past_due``, as
    for any open failure, so no next period opens over it. The dunning clock (``first_failed_at``) is
    left as it was: it measures the customer's time to pay, which has not started if they were never
    asked."""
    return Decision(ChargeStatus.needs_review, alert=True,
                    first_failed_at=first_failed_at, reason=f"refused by Stripe: {outcome.error_code or '-'}")


def decide(outcome: PaymentOutcome, *, failures: int, first_failed_at: datetime | None,
           now: datetime, config: DunningConfig) -> Decision:
    """The next step for a charge after ``outcome``.

    ``failures`` is how many card declines of this charge count toward the retry schedule, this one
    included when it counts (1 = the scheduled charge declined, 2 = the first retry declined too, …).
    Attempts abandoned before Stripe answered and staff retries do not count, so neither an outage
    nor a staff "retry now" uses up the customer's schedule. ``first_failed_at`` is the charge's
    value *before* this outcome (``None`` if it never failed), so "first failure" means
    ``first_failed_at is None``. The subscription's status is not decided here: it follows from its
    charges (:mod:`billing.state`).
    """
    if failures < 0:
        raise ValueError("failures cannot be negative")
    _require_aware(first_failed_at=first_failed_at, now=now)
    kind = OutcomeKind(outcome.kind)

    if kind is OutcomeKind.succeeded:
        recovered = first_failed_at is not None
        return Decision(ChargeStatus.paid,
                        notify=NotificationKind.payment_succeeded if recovered and config.notify_recovered else None,
                        first_failed_at=first_failed_at, reason="paid")
    if kind is OutcomeKind.processing:
        # Settled later by webhook or reconciler.
        return Decision(ChargeStatus.processing, first_failed_at=first_failed_at, reason="processing")

    if kind is OutcomeKind.refused:
        return _held_for_review(outcome, first_failed_at)

    # Every other outcome is a failure.
    first = first_failed_at is None
    failed_at = now if first else first_failed_at
    horizon = give_up_at(failed_at, config)
    if now >= horizon:
        return _give_up(failed_at, config, "dunning horizon passed")

    if kind is OutcomeKind.authentication_required or (
            kind is OutcomeKind.declined and outcome.decline_code == "authentication_required"):
        # No blind off-session retry: the issuer wants the customer. The charge waits until the
        # horizon, when decide_give_up gives it up.
        return Decision(ChargeStatus.authentication_required, give_up_at=horizon,
                        notify=NotificationKind.authentication_required,
                        reminders=_reminders(now, horizon, config), first_failed_at=failed_at,
                        reason="authentication required")

    if kind in (OutcomeKind.invalid_request, OutcomeKind.canceled):
        # No usable saved card (ours, before any request), or the PaymentIntent canceled: no retry can
        # fix it, a new card can; someone should look at why it happened.
        return Decision(ChargeStatus.requires_payment_method,
                        notify=NotificationKind.payment_failed, reminders=_reminders(now, horizon, config),
                        give_up_at=horizon, alert=True, first_failed_at=failed_at,
                        reason=f"{kind.value}: {outcome.error_code or '-'}")

    decline_class = classify_decline(outcome.decline_code, outcome.advice_code, outcome.error_code)
    if decline_class is DeclineClass.hard:
        return Decision(ChargeStatus.requires_payment_method,
                        notify=NotificationKind.payment_failed, reminders=_reminders(now, horizon, config),
                        give_up_at=horizon, decline_class=decline_class, first_failed_at=failed_at,
                        reason=f"hard decline: {outcome.decline_code or outcome.error_code or '-'}")

    schedule = config.schedule_for(outcome.decline_code, outcome.advice_code)
    index = max(failures - 1, 0)  # counted retries already made
    if index >= len(schedule):
        return _give_up(failed_at, config, f"{len(schedule)} retries exhausted", decline_class)
    retry_at = max(failed_at + schedule[index], now + config.min_retry_gap)
    if retry_at >= horizon:
        return _give_up(failed_at, config, "no retry fits before the dunning horizon", decline_class)
    return Decision(ChargeStatus.requires_payment_method,
                    next_retry_at=retry_at, give_up_at=horizon,
                    notify=NotificationKind.payment_failed if first else None, decline_class=decline_class,
                    first_failed_at=failed_at,
                    reason=f"soft decline: {outcome.decline_code or outcome.error_code or '-'}")


__all__ = ["ADVICE_TABLE", "DECLINE_TABLE", "LINK_KINDS", "REFUSAL_TABLE", "Decision",
           "DeclineClass", "DunningConfig", "NotificationKind", "classify_decline", "decide", "decide_give_up",
           "explain_decline", "explain_refusal", "give_up_at"]
