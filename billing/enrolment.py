"""Enrolment: customers, saved cards and subscriptions — the service functions behind the JSON API.

Each function owns its units of work, and no transaction stays open across a Stripe call: a local row
is committed first, then Stripe is called with an idempotency key derived from that row, then the
answer is stored. A re-run after a crash in between completes the same Stripe object instead of
creating a second one (ARCHITECTURE practices 1, 4, 5).

Errors are our own exceptions (:class:`NotFound`, :class:`InvalidInput`, :class:`Conflict`), which the
API turns into 404/422/409; :class:`~billing.outcomes.TemporaryStripeError` passes through (503).

A subscription may be created before the customer has a card: it is charged from whatever card is
the customer's default when a period falls due, and a period due without one fails like a declined
card (``requires_payment_method``), which sends the customer a link to give a card.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from billing import money, recovery, state, stripe_gateway
from billing.clock import utcnow
from billing.db import unit_of_work
from billing.models import (
    AuditEntry,
    CardSetup,
    Charge,
    Customer,
    Interval,
    PaymentMethod,
    Subscription,
    SubscriptionStatus,
)
from billing.outcomes import CardDetails, PaymentGateway, SetupResult, TemporaryStripeError
from billing.text import CONTROL_MESSAGE, has_control_characters

log = logging.getLogger(__name__)

# SetupIntent statuses after which Stripe will not change the object any more.
FINAL_SETUP_STATUSES = ("succeeded", "canceled")
# The largest amount of any currency (each currency has its own, see billing.money).
MAX_AMOUNT = money.MAX_AMOUNT
# A subscription's first period may start a little in the past (clocks differ, a request is retried),
# never so far back that it is billed for periods that went by: this is how far.
START_AT_GRACE = timedelta(hours=1)
# ... and not so far ahead that it is surely a typo (2062 for 2026).
START_AT_HORIZON = timedelta(days=366)
# Stripe refuses billing intervals longer than three years.
MAX_INTERVAL_COUNT = {Interval.day: 3 * 365, Interval.week: 3 * 52, Interval.month: 36, Interval.year: 3}
# Cards saved before these dates may be charged off-session under a previous authorization agreement
# (SCA grandfathering): the UK's cutoff was later than the EEA's.
PREVIOUS_AUTHORIZATION_CUTOFF = {"GB": date(2021, 9, 14)}
PREVIOUS_AUTHORIZATION_CUTOFF_DEFAULT = date(2020, 12, 31)
# A Stripe object id (``pm_…``, ``seti_…``): anything else is not one, and is never looked up.
_STRIPE_ID = re.compile(r"[A-Za-z0-9_]{3,255}")
# BCP 47 language tags as far as customer texts need them: language, optional script, optional region.
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:-([A-Za-z]{4}))?(?:-([A-Za-z]{2}|[0-9]{3}))?")


class EnrolmentError(Exception):
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details


class NotFound(EnrolmentError):
    code = "not_found"


class InvalidInput(EnrolmentError):
    code = "invalid_input"


class Conflict(EnrolmentError):
    code = "conflict"



def _stripe_request(call, *args, **kwargs):
    """Run a gateway call, turning Stripe's permanent request errors (a 400/404 such as an unknown
    ``pm_…`` id) into :class:`InvalidInput` with Stripe's code, without importing stripe here."""
    try:
        return call(*args, **kwargs)
    except (TemporaryStripeError, EnrolmentError):
        raise
    except Exception as exc:
        status = getattr(exc, "http_status", None)
        if status in (400, 402, 404):
            code = getattr(exc, "code", None) or "invalid_request"
            message = getattr(exc, "user_message", None) or "Stripe refused the request"
            raise InvalidInput(message, code=code) from None
        raise


# --- customers -----------------------------------------------------------------------------------

def refuse_control_characters(**fields: str | None) -> None:
    """422 ``invalid_request`` naming the first field that holds a control character (billing.text)."""
    for name, value in fields.items():
        if isinstance(value, str) and has_control_characters(value):
            raise InvalidInput(f"{name}: {CONTROL_MESSAGE}", code="invalid_request", field=name)


def validate_customer(email: str, name: str, country: str | None) -> tuple[str, str, str | None]:
    """The customer's fields as stored: the email in its normalized form, the name trimmed.

    Control characters are refused before anything is trimmed: a name ending in LF is refused, not
    quietly shortened. Emails are checked for syntax by ``email-validator``
    (https://pypi.org/project/email-validator/), not for deliverability: no DNS lookup on a request.
    Only addresses every mail server can take are accepted: no internationalised local part (it needs
    the server's SMTPUTF8), and an internationalised domain is stored in its ASCII (IDNA) form.
    """
    refuse_control_characters(email=email, name=name, country=country)
    email, name = (email or "").strip(), (name or "").strip()
    try:
        checked = validate_email(email, check_deliverability=False, allow_smtputf8=False)
        email = checked.ascii_email or checked.normalized
    except EmailNotValidError as exc:
        raise InvalidInput(f"email must be an email address: {exc}", field="email") from None
    if len(email) > 320:
        raise InvalidInput("email must be an email address of at most 320 characters", field="email")
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1 to 200 characters", field="name")
    if country is not None:
        country = country.strip().upper()
        if not re.fullmatch(r"[A-Z]{2}", country):
            raise InvalidInput("country must be an ISO 3166-1 alpha-2 code such as DE", field="country")
    return email, name, country


def validate_locale(locale: str | None) -> str | None:
    """A language tag such as ``en``, ``de-DE`` or ``zh-Hant-TW``, in its usual casing."""
    if locale is None:
        return None
    refuse_control_characters(locale=locale)
    match = _LOCALE.fullmatch(locale.strip())
    if not match:
        raise InvalidInput("locale must be a language tag such as en or de-DE", field="locale")
    language, script, region = match.groups()
    return "-".join(p for p in (language.lower(), script and script.title(), region and region.upper()) if p)


def create_customer(email: str, name: str, country: str | None = None, *, locale: str | None = None,
                    gateway: PaymentGateway | None = None) -> Customer:
    """Insert the customer, commit, then create the Stripe customer keyed ``customer-<id>-<random>``.

    If Stripe cannot be reached the customer is still returned, without ``stripe_customer_id``; the
    next card setup (or :func:`ensure_stripe_customer`) completes it with the same key.

    ``locale`` is checked but not stored yet: customers have no locale column, so their texts are in
    ``BILLING_DEFAULT_LOCALE``.
    """
    email, name, country = validate_customer(email, name, country)
    validate_locale(locale)
    with unit_of_work() as uow:
        customer = Customer(email=email, name=name, country=country)
        uow.session.add(customer)
        uow.commit()
    try:
        return ensure_stripe_customer(customer.id, gateway=gateway)
    except TemporaryStripeError:
        log.warning("Stripe customer not created yet; completed on first use", extra={"customer_id": customer.id})
        return customer


def ensure_stripe_customer(customer_id: int, *, gateway: PaymentGateway | None = None) -> Customer:
    with unit_of_work() as uow:
        customer = _get_customer(uow.session, customer_id)
        _keep(uow)
    if customer.stripe_customer_id:
        return customer
    # The key stored on our row: a re-run replays the first creation instead of making a second Stripe
    # customer. Our id in metadata, with the installation's (added by the gateway), for after Stripe
    # has pruned the key.
    gw = stripe_gateway.resolve(gateway)
    stripe_id = _stripe_request(gw.create_customer, email=customer.email, name=customer.name,
                                metadata={"customer_id": str(customer.id)},
                                idempotency_key=_stripe_create_key(customer.id))
    with unit_of_work() as uow:
        customer = uow.session.get(Customer, customer_id, with_for_update=True)
        if not customer.stripe_customer_id:
            customer.stripe_customer_id = stripe_id
        uow.commit()
    return customer


def _stripe_create_key(customer_id: int) -> str:
    """``customer-<id>-<random>``, drawn once and stored before the first try. The id alone would
    collide at Stripe, which keeps keys per account for 24 h: a restored database or another
    installation on the account reuses ids, and would be answered with someone else's customer."""
    with unit_of_work() as uow:
        customer = uow.session.get(Customer, customer_id, with_for_update=True)
        if customer.stripe_create_key is None:
            customer.stripe_create_key = f"customer-{customer.id}-{secrets.token_hex(6)}"
        key = customer.stripe_create_key
        uow.commit()
    return key


def _keep(uow) -> None:
    """Detach what a read-only unit of work loaded, so the rollback that ends it does not expire the
    objects the caller is about to read."""
    uow.session.expunge_all()


def _get_customer(session: Session, customer_id: int, *, lock: bool = False) -> Customer:
    customer = session.get(Customer, customer_id, with_for_update=lock) if _is_id(customer_id) else None
    if customer is None:
        raise NotFound(f"customer {customer_id} not found")
    return customer


def _is_id(value: Any) -> bool:
    # Larger than a BIGINT can never be one of ours, and PostgreSQL would refuse to compare it.
    return isinstance(value, int) and 0 < value < 2**63


# --- cards -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CardSetupView:
    setup: CardSetup
    payment_method: PaymentMethod | None
    client_secret: str | None = None
    setup_url: str | None = None

    @property
    def error_code(self) -> str | None:
        return self.setup.last_error_code


def create_card_setup(customer_id: int, payment_method: str | None = None, *, request_key: str | None = None,
                      gateway: PaymentGateway | None = None) -> CardSetupView:
    """A SetupIntent (``usage=off_session``) for the customer; with ``payment_method``, confirmed now.

    The result may be ``succeeded`` (the card is saved and becomes the default), ``requires_action``
    (3-D Secure: the customer finishes on the setup page or with Stripe.js and the client secret) or
    ``requires_payment_method`` with ``error_code`` (declined). ``request_key`` (the client's
    Idempotency-Key) makes a repeated request return the same SetupIntent.
    """
    refuse_control_characters(payment_method=payment_method)
    if payment_method is not None and not _STRIPE_ID.fullmatch(payment_method):
        raise InvalidInput("payment_method must be a Stripe PaymentMethod id such as pm_…", field="payment_method")
    customer = ensure_stripe_customer(customer_id, gateway=gateway)
    gw = stripe_gateway.resolve(gateway)
    if request_key:
        key = f"card-setup-{customer.id}-{hashlib.sha256(request_key.encode()).hexdigest()[:32]}"
    else:
        key = f"card-setup-{customer.id}-{uuid.uuid4().hex}"
    result = _stripe_request(gw.create_setup_intent, customer_id=customer.stripe_customer_id,
                             payment_method=payment_method, idempotency_key=key,
                             metadata={"customer_id": str(customer.id)})
    card = _card_for(gw, result)
    with unit_of_work() as uow:
        s = uow.session
        setup = _record_setup(s, customer.id, result)
        pm = _save_from_setup(s, setup, result, card)
        token = recovery.issue_token(s, customer_id=customer.id, purpose=recovery.Purpose.setup,
                                     card_setup_id=setup.id)
        uow.commit()
    log.info("card setup created", extra={"customer_id": customer.id, "setup_intent_id": result.setup_intent_id,
                                          "status": result.status, "error_code": result.error_code})
    secret = result.client_secret if result.status not in FINAL_SETUP_STATUSES else None
    return CardSetupView(setup=setup, payment_method=pm, client_secret=secret,
                         setup_url=recovery.link(token, recovery.Purpose.setup))


def refresh_card_setup(setup_intent_id: str, *, gateway: PaymentGateway | None = None) -> CardSetupView:
    """The card setup as we know it, refreshed from Stripe while it is not final.

    A refresh that cannot reach Stripe returns what is stored: a status read is never worth a 503.
    An id that cannot be a SetupIntent's (NUL, a slash, 300 characters) is not looked up: 404.
    """
    if not isinstance(setup_intent_id, str) or not _STRIPE_ID.fullmatch(setup_intent_id):
        raise NotFound("card setup not found")
    with unit_of_work() as uow:
        setup = uow.session.scalars(select(CardSetup).where(CardSetup.setup_intent_id == setup_intent_id)).first()
        if setup is None:
            raise NotFound(f"card setup {setup_intent_id} not found")
        pm = uow.session.get(PaymentMethod, setup.payment_method_id) if setup.payment_method_id else None
        _keep(uow)
    if setup.status in FINAL_SETUP_STATUSES and (pm or setup.status != "succeeded"):
        return CardSetupView(setup=setup, payment_method=pm)
    gw = stripe_gateway.resolve(gateway)
    try:
        result = gw.retrieve_setup_intent(setup_intent_id)
        card = _card_for(gw, result)
    except TemporaryStripeError:
        log.warning("card setup not refreshed: Stripe unavailable", extra={"setup_intent_id": setup_intent_id})
        return CardSetupView(setup=setup, payment_method=pm)
    with unit_of_work() as uow:
        setup = _record_setup(uow.session, setup.customer_id, result)
        pm = _save_from_setup(uow.session, setup, result, card)
        uow.commit()
    return CardSetupView(setup=setup, payment_method=pm)


def _card_for(gateway, result: SetupResult) -> CardDetails | None:
    if result.status != "succeeded" or not result.payment_method_id:
        return None
    return _stripe_request(gateway.retrieve_payment_method, result.payment_method_id)


def _record_setup(s: Session, customer_id: int, result: SetupResult) -> CardSetup:
    setup = s.scalars(select(CardSetup).where(CardSetup.setup_intent_id == result.setup_intent_id)
                      .with_for_update()).first()
    if setup is None:
        setup = CardSetup(customer_id=customer_id, setup_intent_id=result.setup_intent_id)
        s.add(setup)
    if setup.status not in FINAL_SETUP_STATUSES:
        setup.status = result.status
    setup.last_error_code = result.error_code
    setup.last_error_message = result.error_message
    setup.updated_at = utcnow()
    s.flush()
    return setup


def _save_from_setup(s: Session, setup: CardSetup, result: SetupResult,
                     card: CardDetails | None) -> PaymentMethod | None:
    if setup.payment_method_id:
        return s.get(PaymentMethod, setup.payment_method_id)
    if card is None:
        return None
    customer = s.get(Customer, setup.customer_id)
    pm = save_payment_method(s, customer, card, saved_at=utcnow(), setup=result)
    setup.payment_method_id = pm.id
    return pm


def save_payment_method(s: Session, customer: Customer, card: CardDetails, *, saved_at: datetime,
                        setup: SetupResult | None = None, previous_authorization: bool = False) -> PaymentMethod:
    """Store a card the customer saved and make it their default, and their subscriptions' card.

    One row per card per customer: the same card saved again (same fingerprint, even as a new
    PaymentMethod) updates the existing row, so its history and references stay. The customer row is
    locked first, so two concurrent saves of one card cannot both insert.
    """
    s.execute(select(Customer.id).where(Customer.id == customer.id).with_for_update())
    row = s.scalars(select(PaymentMethod).where(
        PaymentMethod.stripe_payment_method_id == card.payment_method_id)).first()
    if row is None and card.fingerprint:
        row = s.scalars(select(PaymentMethod).where(PaymentMethod.customer_id == customer.id,
                                                    PaymentMethod.fingerprint == card.fingerprint)).first()
    if row is None:
        row = PaymentMethod(customer_id=customer.id, stripe_payment_method_id=card.payment_method_id, saved_at=saved_at)
        s.add(row)
    elif row.customer_id != customer.id:
        raise Conflict("this card belongs to another customer", code="payment_method_in_use")
    row.stripe_payment_method_id = card.payment_method_id
    row.brand, row.last4, row.country, row.fingerprint = card.brand, card.last4, card.country, card.fingerprint
    row.exp_month, row.exp_year = card.exp_month, card.exp_year
    if setup is not None:
        row.setup_intent_id = setup.setup_intent_id
        row.mandate_id = setup.mandate_id
    row.previous_authorization = previous_authorization
    row.saved_at = saved_at
    row.detached_at = None
    s.flush()
    customer.default_payment_method_id = row.id
    s.execute(update(Subscription)
              .where(Subscription.customer_id == customer.id, Subscription.status != SubscriptionStatus.canceled)
              .values(payment_method_id=row.id).execution_options(synchronize_session=False))
    s.flush()
    return row


def relies_on_previous_authorization(saved_at: datetime, card_country: str | None) -> bool:
    cutoff = PREVIOUS_AUTHORIZATION_CUTOFF.get((card_country or "").upper(), PREVIOUS_AUTHORIZATION_CUTOFF_DEFAULT)
    return saved_at.astimezone(UTC).date() <= cutoff


def import_payment_method(customer_id: int, payment_method: str, saved_at: datetime, *,
                          gateway: PaymentGateway | None = None) -> PaymentMethod:
    """Enrol a card the customer saved before this system existed (attached to their Stripe customer).

    Cards saved before the SCA cutoffs are recorded as relying on a previous authorization agreement:
    they are charged off-session like any other, and a bank's refusal is an ordinary decline.
    """
    refuse_control_characters(payment_method=payment_method)
    if not _STRIPE_ID.fullmatch(payment_method or ""):
        raise InvalidInput("payment_method must be a Stripe PaymentMethod id such as pm_…", field="payment_method")
    saved_at = saved_at if saved_at.tzinfo else saved_at.replace(tzinfo=UTC)
    if saved_at > utcnow():
        raise InvalidInput("saved_at is in the future", field="saved_at")
    customer = ensure_stripe_customer(customer_id, gateway=gateway)
    # Usually the card is attached to the customer already (that is how it was saved); a card that is
    # not is attached now.
    gw = stripe_gateway.resolve(gateway)
    card = _stripe_request(gw.retrieve_payment_method, payment_method)
    if card.customer_id is None:
        card = _stripe_request(gw.attach_payment_method, payment_method, customer.stripe_customer_id)
    if card.customer_id and card.customer_id != customer.stripe_customer_id:
        raise Conflict("this card is attached to another Stripe customer", code="payment_method_in_use")
    with unit_of_work() as uow:
        customer = _get_customer(uow.session, customer_id)
        pm = save_payment_method(uow.session, customer, card, saved_at=saved_at,
                                 previous_authorization=relies_on_previous_authorization(saved_at, card.country))
        uow.commit()
    return pm


# --- subscriptions ---------------------------------------------------------------------------------

def validate_subscription(amount: Any, currency: Any, interval: Any, interval_count: Any) -> tuple[int, str, str, int]:
    """Amount and currency by Stripe's rules (:func:`billing.money.validate_amount`), interval by ours."""
    try:
        amount, currency = money.validate_amount(amount, currency)
    except money.MoneyError as exc:
        raise InvalidInput(exc.message, field=exc.field) from None
    if interval not in Interval.__members__:
        raise InvalidInput("interval must be one of day, week, month, year", field="interval")
    limit = MAX_INTERVAL_COUNT[Interval(interval)]
    if isinstance(interval_count, bool) or not isinstance(interval_count, int) or not 0 < interval_count <= limit:
        raise InvalidInput(f"interval_count must be from 1 to {limit} for {interval}", field="interval_count")
    return amount, currency, interval, interval_count


def validate_start_at(start_at: Any, now: datetime) -> datetime:
    """The first period's start in UTC: ``now`` if not given, else a zoned time in the window.

    The window is :data:`START_AT_GRACE` before ``now`` to :data:`START_AT_HORIZON` after it. A start
    further back would be billed at once for every period since (a start of 1970 is 20,000 daily
    charges); a time without a zone is refused rather than guessed.
    """
    if start_at is None:
        return now
    if not isinstance(start_at, datetime) or start_at.utcoffset() is None:
        raise InvalidInput("start_at: must be a date and time with a zone offset, e.g. 2030-01-31T09:00:00+01:00",
                           field="start_at")
    start_at = start_at.astimezone(UTC)
    if start_at < now - START_AT_GRACE:
        raise InvalidInput(f"start_at: no earlier than {_duration(START_AT_GRACE)} before now", field="start_at")
    if start_at > now + START_AT_HORIZON:
        raise InvalidInput(f"start_at: no later than {_duration(START_AT_HORIZON)} from now", field="start_at")
    return start_at


def _duration(delta: timedelta) -> str:
    hours = int(delta.total_seconds() // 3600)
    if hours < 48:
        return f"{hours} hour" + ("s" if hours != 1 else "")
    return f"{hours // 24} days"


def create_subscription(customer_id: int, amount: int, currency: str, interval: str, interval_count: int = 1,
                        start_at: datetime | None = None) -> Subscription:
    """An active subscription whose first period starts at ``start_at`` (default: now), charged then.

    It charges the customer's default card at the time each period falls due (none yet is allowed,
    see the module docstring). ``start_at`` must carry a zone and lie between
    :data:`START_AT_GRACE` (1 hour) before now and :data:`START_AT_HORIZON` (366 days) after it.
    """
    amount, currency, interval, interval_count = validate_subscription(amount, currency, interval, interval_count)
    anchor = validate_start_at(start_at, utcnow())
    with unit_of_work() as uow:
        customer = _get_customer(uow.session, customer_id)
        sub = Subscription(customer_id=customer.id, payment_method_id=customer.default_payment_method_id,
                           amount=amount, currency=currency, interval=interval, interval_count=interval_count,
                           anchor_at=anchor.astimezone(UTC), next_period_index=0, next_charge_at=anchor.astimezone(UTC),
                           status=SubscriptionStatus.active)
        uow.session.add(sub)
        uow.commit()
    log.info("subscription created", extra={"subscription_id": sub.id, "customer_id": customer_id})
    return sub


def cancel_subscription(subscription_id: int, *, actor: str = "api", reason: str | None = None) -> Subscription:
    """Stop billing the subscription. Canceling one already canceled changes nothing (and is no error).

    Periods already opened are left as they are: a charge in flight finishes, and what is owed stays
    in the retry queue for finance to collect or void.
    """
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, subscription_id, with_for_update=True) if _is_id(subscription_id) else None
        if sub is None:
            raise NotFound(f"subscription {subscription_id} not found")
        previous = sub.status
        if state.cancel_subscription(sub, now=utcnow()):
            uow.session.add(AuditEntry(actor=actor, action="cancel_subscription", subscription_id=sub.id,
                                       reason=reason, details={"previous_status": previous}))
        uow.commit()
    return sub


def get_subscription(subscription_id: int) -> tuple[Subscription, list[Charge]]:
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, subscription_id) if _is_id(subscription_id) else None
        if sub is None:
            raise NotFound(f"subscription {subscription_id} not found")
        charges = list(uow.session.scalars(select(Charge).where(Charge.subscription_id == sub.id)
                                           .order_by(Charge.period_index)))
        _keep(uow)
    return sub, charges
