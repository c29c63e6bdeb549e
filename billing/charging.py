"""The billing run: find due → open the period's charge → claim → attempt phases → apply the outcome.

Each subscription period has one ``charges`` row (unique subscription + period) and is charged at
most once. Money moves in atomic phases with recovery points (brandur's rocket-rides-atomic):

1. **claim** (one transaction): lock the charge ``FOR UPDATE SKIP LOCKED``, create the attempt row,
   whose id gives *our* idempotency key ``attempt-<id>-<random>``, or find the unfinished one a crashed worker
   left behind; mark the charge ``processing``; commit.
2. **call Stripe** outside any transaction, through :mod:`billing.stripe_gateway`, with that key.
   A resumed attempt first asks Stripe for a PaymentIntent carrying our ``attempt_id`` metadata, so
   a request whose response was lost is never sent as a second PaymentIntent, even where the
   server ignores idempotency keys or has pruned them.
3. **apply** (one transaction): record the outcome on the attempt, let the dunning policy decide
   the next step, write the outbox rows for emails; commit.

Retries of a period re-confirm the PaymentIntent the period already has: a PaymentIntent succeeds at
most once, which is the last line of defence against charging a period twice.

Nothing here imports Celery: callers pass ``enqueue`` (a function taking a charge id), which runs
only after the transaction that created the work has committed.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from billing import cards, dunning, metrics, notifications, ownership, recovery, state, stripe_gateway
from billing.clock import utcnow
from billing.db import get_engine, unit_of_work
from billing.installation import installation_id
from billing.models import (
    Attempt,
    AttemptPhase,
    Charge,
    ChargeStatus,
    Customer,
    PaymentMethod,
    Subscription,
    SubscriptionStatus,
)
from billing.outcomes import ChargeGateway, OutcomeKind, PaymentOutcome, TemporaryStripeError
from billing.periods import period_bounds
from billing.settings import get_settings

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]



def dunning_config() -> dunning.DunningConfig:
    return dunning.DunningConfig.from_settings(get_settings())


# --- the run: open due periods ---------------------------------------------------------------------

@dataclass
class RunReport:
    created: list[int] = field(default_factory=list)
    failed_subscriptions: list[int] = field(default_factory=list)


def run_due(*, now: datetime | None = None, enqueue: Enqueue, batch_size: int = 500) -> RunReport:
    """Open the charge of every subscription whose next period has started, and enqueue it.

    Batches lock their subscriptions with ``SKIP LOCKED``, so concurrent runs (two beats, a manual
    ``run-due`` beside the scheduled one) split the work instead of repeating it; the unique
    (subscription, period) constraint is the backstop. One open period at a time: a subscription
    with a charge that is not final opens nothing (:func:`billing.state.has_open_charge`), so a
    subscription several periods behind catches up one period a run, each after the last is decided.
    Batches walk the subscriptions by id (keyset), so a run of any size sends a constant number of
    parameters per query and a subscription that failed to open is not picked again in the same run.
    """
    now = now or utcnow()
    report = RunReport()
    after_id = 0
    while True:
        with unit_of_work() as uow:
            subs = uow.session.scalars(
                select(Subscription)
                .where(Subscription.status == SubscriptionStatus.active, Subscription.next_charge_at <= now,
                       Subscription.id > after_id, ~state.has_open_charge())
                .order_by(Subscription.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            if not subs:
                return report
            after_id = subs[-1].id
            created: list[int] = []
            for sub in subs:
                try:
                    with uow.session.begin_nested():
                        created.append(_open_period(uow.session, sub).id)
                except Exception:
                    # One bad subscription never stops a run (practice 8).
                    log.exception("could not open a period", extra={"subscription_id": sub.id})
                    report.failed_subscriptions.append(sub.id)
            uow.after_commit(lambda ids=tuple(created): enqueue_all(enqueue, ids))
            uow.commit()
            report.created.extend(created)


def _open_period(session: Session, sub: Subscription) -> Charge:
    start, end = period_bounds(sub.anchor_at, sub.interval, sub.interval_count, sub.next_period_index)
    charge = Charge(subscription_id=sub.id, period_index=sub.next_period_index, period_start=start,
                    period_end=end, amount=sub.amount, currency=sub.currency, status=ChargeStatus.pending)
    session.add(charge)
    sub.next_period_index += 1
    sub.current_period_start, sub.current_period_end = start, end
    sub.next_charge_at = end
    session.flush()
    return charge


def enqueue_all(enqueue: Enqueue, charge_ids: tuple[int, ...]) -> None:
    for charge_id in charge_ids:
        try:
            enqueue(charge_id)
        except Exception:
            # The charge stays pending; the reconciler's sweep enqueues it again.
            log.exception("could not enqueue a charge", extra={"charge_id": charge_id})


# A staff "retry now" whose task has not claimed the charge after this long is sent again.
RETRY_REQUEST_GRACE = timedelta(seconds=30)


def retry_due(*, now: datetime | None = None, enqueue: Enqueue, enqueue_manual: Enqueue | None = None,
              limit: int = 1000) -> list[int]:
    """Enqueue the charges whose scheduled dunning retry has come (index ``ix_charges_retry_due``),
    and, with ``enqueue_manual``, the staff retries that no attempt has claimed yet (the task was
    lost, or found the charge busy): a "retry now" is a durable request, not a fire-and-forget."""
    now = now or utcnow()
    with unit_of_work() as uow:
        ids = uow.session.scalars(
            select(Charge.id).where(Charge.status == ChargeStatus.requires_payment_method,
                                    Charge.retry_paused.is_(False), Charge.next_retry_at <= now)
            .order_by(Charge.next_retry_at).limit(limit)
        ).all()
        requested = [] if enqueue_manual is None else uow.session.scalars(
            select(Charge.id).where(Charge.retry_requested_at <= now - RETRY_REQUEST_GRACE,
                                    Charge.status.in_([ChargeStatus.requires_payment_method,
                                                       ChargeStatus.needs_review]))
            .order_by(Charge.retry_requested_at).limit(limit)
        ).all()
    enqueue_all(enqueue, tuple(ids))
    if requested:
        log.info("staff retries sent again", extra={"charge_ids": list(requested)})
        enqueue_all(enqueue_manual, tuple(requested))
    return list(ids) + list(requested)


# --- one charge: claim → Stripe → apply ----------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """What the Stripe call needs, read in the claim transaction (no ORM objects cross phases)."""

    charge_id: int
    attempt_id: int
    attempt_number: int
    idempotency_key: str
    resumed: bool
    amount: int
    currency: str
    stripe_customer_id: str | None
    stripe_payment_method_id: str | None
    mandate_id: str | None
    payment_intent_id: str | None
    metadata: dict[str, str]


def process_charge(charge_id: int, *, gateway: ChargeGateway | None = None, now: datetime | None = None,
                   manual: bool = False) -> str:
    """Run one attempt at a charge, resuming an unfinished one. Returns what happened, in a word:
    the charge's new status, ``skipped:<status>``, ``busy`` (another process is working on it),
    ``locked`` (its row is held for a moment; try again shortly) or ``missing``.

    ``manual`` lets a staff "retry now" run a retry before its scheduled time; every other rule
    (final states, pauses of nothing else, the claim lock) is the same path as the scheduled run.
    Raises :class:`~billing.outcomes.TemporaryStripeError` when Stripe could not be reached: the
    attempt stays ``started`` and a later call resumes it with the same key.
    """
    gateway = stripe_gateway.resolve(gateway)
    with in_flight(charge_id) as ours:
        if not ours:
            return "busy"
        claim = _claim(charge_id, now or utcnow(), manual)
        if isinstance(claim, str):
            return claim
        try:
            outcome = _call_stripe(gateway, claim)
        except TemporaryStripeError as exc:
            if not exc.replayed:
                raise
            outcome = _after_replayed_error(gateway, claim, now or utcnow())
            if outcome is None:
                raise
        log.info("Stripe answered", extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id,
                                           "outcome": outcome.kind.value,
                                           "payment_intent_id": outcome.payment_intent_id,
                                           "error_code": outcome.error_code, "decline_code": outcome.decline_code})
        return _finish(claim, outcome, now or utcnow())


def _after_replayed_error(gateway, claim: Claim, now: datetime) -> PaymentOutcome | None:
    """Stripe replays the error it saved under this attempt's key (a 500 is kept for 24 h), so that
    key is spent. If the request made a PaymentIntent after all, that is the outcome; if not, the
    attempt is closed as abandoned and the charge made claimable again, so the next try is a new
    attempt with a new key — still on the period's one PaymentIntent when it has one."""
    if claim.payment_intent_id is None and claim.stripe_customer_id:
        found = gateway.find_payment_intent(customer_id=claim.stripe_customer_id, attempt_id=claim.attempt_id)
        if found is not None and ownership.found_is_ours(found, claim, source=ownership.REPLAYED_ERROR):
            return found
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == claim.charge_id).with_for_update()).one()
        attempt = s.get(Attempt, claim.attempt_id, populate_existing=True)
        if attempt.phase == AttemptPhase.started:
            attempt.phase, attempt.finished_at, attempt.outcome = AttemptPhase.finished, now, "abandoned"
            attempt.message = "Stripe replayed a saved server error for this idempotency key"
            if charge.status == ChargeStatus.processing:
                # Back to where it was claimable: a first try is pending, a retry is due now.
                if charge.first_failed_at is None:
                    state.move_charge(charge, ChargeStatus.pending, now=now)
                else:
                    state.move_charge(charge, ChargeStatus.requires_payment_method, now=now)
                    charge.next_retry_at = now
        uow.commit()
    log.warning("attempt abandoned after a replayed Stripe error; the next try uses a new key",
                extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id})
    return None


_LOCK_NAMESPACE = 0x6269 << 48  # keeps these advisory lock keys apart from any other use


@contextlib.contextmanager
def in_flight(charge_id: int) -> Iterator[bool]:
    """Mark a charge as being worked on for as long as this process lives.

    A session-level advisory lock on its own connection, held across the Stripe call: a second
    delivery of the same task sees ``False`` and leaves, while the unfinished attempt of a worker
    that was killed is free to resume at once, because PostgreSQL drops the lock with the dead
    connection. No lease to guess, no clock to trust.
    """
    key = _LOCK_NAMESPACE | charge_id
    with get_engine().connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def _chargeable(charge: Charge, now: datetime, manual: bool) -> bool:
    if charge.status == ChargeStatus.pending:
        return True
    if charge.status == ChargeStatus.needs_review:
        # Held for staff: only their "retry now" (after fixing the cause) attempts it again.
        return manual
    if charge.status == ChargeStatus.requires_payment_method:
        if manual:
            return True
        return not charge.retry_paused and charge.next_retry_at is not None and charge.next_retry_at <= now
    return False


def _claim(charge_id: int, now: datetime, manual: bool) -> Claim | str:
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == charge_id).with_for_update(skip_locked=True)).first()
        if charge is None:
            # Locked for a moment by a webhook or a staff action: worth trying again shortly.
            return "locked" if s.get(Charge, charge_id, populate_existing=True) is not None else "missing"
        attempt = s.scalars(select(Attempt).where(Attempt.charge_id == charge.id,
                                                  Attempt.phase == AttemptPhase.started)).first()
        resumed = attempt is not None
        sub, customer = _subscription_and_customer(s, charge)
        if attempt is None:
            if not _chargeable(charge, now, manual):
                return f"skipped:{charge.status}"
            if sub.status == SubscriptionStatus.canceled and not manual:
                _stop_after_cancel(charge, now)
                uow.commit()
                return f"skipped:canceled:{charge.status}"
        pm = cards.card_for(s, sub, customer)
        if not resumed:
            attempt = _new_attempt(s, charge, pm, now, manual=manual)
            state.move_charge(charge, ChargeStatus.processing, now=now)
            charge.attempts = attempt.number
        # A staff "retry now" waiting for this charge is served by this attempt, whichever path made it.
        charge.retry_requested_at = None
        claim = Claim(
            charge_id=charge.id, attempt_id=attempt.id, attempt_number=attempt.number,
            idempotency_key=attempt.idempotency_key, resumed=resumed, amount=charge.amount,
            currency=charge.currency, stripe_customer_id=customer.stripe_customer_id,
            stripe_payment_method_id=attempt.stripe_payment_method_id,
            # The attempt's own record: a resend must carry exactly the parameters of the first send.
            mandate_id=attempt.mandate_id,
            payment_intent_id=charge.payment_intent_id,
            # installation and attempt_key make a PaymentIntent found by this metadata provably this
            # attempt's (billing.ownership): ids repeat in another installation or a restored database.
            metadata={"charge_id": str(charge.id), "attempt_id": str(attempt.id),
                      "subscription_id": str(sub.id), "period_start": charge.period_start.isoformat(),
                      "installation": installation_id(), "attempt_key": attempt.idempotency_key},
        )
        uow.commit()
    log.info("charge claimed", extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id,
                                      "subscription_id": claim.metadata["subscription_id"],
                                      "attempt_number": claim.attempt_number, "resumed": claim.resumed})
    return claim


def _stop_after_cancel(charge: Charge, now: datetime) -> None:
    """A canceled subscription is not charged automatically any more: a period never attempted is
    void; one already failing keeps its status (the customer may still pay it on the recovery page,
    staff may retry it) but leaves the automatic retry schedule."""
    if charge.status == ChargeStatus.pending:
        state.move_charge(charge, ChargeStatus.void, now=now)
    charge.next_retry_at = None
    charge.updated_at = now
    log.info("charge not attempted: subscription canceled", extra={"charge_id": charge.id})


def _subscription_and_customer(s: Session, charge: Charge) -> tuple[Subscription, Customer]:
    sub, customer = s.execute(select(Subscription, Customer).join(Customer, Customer.id == Subscription.customer_id)
                              .where(Subscription.id == charge.subscription_id)).one()
    return sub, customer


def _new_attempt(s: Session, charge: Charge, pm: PaymentMethod | None, now: datetime, *,
                 manual: bool = False) -> Attempt:
    # The key names the row (its id is drawn before the insert) plus a random part: Stripe keeps keys
    # per account, and a restored database or a second installation on one account reuses ids.
    # Stored on the row, so a resumed attempt sends exactly the key it sent before.
    attempt_id = s.execute(text("SELECT nextval(pg_get_serial_sequence('attempts', 'id'))")).scalar_one()
    attempt = Attempt(id=attempt_id, charge_id=charge.id, number=charge.attempts + 1,
                      idempotency_key=f"attempt-{attempt_id}-{secrets.token_hex(6)}", phase=AttemptPhase.started,
                      manual=manual,
                      payment_method_id=pm.id if pm else None,
                      stripe_payment_method_id=pm.stripe_payment_method_id if pm else None,
                      mandate_id=pm.mandate_id if pm else None, started_at=now)
    s.add(attempt)
    s.flush()
    return attempt




def _call_stripe(gateway, claim: Claim) -> PaymentOutcome:
    if not claim.stripe_customer_id or not claim.stripe_payment_method_id:
        return PaymentOutcome(kind=OutcomeKind.invalid_request, error_code="no_payment_method",
                              message="no usable saved card for this subscription")
    if claim.payment_intent_id:
        # A PaymentIntent can succeed only once, so re-confirming it is safe even when resumed.
        return gateway.confirm_off_session(payment_intent_id=claim.payment_intent_id,
                                           payment_method_id=claim.stripe_payment_method_id,
                                           mandate_id=claim.mandate_id, idempotency_key=claim.idempotency_key)
    if claim.resumed:
        found = gateway.find_payment_intent(customer_id=claim.stripe_customer_id, attempt_id=claim.attempt_id)
        if found is not None and ownership.found_is_ours(found, claim, source=ownership.RESUME):
            log.info("resumed attempt found its PaymentIntent", extra={"charge_id": claim.charge_id,
                                                                       "attempt_id": claim.attempt_id})
            return found
    return gateway.charge_off_session(customer_id=claim.stripe_customer_id,
                                      payment_method_id=claim.stripe_payment_method_id, amount=claim.amount,
                                      currency=claim.currency, mandate_id=claim.mandate_id,
                                      metadata=claim.metadata, idempotency_key=claim.idempotency_key)


def _finish(claim: Claim, outcome: PaymentOutcome, now: datetime) -> str:
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == claim.charge_id).with_for_update()).one()
        attempt = s.get(Attempt, claim.attempt_id, populate_existing=True)
        if attempt.phase == AttemptPhase.finished:
            return "already-finished"
        with s.no_autoflush:  # one UPDATE per row at commit, not one per attribute group
            record_attempt_outcome(attempt, outcome, now)
            if outcome.payment_intent_id and not charge.payment_intent_id:
                charge.payment_intent_id = outcome.payment_intent_id
            result = apply_outcome(s, charge, outcome, now=now, attempt_number=attempt.number,
                                   attempt_id=attempt.id, manual=attempt.manual)
        uow.commit()
    metrics.observe_attempt(outcome, result)
    log.info("charge attempt finished", extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id,
                                               "outcome": outcome.kind.value, "decline_code": outcome.decline_code,
                                               "status": result})
    return result


def record_attempt_outcome(attempt: Attempt, outcome: PaymentOutcome, now: datetime) -> None:
    attempt.phase = AttemptPhase.finished
    attempt.finished_at = now
    attempt.outcome = outcome.kind.value
    attempt.payment_intent_id = outcome.payment_intent_id or attempt.payment_intent_id
    attempt.error_code = outcome.error_code
    attempt.decline_code = outcome.decline_code
    attempt.advice_code = outcome.advice_code
    attempt.message = outcome.message


# --- applying an outcome: the one place a charge changes state after Stripe answered -------------

def apply_outcome(s: Session, charge: Charge, outcome: PaymentOutcome, *, now: datetime,
                  attempt_number: int | None = None, attempt_id: int | None = None, manual: bool = False) -> str:
    """Move a locked charge (and its subscription) to where the dunning policy says, and write the
    emails to the outbox in this same transaction. Used by the charge task, webhooks, the
    reconciler and the recovery page, so every path decides the same way.

    A request Stripe refused (:attr:`~billing.outcomes.OutcomeKind.refused`) holds the charge as
    ``needs_review`` with an ERROR line naming it: no email, no retry; staff decide (finance actions).

    A charge in a final state stays there: a late or duplicated outcome changes nothing — except
    money actually collected: a charge given up (``uncollectible``) or written off (``void``) whose
    PaymentIntent succeeded after all (the customer paid on a page opened before) becomes ``paid``,
    because Stripe has the money and the books must say so.

    A card decline advances the retry schedule (``charges.failures``) unless it answered a staff
    retry (``manual``); the state machine refuses a move its table does not allow (logged, ignored).
    """
    if charge.status == ChargeStatus.paid or (
            charge.status in state.FINAL and outcome.kind is not OutcomeKind.succeeded):
        return f"ignored:{charge.status}"
    sub, customer = _subscription_and_customer(s, charge)
    number = attempt_number or charge.attempts or 1
    if outcome.kind is OutcomeKind.declined and not manual:
        charge.failures += 1
    decision = dunning.decide(outcome, failures=charge.failures, first_failed_at=charge.first_failed_at, now=now,
                              config=dunning_config())
    if not state.can_move(charge.status, decision.charge_status):
        log.warning("outcome ignored: the state machine refuses the move",
                    extra={"charge_id": charge.id, "status": charge.status, "wanted": decision.charge_status.value,
                           "outcome": outcome.kind.value})
        return f"ignored:{charge.status}"
    if outcome.is_failure:
        charge.last_error_code = outcome.error_code
        charge.last_decline_code = outcome.decline_code
        charge.last_advice_code = outcome.advice_code
    if outcome.kind is OutcomeKind.canceled and charge.payment_intent_id == outcome.payment_intent_id:
        # A canceled PaymentIntent can never succeed: the next try (a retry, the recovery page) makes
        # a new one instead of re-confirming a dead one.
        charge.payment_intent_id = None
    apply_decision(s, charge, sub, customer, decision, now=now, number=number)
    if decision.charge_status == ChargeStatus.needs_review:
        # Stripe's code and our ids only: its message may quote parameters, and no secret belongs here.
        log.error("Stripe refused the charge request itself (not a card decline); charge held for staff review",
                  extra={"charge_id": charge.id, "attempt_id": attempt_id, "subscription_id": sub.id,
                         "error_code": outcome.error_code, "status": ChargeStatus.needs_review.value})
    elif decision.alert:
        log.error("charge failed with no usable card or a canceled PaymentIntent; check the card or customer",
                  extra={"charge_id": charge.id, "code": outcome.error_code})
    return str(decision.charge_status)


def apply_decision(s: Session, charge: Charge, sub: Subscription, customer: Customer, decision: dunning.Decision,
                   *, now: datetime, number: int) -> None:
    """Write a dunning decision onto the charge (through the state machine), re-derive its
    subscription's status, and write the decision's emails to the outbox."""
    charge.first_failed_at = decision.first_failed_at
    state.move_charge(charge, decision.charge_status, now=now)
    charge.next_retry_at = decision.next_retry_at
    charge.give_up_at = decision.give_up_at
    if decision.charge_status in state.FINAL:
        charge.retry_requested_at = None
    if decision.charge_status == ChargeStatus.paid:
        if decision.first_failed_at is not None:
            # Only a charge that failed has recovery links out (and reminders, dropped below).
            recovery.consume_for_charge(s, charge.id, now)
    if decision.charge_status == ChargeStatus.needs_review:
        # Reminders of an earlier decline would ask the customer to pay what staff now hold.
        notifications.drop_pending_reminders(s, charge.id)
    if decision.give_up and dunning_config().final_subscription_status is SubscriptionStatus.canceled:
        # BILLING_FINAL_SUBSCRIPTION_STATUS=canceled: giving up ends the subscription for good.
        state.cancel_subscription(sub, now=now)
    state.refresh_subscription(s, sub, now=now)
    notifications.enqueue_decision(s, decision, charge=charge, customer=customer, attempt_number=number)


def mark_touched(s: Session, charge_ids: list[int], now: datetime) -> None:
    """Refresh ``updated_at`` so the stale-charge sweep does not enqueue these again right away."""
    if charge_ids:
        s.execute(update(Charge).where(Charge.id.in_(charge_ids)).values(updated_at=now))


# Not decided yet: `run-due --wait` and the demo wait for charges to leave these.
IN_FLIGHT = state.IN_FLIGHT


def wait_until_decided(charge_ids: list[int], *, timeout: float,
                       progress: Callable[[int, int], None] | None = None,
                       interval: float = 0.5) -> dict[int, str]:
    """Poll the charges until none is pending or processing (or ``timeout``); their statuses.
    ``progress(decided, total)`` is called whenever the count changes."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        with unit_of_work() as uow:
            statuses = dict(uow.session.execute(
                select(Charge.id, Charge.status).where(Charge.id.in_(charge_ids))).all())
        done = sum(1 for status in statuses.values() if status not in IN_FLIGHT)
        if progress is not None and done != last:
            progress(done, len(charge_ids))
            last = done
        if done == len(charge_ids) or time.monotonic() > deadline:
            return statuses
        time.sleep(interval)
