"""Our own words for what Stripe answered: the gateway's output, the policies' input.

Nothing here imports stripe, so the dunning policy and the charging phases are tested as pure
functions (warehouse ``subscriptions/interfaces.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OutcomeKind(enum.StrEnum):
    succeeded = "succeeded"
    # Accepted, settled later by webhook or the reconciler (PaymentIntent status ``processing``).
    processing = "processing"
    # 402 ``authentication_required``, or a PaymentIntent left in ``requires_action`` off-session.
    authentication_required = "authentication_required"
    # 402 card_error: declined by the issuer (``decline_code``/``advice_code`` say how).
    declined = "declined"
    # 400/404 that no retry will fix: the card was detached, the customer deleted, a bad parameter.
    invalid_request = "invalid_request"
    canceled = "canceled"


@dataclass(frozen=True)
class PaymentOutcome:
    kind: OutcomeKind
    payment_intent_id: str | None = None
    payment_method_id: str | None = None
    error_code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    message: str | None = None

    @property
    def is_failure(self) -> bool:
        return self.kind in (OutcomeKind.authentication_required, OutcomeKind.declined,
                             OutcomeKind.invalid_request, OutcomeKind.canceled)


class TemporaryStripeError(Exception):
    """Network error, 5xx, 429 (also ``lock_timeout``) or ``idempotency_key_in_use`` that outlasted the
    gateway's own retries. The request may or may not have been processed: resend it later with the
    same idempotency key, never a new one.

    ``replayed``: Stripe answered with the error it saved under this key the first time (a 500 is
    saved and replayed for 24 h), so resending that key cannot succeed until it is pruned.
    https://docs.stripe.com/api/idempotent_requests"""

    def __init__(self, message: str = "", *, replayed: bool = False):
        super().__init__(message)
        self.replayed = replayed


@dataclass(frozen=True)
class CardDetails:
    payment_method_id: str
    customer_id: str | None
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    country: str | None
    fingerprint: str | None


@dataclass(frozen=True)
class SetupResult:
    setup_intent_id: str
    status: str
    client_secret: str | None
    payment_method_id: str | None
    mandate_id: str | None
    customer_id: str | None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class PaymentIntentView:
    """A PaymentIntent as a customer page needs it: its outcome, plus what Stripe.js needs to finish
    it on-session. ``client_secret`` lets whoever holds it confirm this one PaymentIntent from a
    browser: it goes into a page body, never into a URL or a log line."""

    outcome: PaymentOutcome
    status: str
    client_secret: str | None
    amount: int
    currency: str
    customer_id: str | None
    setup_future_usage: str | None
