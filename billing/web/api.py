"""The JSON API (``/api/…``): enrolment of customers, cards and subscriptions.

Handlers are thin: parse with the Pydantic models below (which are also the OpenAPI schema), call one
:mod:`billing.enrolment` function (it owns the transactions and the Stripe calls), shape the answer.

Errors, all ``{"error": {"code", "message", …}}`` (see :mod:`billing.web.app`):

- 401 ``unauthorized`` without a live API key (``Authorization: Bearer <key>``); 403 ``forbidden`` for
  a ``read`` key on a write. Checked before the body is parsed (:mod:`billing.web.auth`).
- 400 ``malformed_json``; 422 ``invalid_request`` (schema, or a control character such as NUL, CR or
  LF in any text: the message names the field) or ``invalid_input`` (a value the service refuses:
  email, a currency Stripe does not support, an amount outside Stripe's minimum and maximum for its
  currency, ``start_at`` outside its window, interval_count, an unknown ``pm_…`` id, with Stripe's code).
- 413 ``payload_too_large`` for a body over 64 KiB (:mod:`billing.web.limits`).
- 404 ``not_found`` for an unknown customer, subscription or card setup, and for an id that cannot be
  one (beyond BIGINT, negative, or a card setup id with characters Stripe never uses).
- 402 with Stripe's code (``card_declined``, ``expired_card``, …) when the card given for a card
  setup is declined: the same status Stripe answers a card error with. The card setup is recorded
  (``setup_intent_id`` in the error) and the client may retry with another card.
- 409 ``payment_method_in_use`` when the card belongs to another customer.
- 503 ``stripe_unavailable`` (with ``Retry-After``) when Stripe could not be reached; nothing was
  half-done that a retry of the same request would duplicate.

``client_secret`` appears only in the card-setup response, for Stripe.js; it is never logged.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Security
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from billing import enrolment
from billing.models import Charge, PaymentMethod, Subscription
from billing.text import CONTROL_MESSAGE, has_control_characters
from billing.web import auth, metrics


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorBody} for status in statuses}


# Every route needs a key (401 without a live one, 403 for a read key on a write): see billing.web.auth.
router = APIRouter(prefix="/api", tags=["api"], route_class=auth.KeyCheckedRoute,
                   dependencies=[Security(auth.api_key)], responses=_errors(401, 403))


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_control_characters(value: str) -> str:
    if has_control_characters(value):
        raise PydanticCustomError("control_characters", CONTROL_MESSAGE)
    return value


# Text a client sends: control characters (NUL, CR, LF, …: billing.text) are a 422 naming the field.
# The pattern says the same in OpenAPI (the check itself is ours, for its message).
Text = Annotated[str, AfterValidator(_no_control_characters),
                 Field(json_schema_extra={"pattern": "^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$"})]

_ZONED_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:[Zz]|[+-]\d{2}:\d{2})")


def _zoned_time_string(value: object) -> object:
    # Pydantic alone would also take 0 (a Unix time), a date alone, or a time without a zone.
    if isinstance(value, datetime) or (isinstance(value, str) and _ZONED_TIME.fullmatch(value)):
        return value
    raise PydanticCustomError("zoned_datetime", "must be an ISO 8601 date and time with a zone offset, "
                                                "e.g. 2030-01-31T09:00:00+01:00")


# An ISO 8601 string with its zone: ``2030-01-31T09:00:00+01:00`` or ``…Z``.
ZonedDateTime = Annotated[AwareDatetime, BeforeValidator(_zoned_time_string)]
_LOCALE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?$"


def _digits_only(value: object) -> object:
    # int() would take "1\r" or " 1" or "1_000"; an id in a path is digits (a sign at most), nothing else.
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]{1,40}", value):
        raise PydanticCustomError("int_parsing", "must be a whole number")
    return value


# An id in a path. One beyond BIGINT, zero or negative is no row's: the service answers 404 for it.
PathId = Annotated[int, BeforeValidator(_digits_only)]


# --- customers -------------------------------------------------------------------------------------

class CustomerIn(Request):
    email: Text = Field(max_length=320, examples=["ada@example.com"], json_schema_extra={"format": "email"},
                        description="checked by email-validator, stored in its normalized form")
    name: Text = Field(max_length=200, examples=["Ada Lovelace"])
    country: Text | None = Field(default=None, max_length=64, description="ISO 3166-1 alpha-2", examples=["DE"])
    locale: str | None = Field(default=None, max_length=35, pattern=_LOCALE_PATTERN, examples=["de-DE"],
                                description="BCP 47 language tag for the customer's texts: language, script, region")


class CustomerOut(BaseModel):
    id: int
    email: str
    stripe_customer_id: str | None = Field(
        description="null only if Stripe could not be reached; completed on the first card setup")


@router.post("/customers", status_code=201, response_model=CustomerOut, responses=_errors(400, 422))
def create_customer(body: CustomerIn) -> CustomerOut:
    customer = enrolment.create_customer(body.email, body.name, body.country, locale=body.locale)
    metrics.CUSTOMERS_CREATED.inc()
    return CustomerOut(id=customer.id, email=customer.email, stripe_customer_id=customer.stripe_customer_id)


# --- cards -----------------------------------------------------------------------------------------

class CardSetupIn(Request):
    payment_method: Text | None = Field(
        default=None, max_length=255, examples=["pm_card_visa"],
        description="confirm server-side with this PaymentMethod; omit to finish with Stripe.js")


class CardSetupCreated(BaseModel):
    setup_intent_id: str
    status: str = Field(examples=["succeeded", "requires_action", "requires_payment_method"])
    client_secret: str | None = Field(default=None, description="for Stripe.js, while the setup is not final")
    setup_url: str = Field(description="page where the customer gives or authenticates the card")


class PaymentMethodOut(BaseModel):
    id: str = Field(description="Stripe PaymentMethod id", examples=["pm_1Q…"])
    brand: str | None
    last4: str | None
    country: str | None
    mandate_id: str | None


class CardSetupOut(BaseModel):
    setup_intent_id: str
    status: str
    payment_method: PaymentMethodOut | None


def _pm_out(pm: PaymentMethod | None) -> PaymentMethodOut | None:
    if pm is None:
        return None
    return PaymentMethodOut(id=pm.stripe_payment_method_id, brand=pm.brand, last4=pm.last4, country=pm.country,
                            mandate_id=pm.mandate_id)


@router.post("/customers/{customer_id}/card-setups", status_code=201, response_model=CardSetupCreated,
             response_model_exclude_none=True, responses=_errors(400, 402, 404, 409, 422, 503))
def create_card_setup(customer_id: PathId, body: CardSetupIn | None = None,
                      idempotency_key: Annotated[str | None, Header(max_length=255)] = None):
    """Create a SetupIntent (``usage=off_session``); with ``payment_method``, confirm it server-side.

    A card that needs 3-D Secure answers 201 with status ``requires_action``; a declined card
    answers 402 with Stripe's code. Send an ``Idempotency-Key`` header to make a retried request
    return the same SetupIntent.
    """
    view = enrolment.create_card_setup(customer_id, body.payment_method if body else None,
                                       request_key=idempotency_key)
    metrics.CARD_SETUPS.labels(status=view.setup.status).inc()
    if view.error_code:
        return JSONResponse(status_code=402, content={"error": {
            "code": view.error_code, "message": view.setup.last_error_message or "the card was declined",
            "setup_intent_id": view.setup.setup_intent_id, "status": view.setup.status,
            # The customer can still save another card on this same SetupIntent's page.
            "setup_url": view.setup_url}})
    return CardSetupCreated(setup_intent_id=view.setup.setup_intent_id, status=view.setup.status,
                            client_secret=view.client_secret, setup_url=view.setup_url)


@router.get("/card-setups/{setup_intent_id}", response_model=CardSetupOut, responses=_errors(404))
def get_card_setup(setup_intent_id: str) -> CardSetupOut:
    """The card setup, refreshed from Stripe while it is not final."""
    view = enrolment.refresh_card_setup(setup_intent_id)
    return CardSetupOut(setup_intent_id=view.setup.setup_intent_id, status=view.setup.status,
                        payment_method=_pm_out(view.payment_method))


class PaymentMethodImportIn(Request):
    payment_method: Text = Field(max_length=255, examples=["pm_1Q…"])
    saved_at: datetime = Field(description="when the customer saved the card (no offset: UTC)")


class ImportedPaymentMethodOut(PaymentMethodOut):
    previous_authorization: bool = Field(
        description="saved before the SCA cutoff (EEA 2020-12-31, UK 2021-09-14): charged under a previous "
                    "authorization agreement")


@router.post("/customers/{customer_id}/payment-methods/import", status_code=201,
             response_model=ImportedPaymentMethodOut, responses=_errors(400, 404, 409, 422, 503))
def import_payment_method(customer_id: PathId, body: PaymentMethodImportIn) -> ImportedPaymentMethodOut:
    """Enrol a card saved earlier (attached to the customer in Stripe); it becomes the default."""
    pm = enrolment.import_payment_method(customer_id, body.payment_method, body.saved_at)
    return ImportedPaymentMethodOut(**_pm_out(pm).model_dump(), previous_authorization=pm.previous_authorization)


# --- subscriptions ---------------------------------------------------------------------------------

class SubscriptionIn(Request):
    customer_id: StrictInt
    amount: StrictInt = Field(gt=0, le=enrolment.MAX_AMOUNT, description="in the currency's minor unit",
                              examples=[1999])
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, stored lower-case", examples=["eur"])
    interval: Literal["day", "week", "month", "year"]
    interval_count: StrictInt = Field(default=1, ge=1)
    start_at: ZonedDateTime | None = Field(
        default=None,
        description="first period's start, with its zone (default now); from 1 hour before now to 366 days ahead")


class SubscriptionCreated(BaseModel):
    id: int
    status: str
    next_charge_at: datetime


class ChargeOut(BaseModel):
    id: int
    period_start: datetime
    period_end: datetime
    amount: int
    currency: str
    status: str
    payment_intent_id: str | None
    attempts: int
    last_error_code: str | None
    last_decline_code: str | None
    next_retry_at: datetime | None
    notified_at: datetime | None


class SubscriptionOut(SubscriptionCreated):
    charges: list[ChargeOut]


def _charge_out(c: Charge) -> ChargeOut:
    return ChargeOut(id=c.id, period_start=c.period_start, period_end=c.period_end, amount=c.amount,
                     currency=c.currency, status=c.status, payment_intent_id=c.payment_intent_id,
                     attempts=c.attempts, last_error_code=c.last_error_code, last_decline_code=c.last_decline_code,
                     next_retry_at=c.next_retry_at, notified_at=c.notified_at)


def _subscription_out(sub: Subscription, charges: list[Charge]) -> SubscriptionOut:
    return SubscriptionOut(id=sub.id, status=sub.status, next_charge_at=sub.next_charge_at,
                           charges=[_charge_out(c) for c in charges])


@router.post("/subscriptions", status_code=201, response_model=SubscriptionCreated,
             responses=_errors(400, 404, 422))
def create_subscription(body: SubscriptionIn) -> SubscriptionCreated:
    """An active subscription; its first period starts (and is charged) at ``start_at``.

    It charges the customer's default card when each period falls due. It may be created before the
    customer has a card: a period due without one fails as ``requires_payment_method`` and the
    customer is emailed a link to give a card.
    """
    sub = enrolment.create_subscription(body.customer_id, body.amount, body.currency, body.interval,
                                        body.interval_count, body.start_at)
    metrics.SUBSCRIPTIONS_CREATED.inc()
    return SubscriptionCreated(id=sub.id, status=sub.status, next_charge_at=sub.next_charge_at)


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut, responses=_errors(404))
def get_subscription(subscription_id: PathId) -> SubscriptionOut:
    return _subscription_out(*enrolment.get_subscription(subscription_id))


@router.post("/subscriptions/{subscription_id}/cancel", response_model=SubscriptionOut, responses=_errors(404))
def cancel_subscription(subscription_id: PathId) -> SubscriptionOut:
    """Stop billing. Idempotent: canceling a canceled subscription answers the same 200."""
    sub = enrolment.cancel_subscription(subscription_id)
    metrics.SUBSCRIPTIONS_CANCELED.inc()
    return _subscription_out(*enrolment.get_subscription(sub.id))
