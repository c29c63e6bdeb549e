"""Our own words for what Stripe answered: the gateway's output, the policies' input.

Nothing here imports stripe, so the dunning policy and the charging phases are tested as pure
functions (warehouse ``subscriptions/interfaces.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class OutcomeKind(enum.StrEnum):
    succeeded = "succeeded"
    # Accepted, settled later by webhook or the reconciler (PaymentIntent status ``processing``).
    processing = "processing"
    # 402 ``authentication_required``, or a PaymentIntent left in ``requires_action`` off-session.
    authentication_required = "authentication_required"
    # 402 card_error: declined by the issuer (``decline_code``/``advice_code`` say how).
    declined = "declined"
    # Ours, before any request: nothing to charge with (no usable saved card). The customer can fix
    # it by giving a card on the recovery page.
    invalid_request = "invalid_request"
    # Stripe refused the request itself (400/404 ``invalid_request_error``): an amount outside the
    # currency's limits, an unsupported currency, a deleted customer (``resource_missing``), a bad
    # parameter. Not the card's fault, so not the customer's to fix: held for staff (``needs_review``).
    # https://docs.stripe.com/api/errors (types), https://docs.stripe.com/error-codes
    refused = "refused"
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
    # What the PaymentIntent itself says (when read from one), for billing.ownership to compare with
    # our rows before the outcome is applied. Left out of equality: the outcome is the same outcome.
    amount: int | None = field(default=None, compare=False)
    currency: str | None = field(default=None, compare=False)
    customer_id: str | None = field(default=None, compare=False)
    metadata: dict[str, str] | None = field(default=None, compare=False)

    @property
    def is_failure(self) -> bool:
        return self.kind in (OutcomeKind.authentication_required, OutcomeKind.declined,
                             OutcomeKind.invalid_request, OutcomeKind.refused, OutcomeKind.canceled)


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


class StripeRequestRefused(Exception):
    """Stripe refused a request outside the charge path (a customer page reading or creating a
    PaymentIntent) with a 400/404 ``invalid_request_error``: resending it changes nothing.
    ``code`` is Stripe's error code (``amount_too_small``, ``resource_missing``…), if it sent one."""

    def __init__(self, message: str = "", *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status


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


@runtime_checkable
class ChargeGateway(Protocol):
    """What the charging phases and the reconciler need of the payment provider: our types in, our
    types out. Tests pass hand-written fakes of it (``tests/fakes.py``), so policies and phases are
    tested without HTTP (warehouse ``subscriptions/interfaces.py``)."""

    def charge_off_session(self, *, customer_id: str, payment_method_id: str, amount: int, currency: str,
                           mandate_id: str | None, metadata: dict[str, str],
                           idempotency_key: str) -> PaymentOutcome: ...

    def confirm_off_session(self, *, payment_intent_id: str, payment_method_id: str, mandate_id: str | None,
                            idempotency_key: str) -> PaymentOutcome: ...

    def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentOutcome: ...

    def find_payment_intent(self, *, customer_id: str, attempt_id: int,
                            attempt_key: str | None = None) -> PaymentOutcome | None: ...


@runtime_checkable
class PaymentGateway(ChargeGateway, Protocol):
    """The whole payment provider as the product sees it: charging, plus enrolment and the customer
    pages. :class:`billing.stripe_gateway.StripeGateway` is the real one (the only module that imports
    ``stripe``)."""

    def payment_intent_for_customer(self, payment_intent_id: str) -> PaymentIntentView: ...

    def create_payment_intent_on_session(self, *, customer_id: str, amount: int, currency: str,
                                         metadata: dict[str, str], idempotency_key: str) -> PaymentIntentView: ...

    def create_customer(self, *, email: str, name: str, metadata: dict[str, str] | None = None,
                        idempotency_key: str) -> str: ...

    def create_setup_intent(self, *, customer_id: str, payment_method: str | None,
                            idempotency_key: str, metadata: dict[str, str] | None = None) -> SetupResult: ...

    def confirm_setup_intent(self, setup_intent_id: str, *, payment_method: str,
                             idempotency_key: str) -> SetupResult: ...

    def retrieve_setup_intent(self, setup_intent_id: str) -> SetupResult: ...

    def retrieve_payment_method(self, payment_method_id: str) -> CardDetails: ...

    def attach_payment_method(self, payment_method_id: str, customer_id: str) -> CardDetails: ...

    def list_events(self, *, types: tuple[str, ...], created_gte: int | None = None,
                    delivery_success: bool | None = None, starting_after: str | None = None) -> EventPage: ...


@dataclass(frozen=True)
class EventPage:
    """One page of Stripe's event list, newest first: the events as plain dicts (what a webhook delivery's
    body parses to), and whether older ones follow (page on with ``starting_after`` = the last id)."""

    events: list[dict]
    has_more: bool
