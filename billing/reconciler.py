"""The reconciler: settles what a crash, a lost response or a lost task left in between.

It never creates a PaymentIntent itself. It finds

* charges still ``pending`` long after their period opened (the enqueue after commit was lost)
  and attempts a worker left ``started`` (it died mid-call, the outcome is unknown): both are
  enqueued again, and the charge task resumes them — looking the PaymentIntent up by our metadata
  before it would send anything (Kill Bill's Janitor settles UNKNOWN payments the same way);
* charges ``processing`` at Stripe (ACH-like settlement, or a webhook that never came): the
  PaymentIntent is retrieved and its outcome applied;
* charges waiting on the customer past the dunning horizon: given up (``uncollectible``), with the
  final notice.

A PaymentIntent read back settles a charge only if it still says what the charge says
(:mod:`billing.ownership`); one that does not is logged and counted, never applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, func, select

from billing import charging, dunning, metrics, ownership, state, stripe_gateway
from billing.clock import utcnow
from billing.db import unit_of_work
from billing.models import Attempt, AttemptPhase, Charge, ChargeStatus, Customer, Subscription
from billing.outcomes import ChargeGateway, OutcomeKind, PaymentOutcome, StripeRequestRefused, TemporaryStripeError

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=5)


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)
    given_up: list[int] = field(default_factory=list)


def sweep(*, now: datetime | None = None, enqueue: charging.Enqueue, gateway: ChargeGateway | None = None,
          stale_after: timedelta = STALE_AFTER) -> SweepReport:
    now = now or utcnow()
    report = SweepReport()
    report.requeued = requeue_stale(now=now, enqueue=enqueue, stale_after=stale_after)
    report.settled = settle_processing(now=now, gateway=gateway, stale_after=stale_after)
    report.given_up = give_up_overdue(now=now, gateway=gateway)
    metrics.observe_reconciler(report)
    if report.requeued or report.settled or report.given_up:
        log.info("reconciler findings", extra={"requeued": len(report.requeued), "settled": len(report.settled),
                                               "given_up": len(report.given_up)})
    return report


def _unfinished_attempt():
    return exists().where(Attempt.charge_id == Charge.id, Attempt.phase == AttemptPhase.started)


def requeue_stale(*, now: datetime, enqueue: charging.Enqueue, stale_after: timedelta = STALE_AFTER,
                  limit: int = 1000) -> list[int]:
    """Pending charges nobody picked up (the enqueue was lost, or the task failed before its claim: a
    lost connection, an exhausted pool), and processing charges whose attempt never finished and whose
    lease has lapsed (the worker died; billing.leases: a live lease is a worker still on it)."""
    cutoff = now - stale_after
    lapsed = Charge.lease_expires_at.is_(None) | (Charge.lease_expires_at <= func.clock_timestamp())
    with unit_of_work() as uow:
        ids = list(uow.session.scalars(
            select(Charge.id).where(
                Charge.updated_at < cutoff,
                (Charge.status == ChargeStatus.pending)
                | ((Charge.status == ChargeStatus.processing) & _unfinished_attempt() & lapsed))
            .order_by(Charge.updated_at).limit(limit)))
        # Touch them so the next sweep gives this round's tasks time to run.
        charging.mark_touched(uow.session, ids, now)
        uow.after_commit(lambda: charging.enqueue_all(enqueue, tuple(ids)))
        uow.commit()
    return ids


def settle_processing(*, now: datetime, gateway: ChargeGateway | None = None, stale_after: timedelta = STALE_AFTER,
                      limit: int = 200) -> list[int]:
    """Processing charges whose attempt finished as ``processing``: ask Stripe how it ended."""
    cutoff = now - stale_after
    with unit_of_work() as uow:
        rows = uow.session.execute(
            select(Charge.id, Charge.payment_intent_id, Charge.updated_at).where(
                Charge.status == ChargeStatus.processing, Charge.updated_at < cutoff,
                Charge.payment_intent_id.is_not(None), ~_unfinished_attempt())
            .order_by(Charge.updated_at).limit(limit)).all()
    if not rows:
        return []
    gateway = stripe_gateway.resolve(gateway)
    settled = []
    for charge_id, pi_id, since in rows:
        try:
            outcome = gateway.retrieve_payment_intent(pi_id)
        except TemporaryStripeError:
            log.warning("could not reach Stripe to settle a charge", extra={"charge_id": charge_id})
            continue
        except Exception as exc:
            # One PaymentIntent Stripe does not know (a restore onto another account, a switched key)
            # must not stop the sweep for every charge after it: held for staff, the sweep goes on.
            outcome = _unreadable(charge_id, pi_id, exc)
            if outcome is None:
                continue
        with unit_of_work() as uow:
            charge = uow.session.scalars(select(Charge).where(Charge.id == charge_id).with_for_update()).one()
            if outcome.kind is OutcomeKind.processing and now - since > PROCESSING_LIMIT:
                # Never settled: hold it for staff with the reason, instead of waiting forever.
                charging.apply_outcome(uow.session, charge, PaymentOutcome(
                    OutcomeKind.refused, payment_intent_id=pi_id, error_code=PROCESSING_TIMEOUT,
                    message=f"still processing at Stripe after {PROCESSING_LIMIT}"), now=now)
                settled.append(charge_id)
            elif outcome.kind is OutcomeKind.processing:
                # Not touched: updated_at stays the time the charge entered processing (the state
                # machine stamps every move), which is what PROCESSING_LIMIT is measured from.
                pass
            elif not _ours(uow.session, charge, outcome):
                charging.mark_touched(uow.session, [charge_id], now)
            elif charge.status == ChargeStatus.processing:
                charging.apply_outcome(uow.session, charge, outcome, now=now)
                settled.append(charge_id)
            uow.commit()
    return settled


def give_up_overdue(*, now: datetime, gateway: ChargeGateway | None = None, limit: int = 1000) -> list[int]:
    """Charges waiting on the customer (authentication, a new card) whose horizon has passed.

    Stripe is asked first how each one's PaymentIntent stands: a customer who paid on the recovery
    page while the webhook went astray gets their payment recorded, not a final notice."""
    config = charging.dunning_config()
    waiting = [s.value for s in state.WAITING_ON_CUSTOMER]
    with unit_of_work() as uow:
        rows = uow.session.execute(
            select(Charge.id, Charge.payment_intent_id).where(
                Charge.status.in_(waiting), Charge.give_up_at <= now)
            .order_by(Charge.give_up_at).limit(limit)).all()
    given_up = []
    for charge_id, pi_id in rows:
        try:
            given_up.extend(_give_up_one(charge_id, pi_id, now=now, gateway=gateway, config=config, waiting=waiting))
        except Exception:
            # One bad row never stops the sweep (practice 8); it is tried again at the next one.
            log.exception("could not give a charge up", extra={"charge_id": charge_id})
    return given_up


def _give_up_one(charge_id: int, pi_id: str | None, *, now: datetime, gateway, config, waiting) -> list[int]:
    """One charge past its horizon: settled if Stripe says it was paid after all, held for staff if
    Stripe does not know its PaymentIntent, else given up. Returns ``[charge_id]`` when given up."""
    outcome = _current_outcome(pi_id, gateway)
    if outcome is _UNREACHABLE:
        return []  # asked again at the next sweep
    if isinstance(outcome, Exception):
        outcome = _unreadable(charge_id, pi_id, outcome)
        if outcome is None:
            return []
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == charge_id).with_for_update(skip_locked=True)).first()
        if charge is None or charge.status not in waiting:
            return []
        if outcome is not None and outcome.kind is not OutcomeKind.refused and not _ours(s, charge, outcome):
            outcome = None  # a payment that is not this charge's does not settle it
        if outcome is not None and outcome.kind in (OutcomeKind.succeeded, OutcomeKind.processing,
                                                    OutcomeKind.refused):
            charging.apply_outcome(s, charge, outcome, now=now)
            uow.commit()
            return []
        decision = dunning.decide_give_up(charge.first_failed_at, now, config)
        if decision is None:
            return []
        sub = s.get(Subscription, charge.subscription_id)
        customer = s.get(Customer, sub.customer_id)
        charging.apply_decision(s, charge, sub, customer, decision, now=now, number=charge.attempts or 1)
        uow.commit()
    return [charge_id]


_UNREACHABLE = object()

# A card PaymentIntent that has not settled after this long is not going to on its own: staff decide.
PROCESSING_LIMIT = timedelta(days=3)
PROCESSING_TIMEOUT = "processing_timeout"


def _unreadable(charge_id: int, payment_intent_id: str | None, exc: Exception) -> PaymentOutcome | None:
    """A PaymentIntent Stripe refuses to show us: the charge is held for staff (``needs_review``)
    when Stripe says it does not exist; any other error is logged and the row left for next time."""
    metrics.observe_reconciler_error(type(exc).__name__)
    if isinstance(exc, StripeRequestRefused):
        log.error("Stripe does not know a charge's PaymentIntent; held for staff",
                  extra={"charge_id": charge_id, "payment_intent_id": payment_intent_id, "code": exc.code})
        return PaymentOutcome(OutcomeKind.refused, payment_intent_id=payment_intent_id,
                              error_code=exc.code or "resource_missing",
                              message="Stripe refused to show this PaymentIntent")
    log.exception("could not read a charge's PaymentIntent; left for the next sweep",
                  extra={"charge_id": charge_id, "payment_intent_id": payment_intent_id})
    return None


def _ours(s, charge: Charge, outcome) -> bool:
    """The PaymentIntent read back still says what the charge says (amount, currency, customer):
    one changed at Stripe since is logged and counted, not applied (billing.ownership)."""
    verdict = ownership.is_ours(s, charge, outcome)
    if not verdict.ours:
        ownership.reject(verdict, source=ownership.RECONCILER, charge_id=charge.id,
                         payment_intent_id=outcome.payment_intent_id)
    return verdict.ours


def _current_outcome(payment_intent_id: str | None, gateway):
    """The PaymentIntent's outcome now (None when the charge never got one), or ``_UNREACHABLE``."""
    if payment_intent_id is None:
        return None
    gateway = stripe_gateway.resolve(gateway)
    try:
        return gateway.retrieve_payment_intent(payment_intent_id)
    except TemporaryStripeError:
        log.warning("could not reach Stripe before giving a charge up", extra={"payment_intent_id": payment_intent_id})
        return _UNREACHABLE
    except Exception as exc:  # handed to _unreadable by the caller, per row
        return exc
