"""The customer pages' services: finishing a card setup (``/setup/{token}``) and paying a failed
charge on-session (``/recover/{token}``). No FastAPI here: :mod:`billing.web.pages` renders what these
return.

Both pages work the same way: the server reads the Stripe object with the secret key, hands the page
its ``client_secret`` (in the HTML body, never a URL), Stripe.js finishes it in the browser (3-D Secure
included), and the page then tells the server it is done. The server never trusts what the browser
reports: it reads the object from Stripe again and records *that*.

Card setup (https://docs.stripe.com/payments/save-and-reuse,
https://docs.stripe.com/js/setup_intents/confirm_card_setup): the SetupIntent (``usage=off_session``)
was created by the API; the page confirms it with a card element, or, for a server-side setup left in
``requires_action``, runs only its next action (https://docs.stripe.com/js/setup_intents/handle_next_action).
:func:`complete_setup` refreshes it through :func:`billing.enrolment.refresh_card_setup`, which saves the
card (one row per fingerprint, the default for the customer's subscriptions) or records the failure
on the card setup.

Recovery (https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method, "start a
recovery flow"): the customer finishes *the same* PaymentIntent the off-session attempt left in
``requires_payment_method`` (or ``requires_action``), with ``stripe.confirmCardPayment(client_secret,
{payment_method})`` (https://docs.stripe.com/js/payment_intents/confirm_card_payment):

* the saved card: ``payment_method`` is its id; the issuer's 3-D Secure challenge appears;
* a new card: ``payment_method: {card: element}`` and ``setup_future_usage: "off_session"`` on that
  PaymentIntent, which saves the card for later off-session charges while it pays what is owed, in
  one customer action and one authentication (https://docs.stripe.com/payments/save-during-payment).
  A SetupIntent followed by a charge would ask the customer to authenticate twice for one card. On
  success Stripe attaches the card to the customer; :func:`complete_recovery` saves it as the
  customer's (and subscriptions') default, only if the PaymentIntent Stripe returns really carries
  ``setup_future_usage=off_session``.

The charge becomes ``paid`` through :func:`billing.charging.apply_outcome`, whichever of the webhook
(``payment_intent.succeeded``) and the page's return comes first: both lock the charge row, and
``apply_outcome`` ignores a charge already final, so the state change and its email happen once. The
page's return applies nothing while a charge attempt (scheduled or a staff "retry now") holds the
charge's lease (:func:`billing.charging.lease_held`), and the page makes a PaymentIntent only under
that lease itself (:func:`billing.charging.lease`): neither runs over the other.
A paid charge uses up its recovery links (:func:`billing.recovery.consume_for_charge`).

The page shows and settles only the charge's own PaymentIntent, for the charge's amount, currency and
customer (:mod:`billing.ownership`). One the page makes itself is keyed by the charge's stored
recovery key (``recover-charge-<id>-<random>``, also in its metadata); a canceled one is replaced under
a new key, never replayed (Stripe answers a reused key with what it first made for 24 h,
https://docs.stripe.com/api/idempotent_requests).

A charge held for staff (``needs_review``: Stripe refused the request itself, not the card) has nothing
for the customer to do, and neither has a charge whose PaymentIntent Stripe refuses to create or show:
both raise :class:`CannotPayOnline`, which the page answers with a clear error page, not a payment form.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import select

from billing import cards, charging, enrolment, ownership, recovery, state, stripe_gateway
from billing.clock import utcnow
from billing.db import unit_of_work
from billing.dunning import explain_decline
from billing.installation import installation_id
from billing.models import (
    CardSetup,
    Charge,
    ChargeStatus,
    Customer,
    PaymentMethod,
    RecoveryToken,
    Subscription,
)
from billing.notifications import format_amount
from billing.outcomes import (
    CardDetails,
    OutcomeKind,
    PaymentGateway,
    PaymentIntentView,
    StripeRequestRefused,
    TemporaryStripeError,
)
from billing.recovery import Purpose, TokenError, TokenProblem
from billing.settings import get_settings
from billing.stripe_gateway import intent_view

log = logging.getLogger(__name__)

# PaymentIntent statuses in which the customer can still pay it in the browser.
PAYABLE_STATUSES = ("requires_payment_method", "requires_confirmation", "requires_action")


class NothingToPay(Exception):
    """The link is valid but the charge is settled (void, uncollectible): no payment page."""

    def __init__(self, status: str):
        self.status = status
        super().__init__(f"charge is {status}")


class CannotPayOnline(Exception):
    """The link is valid but the page cannot take the payment: the charge is held for staff
    (``needs_review``: Stripe refused the request itself), or Stripe refuses the request the page would
    make (an amount under the currency's minimum, a deleted customer). Staff, not the customer, must act."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"cannot be paid online: {reason}")



@dataclass(frozen=True)
class CardView:
    brand: str | None
    last4: str | None
    exp_month: int | None = None
    exp_year: int | None = None


def _card(pm: PaymentMethod | None) -> CardView | None:
    return CardView(pm.brand, pm.last4, pm.exp_month, pm.exp_year) if pm is not None else None


# --- card setup ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SetupPage:
    customer_name: str
    status: str
    client_secret: str | None  # only while the setup can still be finished in the browser
    card: CardView | None
    error_code: str | None
    error_message: str | None


def open_setup(token: str, *, gateway: PaymentGateway | None = None) -> SetupPage:
    """What ``/setup/{token}`` shows; raises :class:`~billing.recovery.TokenError` for a bad link.

    Opening records ``opened_at`` and changes nothing else. The SetupIntent is read from Stripe for its
    client secret and current status; one that already succeeded is saved as on the page's return.
    """
    with unit_of_work() as uow:
        s = uow.session
        row = recovery.verify(s, token, Purpose.setup)
        setup = s.get(CardSetup, row.card_setup_id) if row.card_setup_id else None
        if setup is None or setup.customer_id != row.customer_id:
            raise TokenError(TokenProblem.unknown)
        customer = s.get(Customer, setup.customer_id)
        recovery.mark_opened(s, row)
        setup_intent_id, customer_name = setup.setup_intent_id, customer.name
        uow.commit()
    result = stripe_gateway.resolve(gateway).retrieve_setup_intent(setup_intent_id)
    if result.status == "succeeded":
        done = complete_setup(token, gateway=gateway)
        return SetupPage(customer_name, done.status, None, done.card, None, None)
    secret = result.client_secret if result.status not in enrolment.FINAL_SETUP_STATUSES else None
    return SetupPage(customer_name, result.status, secret, None, result.error_code, result.error_message)


@dataclass(frozen=True)
class SetupOutcome:
    status: str
    card: CardView | None
    error_code: str | None
    error_message: str | None

    @property
    def saved(self) -> bool:
        return self.status == "succeeded" and self.card is not None


def complete_setup(token: str, *, gateway: PaymentGateway | None = None) -> SetupOutcome:
    """The page says Stripe.js is done: read the SetupIntent from Stripe and record what it says.

    Success saves the card and uses the link up; a failure is recorded on the card setup (and the link
    stays usable for another card). A second call after success reports the saved card again.
    """
    with unit_of_work() as uow:
        row = recovery.verify(uow.session, token, Purpose.setup, allow_used=True)
        setup = uow.session.get(CardSetup, row.card_setup_id) if row.card_setup_id else None
        if setup is None or setup.customer_id != row.customer_id:
            raise TokenError(TokenProblem.unknown)
        if row.used_at is not None and setup.status != "succeeded":
            raise TokenError(TokenProblem.used)
        setup_intent_id = setup.setup_intent_id
    view = enrolment.refresh_card_setup(setup_intent_id, gateway=gateway)
    outcome = SetupOutcome(status=view.setup.status, card=_card(view.payment_method),
                           error_code=view.setup.last_error_code, error_message=view.setup.last_error_message)
    if outcome.saved:
        with unit_of_work() as uow:
            row = uow.session.get(RecoveryToken, row.id)
            if row.used_at is None:
                recovery.consume(uow.session, row)
            uow.commit()
    log.info("card setup page finished", extra={"setup_intent_id": setup_intent_id, "status": outcome.status,
                                                "error_code": outcome.error_code})
    return outcome


# --- recovery ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryPage:
    charge_id: int
    charge_status: str
    customer_name: str
    merchant_name: str
    amount: int
    currency: str
    amount_display: str
    period_start: str
    period_end: str
    saved_card: CardView | None
    saved_payment_method: str | None  # the Stripe id the saved-card option confirms with
    reason: str | None  # why the automatic payment failed, in plain words
    intent_status: str
    client_secret: str | None  # only while the PaymentIntent can be paid in the browser

    @property
    def payable(self) -> bool:
        return self.client_secret is not None


@dataclass(frozen=True)
class _ChargeRef:
    charge_id: int
    customer_id: int
    payment_intent_id: str | None


def _load_recovery(token: str, *, allow_used: bool = False) -> tuple[RecoveryToken, _ChargeRef]:
    with unit_of_work() as uow:
        s = uow.session
        row = recovery.verify(s, token, Purpose.recover, allow_used=allow_used)
        charge = s.get(Charge, row.charge_id) if row.charge_id else None
        sub = s.get(Subscription, charge.subscription_id) if charge else None
        if sub is None or sub.customer_id != row.customer_id:
            raise TokenError(TokenProblem.unknown)
        if row.used_at is not None and charge.status != ChargeStatus.paid:
            # Only a payment may have used the link up for a result to report.
            raise TokenError(TokenProblem.used)
        return row, _ChargeRef(charge.id, sub.customer_id, charge.payment_intent_id)




def open_recovery(token: str, *, gateway: PaymentGateway | None = None) -> RecoveryPage:
    """What ``/recover/{token}`` shows; raises :class:`~billing.recovery.TokenError` for a bad link and
    :class:`NothingToPay` for a charge that is void or uncollectible, :class:`CannotPayOnline` for one
    held for staff or whose PaymentIntent Stripe refuses. Records ``opened_at``."""
    gw = stripe_gateway.resolve(gateway)
    row, ref = _load_recovery(token)
    with unit_of_work() as uow:
        s = uow.session
        charge = s.get(Charge, ref.charge_id)
        if charge.status in state.FINAL:
            raise NothingToPay(charge.status)
        if charge.status == ChargeStatus.needs_review:
            raise CannotPayOnline(charge.status)
        # An attempt is being made right now (a scheduled or staff retry): offer nothing to pay until
        # it has an outcome, or the page and the attempt could each make a PaymentIntent.
        attempt_running = charge.status in charging.IN_FLIGHT
        recovery.mark_opened(s, s.get(RecoveryToken, row.id))
        uow.commit()
    with _refusals_as_cannot_pay(ref.charge_id):
        if attempt_running:
            intent = None
        elif ref.payment_intent_id:
            intent = gw.payment_intent_for_customer(ref.payment_intent_id)
            if intent.status == "canceled":
                # A canceled PaymentIntent can never be paid: replaced by a new one, under a new key.
                intent = _create_intent(gw, ref, replacing=ref.payment_intent_id)
        else:
            intent = _create_intent(gw, ref)
    if intent is not None:
        _require_ours(ref.charge_id, intent)
    if intent is not None and intent.status == "succeeded":
        # Paid in Stripe, not yet here (the webhook is on its way): settle it now, then show it.
        complete_recovery(token, gateway=gw)
    with unit_of_work() as uow:
        s = uow.session
        charge = s.get(Charge, ref.charge_id)
        sub = s.get(Subscription, charge.subscription_id)
        customer = s.get(Customer, sub.customer_id)
        pm = cards.card_for(s, sub, customer)
        settings = get_settings()
        reason = None
        if charge.status == ChargeStatus.authentication_required:
            reason = "Your bank asked you to confirm this payment."
        elif charge.last_error_code:
            reason = explain_decline(charge.last_decline_code, charge.last_advice_code, charge.last_error_code)
        payable = (intent is not None and intent.status in PAYABLE_STATUSES
                   and charge.status not in (*state.FINAL, *charging.IN_FLIGHT))
        secret = intent.client_secret if payable else None
        return RecoveryPage(
            charge_id=charge.id, charge_status=charge.status, customer_name=customer.name,
            merchant_name=settings.merchant_name, amount=charge.amount, currency=charge.currency,
            amount_display=format_amount(charge.amount, charge.currency),
            period_start=charge.period_start.date().isoformat(), period_end=charge.period_end.date().isoformat(),
            saved_card=_card(pm), saved_payment_method=pm.stripe_payment_method_id if pm else None,
            reason=reason, intent_status=intent.status if intent else "attempt_in_progress", client_secret=secret)


@contextlib.contextmanager
def _refusals_as_cannot_pay(charge_id: int) -> Iterator[None]:
    """Stripe refusing what the page asks (the legacy of a charge failed before such refusals were
    held for staff, or a customer deleted at Stripe since) is nothing the customer can fix: say so."""
    try:
        yield
    except StripeRequestRefused as exc:
        log.error("Stripe refused a recovery page's request; the charge needs staff",
                  extra={"charge_id": charge_id, "error_code": exc.code, "http_status": exc.http_status})
        raise CannotPayOnline(exc.code or "refused") from None


def _require_ours(charge_id: int, intent: PaymentIntentView) -> None:
    """The page offers (or settles) only a PaymentIntent that is this charge's, for its amount, in its
    currency, for its customer (:mod:`billing.ownership`); anything else is for staff to look at."""
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        verdict = ownership.is_ours(uow.session, charge, intent)
    if not verdict.ours:
        ownership.reject(verdict, source=ownership.RECOVERY_PAGE, charge_id=charge_id,
                         payment_intent_id=intent.outcome.payment_intent_id)
        raise CannotPayOnline("payment_intent_mismatch")


def _new_recovery_key(charge: Charge) -> str:
    """``recover-charge-<id>-<random>``: the id alone collides at Stripe, which keeps keys per account
    for 24 h, when a restored database or another installation on the account reuses charge ids."""
    charge.recovery_key = f"recover-charge-{charge.id}-{secrets.token_hex(6)}"
    return charge.recovery_key


def _create_intent(gw, ref: _ChargeRef, *, replacing: str | None = None) -> PaymentIntentView | None:
    """A period without a payable PaymentIntent (none made when it fell due without a usable card, or
    the one it had was canceled: ``replacing``) gets one the customer pays on the page.

    Keyed by the charge's stored recovery key, so a reload after a lost answer finds the same one. A
    key is spent once its PaymentIntent was canceled, or once Stripe replays an error under it: the
    next key is drawn and stored, so the page never hands out a PaymentIntent that cannot be paid.

    Made only while holding the charge's lease and while no attempt is running, so a retry and the
    page never make one PaymentIntent each; ``None`` when an attempt holds the charge."""
    with charging.lease(ref.charge_id) as ours:
        if not ours:
            return None
        with unit_of_work() as uow:
            charge = uow.session.scalars(select(Charge).where(Charge.id == ref.charge_id).with_for_update()).one()
            customer = uow.session.get(Customer, ref.customer_id)
            if charge.status in charging.IN_FLIGHT:
                return None
            existing = charge.payment_intent_id
            if replacing is not None and existing == replacing:
                # Its key (when the page made it) would replay the canceled PaymentIntent.
                charge.payment_intent_id = existing = None
                charge.recovery_key = None
            drawn_now = existing is None and charge.recovery_key is None
            key = _new_recovery_key(charge) if drawn_now else charge.recovery_key
            amount, currency, stripe_customer = charge.amount, charge.currency, customer.stripe_customer_id
            uow.commit()
        if existing:
            return gw.payment_intent_for_customer(existing)
        if not stripe_customer:
            stripe_customer = enrolment.ensure_stripe_customer(ref.customer_id, gateway=gw).stripe_customer_id
        intent = _create_payable(gw, ref.charge_id, key, fresh=drawn_now, customer_id=stripe_customer,
                                 amount=amount, currency=currency)
        with unit_of_work() as uow:
            charge = uow.session.scalars(select(Charge).where(Charge.id == ref.charge_id).with_for_update()).one()
            if charge.payment_intent_id is None:
                charge.payment_intent_id = intent.outcome.payment_intent_id
            uow.commit()
        return intent


def _create_payable(gw, charge_id: int, key: str, *, fresh: bool, **params) -> PaymentIntentView:
    """Create the recovery PaymentIntent under ``key``; if that key turns out spent, once more under a
    new one. A key drawn before this call may have been answered before: Stripe then replays what it
    first made, as it was then, so that PaymentIntent is read again as it is now."""
    for last in (False, True):
        metadata = {"charge_id": str(charge_id), "installation": installation_id(), "recovery_key": key}
        try:
            intent = gw.create_payment_intent_on_session(metadata=metadata, idempotency_key=key, **params)
        except TemporaryStripeError as exc:
            if not exc.replayed or last:
                raise
        else:
            if fresh or last:
                return intent
            intent = gw.payment_intent_for_customer(intent.outcome.payment_intent_id)
            if intent.status != "canceled":
                return intent
        log.info("recovery PaymentIntent key spent; drawing a new one", extra={"charge_id": charge_id})
        with unit_of_work() as uow:
            key = _new_recovery_key(uow.session.scalars(select(Charge).where(Charge.id == charge_id)
                                                       .with_for_update()).one())
            uow.commit()
        fresh = True
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RecoveryOutcome:
    charge_status: str
    intent_status: str
    paid: bool
    busy: bool  # another process holds the charge right now; the webhook will settle it
    new_card: CardView | None
    error_code: str | None
    error_message: str | None


def complete_recovery(token: str, *, gateway: PaymentGateway | None = None) -> RecoveryOutcome:
    """The page says Stripe.js is done: read the PaymentIntent from Stripe and apply what it says.

    Only ``succeeded`` and ``processing`` are applied: a failed on-session try (authentication failed,
    the new card declined) leaves the charge waiting where the dunning policy put it, and the page
    shows the error so the customer can try again. A link used up a moment ago (the webhook paid the
    charge first) is accepted here, so the page still reports the result.
    """
    gw = stripe_gateway.resolve(gateway)
    _row, ref = _load_recovery(token, allow_used=True)
    if not ref.payment_intent_id:
        raise TokenError(TokenProblem.unknown)
    with _refusals_as_cannot_pay(ref.charge_id):
        intent = gw.payment_intent_for_customer(ref.payment_intent_id)
    _require_ours(ref.charge_id, intent)
    outcome = intent.outcome
    card = _new_card_to_save(gw, ref.customer_id, intent)
    now = utcnow()
    new_card = None
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == ref.charge_id).with_for_update()).one()
        if charging.lease_held(s, ref.charge_id):
            log.info("recovery page return while the charge is busy; left to the webhook",
                     extra={"charge_id": ref.charge_id})
            return RecoveryOutcome(charge_status=ChargeStatus.processing, intent_status=intent.status,
                                   paid=False, busy=True, new_card=None, error_code=None, error_message=None)
        if outcome.kind in (OutcomeKind.succeeded, OutcomeKind.processing):
            result = charging.apply_outcome(s, charge, outcome, now=now, attempt_number=charge.attempts or 1)
            log.info("recovery page applied the payment", extra={"charge_id": charge.id, "result": result})
        if card is not None:
            customer = s.get(Customer, ref.customer_id)
            try:
                new_card = _card(enrolment.save_payment_method(s, customer, card, saved_at=now))
            except enrolment.Conflict:
                log.warning("card paid with on the recovery page belongs to another customer; not saved",
                            extra={"charge_id": charge.id})
        status = charge.status
        uow.commit()
    failed = outcome.kind not in (OutcomeKind.succeeded, OutcomeKind.processing)
    return RecoveryOutcome(charge_status=status, intent_status=intent.status, paid=status == ChargeStatus.paid,
                           busy=False, new_card=new_card, error_code=outcome.error_code if failed else None,
                           error_message=outcome.message if failed else None)


def adopt_card_paid_with(payment_intent: dict, *, gateway: PaymentGateway | None = None) -> bool:
    """A PaymentIntent paid on the recovery page with a new card saved for off-session use: that card
    becomes the customer's default — also when the customer closed the tab before the page reported
    back, and only the ``payment_intent.succeeded`` webhook tells us. Returns whether a card was saved."""
    intent = intent_view(payment_intent)
    if intent.customer_id is None:
        return False
    with unit_of_work() as uow:
        customer = uow.session.scalars(select(Customer).where(
            Customer.stripe_customer_id == intent.customer_id)).first()
        customer_id = customer.id if customer else None
    if customer_id is None:
        return False
    card = _new_card_to_save(stripe_gateway.resolve(gateway), customer_id, intent)
    if card is None:
        return False
    with unit_of_work() as uow:
        customer = uow.session.get(Customer, customer_id)
        try:
            enrolment.save_payment_method(uow.session, customer, card, saved_at=utcnow())
        except enrolment.Conflict:
            log.warning("card paid with on the recovery page belongs to another customer; not saved",
                        extra={"customer_id": customer_id})
            return False
        uow.commit()
    return True


def _new_card_to_save(gw, customer_id: int, intent: PaymentIntentView) -> CardDetails | None:
    """The card a succeeded PaymentIntent was paid with, if it is a new one saved for off-session use."""
    pm_id = intent.outcome.payment_method_id
    if intent.status != "succeeded" or intent.setup_future_usage != "off_session" or not pm_id:
        return None
    with unit_of_work() as uow:
        known = uow.session.scalars(select(PaymentMethod).where(
            PaymentMethod.stripe_payment_method_id == pm_id, PaymentMethod.customer_id == customer_id,
            PaymentMethod.detached_at.is_(None))).first()
        customer = uow.session.get(Customer, customer_id)
        is_default = known is not None and customer.default_payment_method_id == known.id
    if is_default:
        return None
    card = gw.retrieve_payment_method(pm_id)
    if card.customer_id not in (None, intent.customer_id):
        return None
    return card
