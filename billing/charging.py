"""The billing run: find due → open the period's charge → claim → attempt phases → apply the outcome.

Each subscription period has one ``charges`` row (unique subscription + period) and is charged at
most once. Money moves in atomic phases with recovery points (brandur's rocket-rides-atomic):

1. **claim** (one statement, :data:`_CLAIM`): lock the charge ``FOR UPDATE SKIP LOCKED``, take its
   lease (:mod:`billing.leases`), create the attempt row, whose id gives *our* idempotency key
   ``attempt-<id>-<random>``, or find the unfinished one a crashed worker left behind; mark the
   charge ``processing``; return what the Stripe call needs, card and mandate included.
2. **call Stripe** outside any transaction, holding no connection (the lease says the charge is
   taken, and is renewed meanwhile), through :mod:`billing.stripe_gateway`, with that key.
   A resumed attempt first asks Stripe for a PaymentIntent carrying our ``attempt_id`` metadata, so
   a request whose response was lost is never sent as a second PaymentIntent, even where the
   server ignores idempotency keys or has pruned them.
3. **apply** (one short transaction, fenced by the lease): record the outcome on the attempt, let
   the dunning policy decide the next step, write the outbox rows for emails; commit. A payment —
   almost every charge — is one statement (:data:`_APPLY_SIMPLE`); so a charge costs four
   statements as the server counts them, BEGIN and COMMIT included.

Retries of a period re-confirm the PaymentIntent the period already has: a PaymentIntent succeeds at
most once, which is the last line of defence against charging a period twice.

Nothing here imports Celery: callers pass ``enqueue`` (a function taking a charge id), which runs
only after the transaction that created the work has committed.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from billing import dunning, leases, metrics, notifications, opening, ownership, recovery, state, stripe_gateway
from billing.clock import utcnow
from billing.db import autocommit_connection, get_engine, retry_on_disconnect, unit_of_work
from billing.installation import installation_id
from billing.models import (
    Attempt,
    AttemptPhase,
    Charge,
    ChargeStatus,
    Customer,
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

    Set-based (:mod:`billing.opening`): the run lists the subscriptions due when it starts, then walks
    them by id in batches of ``batch_size``, each opened by one statement that locks the batch with
    ``SKIP LOCKED`` (concurrent runs, two beats or a manual ``run-due`` beside the scheduled one, split
    the work instead of repeating it), inserts the charges and advances the subscriptions; the unique
    (subscription, period) constraint is the backstop. One open period at a time: a subscription with
    a charge that is not final opens nothing (:func:`billing.state.has_open_charge`), so one several
    periods behind catches up one period a run, each after the last is decided. Walking by id, a
    subscription is opened at most once per run, and one that failed is not picked again in it.

    A batch whose statement fails is opened again row by row, each row in a savepoint, so one bad
    subscription is logged and contained (practice 8) and the rest of its batch still opens. Each
    batch's charges are enqueued after its commit (:func:`enqueue_all`).
    """
    now = now or utcnow()
    report = RunReport()
    with unit_of_work() as uow:
        due = opening.due_ids(uow.session, now)
    for first in range(0, len(due), batch_size):
        _open_batch(due[first:first + batch_size].tolist(), now, enqueue, report)
    return report


def _open_batch(ids: list[int], now: datetime, enqueue: Enqueue, report: RunReport) -> None:
    with unit_of_work() as uow:
        try:
            created, failed = opening.open_batch(uow.session, ids, now)
        except Exception:
            log.warning("a batch of due subscriptions could not be opened in one statement; opening it row by row",
                        exc_info=True, extra={"first_subscription_id": ids[0], "last_subscription_id": ids[-1]})
            uow.session.rollback()
            created, failed = _open_row_by_row(uow.session, ids, now)
        else:
            for subscription_id in failed:
                log.error("could not open a period: the subscription's next period has a charge already",
                          extra={"subscription_id": subscription_id})
        uow.after_commit(lambda: enqueue_all(enqueue, tuple(created)))
        uow.commit()
    report.created.extend(created)
    report.failed_subscriptions.extend(failed)


def _open_row_by_row(session: Session, ids: list[int], now: datetime) -> tuple[list[int], list[int]]:
    """The fallback for a batch that failed as a whole: the same rule, one subscription at a time."""
    subs = session.scalars(
        select(Subscription)
        .where(Subscription.id.in_(ids), Subscription.status == SubscriptionStatus.active,
               Subscription.next_charge_at <= now, ~state.has_open_charge())
        .order_by(Subscription.id)
        .with_for_update(skip_locked=True)
    ).all()
    created: list[int] = []
    failed: list[int] = []
    for sub in subs:
        try:
            with session.begin_nested():
                created.append(_open_period(session, sub).id)
        except Exception:
            # One bad subscription never stops a run (practice 8).
            log.exception("could not open a period", extra={"subscription_id": sub.id})
            failed.append(sub.id)
    return created, failed


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
    """Send the charges' tasks (after the commit that made them). An ``enqueue`` that carries a
    ``many`` attribute (``workers.tasks.enqueue_charge``) takes them all in one call, one broker
    message for the lot; a plain callable is called once per charge. A failure is logged and
    nothing more: the charges stay pending, and the reconciler's sweep enqueues them again."""
    if not charge_ids:
        return
    many = getattr(enqueue, "many", None)
    if many is not None:
        try:
            many(charge_ids)
        except Exception:
            log.exception("could not enqueue a batch of charges",
                          extra={"first_charge_id": charge_ids[0], "charges": len(charge_ids)})
        return
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
    """What the Stripe call and the apply step need, all returned by the claim statement (no ORM
    objects cross phases)."""

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
    # The lease the attempt runs under: its fencing token (billing.leases).
    lease_token: str = ""
    manual: bool = False
    # The charge as the claim found it, for the apply step's decision.
    subscription_id: int = 0
    period_index: int = 0
    first_failed_at: datetime | None = None
    # Set when an earlier try failed or was refused (a refusal sets no first_failed_at): such a charge's
    # outcome takes the general apply path, which re-derives the subscription in full.
    last_error_code: str | None = None
    failures: int = 0


def process_charge(charge_id: int, *, gateway: ChargeGateway | None = None, now: datetime | None = None,
                   manual: bool = False) -> str:
    """Run one attempt at a charge, resuming an unfinished one. Returns what happened, in a word:
    the charge's new status, ``skipped:<status>``, ``busy`` (another process holds the charge's
    lease), ``locked`` (its row is held for a moment; try again shortly), ``missing``, or
    ``lease-lost`` (this process stalled past its lease and another took the charge over: that one
    records the outcome).

    ``manual`` lets a staff "retry now" run a retry before its scheduled time; every other rule
    (final states, pauses of nothing else, the lease) is the same path as the scheduled run.
    Raises :class:`~billing.outcomes.TemporaryStripeError` when Stripe could not be reached: the
    attempt stays ``started``, its lease is given back, and a later call resumes it with the same key.
    """
    gateway = stripe_gateway.resolve(gateway)
    claim = _claim(charge_id, now or utcnow(), manual)
    if isinstance(claim, str):
        return claim
    leases.renewer.add(claim.lease_token, claim.charge_id)
    try:
        try:
            outcome = _call_stripe(gateway, claim)
        except TemporaryStripeError as exc:
            outcome = _after_replayed_error(gateway, claim, now or utcnow()) if exc.replayed else None
            if outcome is None:
                _give_back(claim)
                raise
        log.info("Stripe answered", extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id,
                                           "outcome": outcome.kind.value,
                                           "payment_intent_id": outcome.payment_intent_id,
                                           "error_code": outcome.error_code, "decline_code": outcome.decline_code})
        return _finish(claim, outcome, now or utcnow())
    finally:
        leases.renewer.discard(claim.lease_token)


def _give_back(claim: Claim) -> None:
    """Stripe was not reached (or its saved error spent the key): hand the lease back, so the task's
    retry resumes at once instead of waiting for the lease to lapse."""
    try:
        leases.release(claim.charge_id, claim.lease_token)
    except Exception:
        log.warning("could not release a charge lease", exc_info=True, extra={"charge_id": claim.charge_id})


def lease_held(s: Session, charge_id: int) -> bool:
    """Someone is working on the charge outside a transaction right now (a charge attempt calling
    Stripe, the recovery page making a PaymentIntent): the check every path that would change the
    charge makes, with the charge's row locked in ``s`` (so no lease can be taken meanwhile)."""
    return leases.held(s, charge_id)


def lease(charge_id: int):
    """Hold the charge's lease for work outside a transaction that must not run beside a charge
    attempt (the recovery page making a PaymentIntent); yields its token, or ``None`` when busy."""
    return leases.hold(charge_id)


def _after_replayed_error(gateway, claim: Claim, now: datetime) -> PaymentOutcome | None:
    """Stripe replays the error it saved under this attempt's key (a 500 is kept for 24 h), so that
    key is spent. If the request made a PaymentIntent after all, that is the outcome; if not, the
    attempt is closed as abandoned and the charge made claimable again, so the next try is a new
    attempt with a new key — still on the period's one PaymentIntent when it has one. Fenced: only
    while the lease is still this attempt's."""
    if claim.payment_intent_id is None and claim.stripe_customer_id:
        found = gateway.find_payment_intent(customer_id=claim.stripe_customer_id, attempt_id=claim.attempt_id,
                                            attempt_key=claim.idempotency_key)
        if found is not None and ownership.found_is_ours(found, claim, source=ownership.REPLAYED_ERROR):
            return found
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == claim.charge_id).with_for_update()).one()
        attempt = s.get(Attempt, claim.attempt_id, populate_existing=True)
        if attempt.phase == AttemptPhase.started and charge.lease_token == claim.lease_token:
            attempt.phase, attempt.finished_at, attempt.outcome = AttemptPhase.finished, now, "abandoned"
            attempt.message = "Stripe replayed a saved server error for this idempotency key"
            if charge.status == ChargeStatus.processing:
                # Back to where it was claimable: a first try is pending, a retry is due now, and a
                # staff retry of a charge held for review is held again (never auto-retried).
                if charge.first_failed_at is not None:
                    state.move_charge(charge, ChargeStatus.requires_payment_method, now=now)
                    charge.next_retry_at = now
                elif charge.last_error_code is not None:
                    state.move_charge(charge, ChargeStatus.needs_review, now=now)
                else:
                    state.move_charge(charge, ChargeStatus.pending, now=now)
                sub = s.get(Subscription, charge.subscription_id)
                state.refresh_subscription(s, sub, now=now)
            charge.lease_token = charge.lease_expires_at = None
        uow.commit()
    log.warning("attempt abandoned after a replayed Stripe error; the next try uses a new key",
                extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id})
    return None


# Which charges an automatic run may attempt now, as SQL over the charge row ``ch`` (``:manual`` and
# ``:now`` bound): a first try; a declined charge whose retry has come (a staff "retry now" any time);
# a charge held for staff only by their "retry now" (after fixing the cause).
_CHARGEABLE_SQL = f"""(
    ch.status = '{ChargeStatus.pending.value}'
    OR (ch.status = '{ChargeStatus.needs_review.value}' AND :manual)
    OR (ch.status = '{ChargeStatus.requires_payment_method.value}' AND (:manual OR (
        NOT ch.retry_paused AND ch.next_retry_at IS NOT NULL AND ch.next_retry_at <= :now))))"""

# The claim, in one statement (autocommit: no BEGIN, no COMMIT). It locks the charge (SKIP LOCKED:
# a row held by a webhook or staff is "locked", tried again shortly), takes its lease if free, and
# either resumes the attempt a crashed or timed-out worker left ``started`` or — when the charge is
# chargeable, its subscription not canceled (unless staff asked) and the state machine allows the
# move to ``processing`` (:func:`billing.state.sources`) — inserts a new attempt whose key names its
# id (``attempt-<id>-<random>``: Stripe keeps keys per account, and a restored database or a second
# installation reuses ids), with the card of billing.cards' rule (the subscription's, else the
# customer's default; a detached card is none) and that card's mandate. It returns everything the
# Stripe call and the apply step need, and enough about a refusal to name it.
_CLAIM = text(f"""
WITH ch AS (
    SELECT ch.id, ch.subscription_id, ch.status, ch.attempts, ch.amount, ch.currency, ch.payment_intent_id,
           ch.period_start, ch.period_index, ch.first_failed_at, ch.failures, ch.last_error_code,
           {leases.free_sql("ch")} AS lease_free,
           {_CHARGEABLE_SQL} AS chargeable,
           ch.status = ANY(:move_sources) AS may_process
    FROM charges ch WHERE ch.id = :charge_id FOR UPDATE SKIP LOCKED
), sub AS (
    SELECT s.status, s.payment_method_id, cu.stripe_customer_id, cu.default_payment_method_id
    FROM ch JOIN subscriptions s ON s.id = ch.subscription_id JOIN customers cu ON cu.id = s.customer_id
), card AS (
    SELECT pm.id, pm.stripe_payment_method_id, pm.mandate_id
    FROM sub JOIN payment_methods pm ON pm.id IN (sub.payment_method_id, sub.default_payment_method_id)
    WHERE pm.detached_at IS NULL
    ORDER BY pm.id IS NOT DISTINCT FROM sub.payment_method_id DESC LIMIT 1
), resumed AS (
    SELECT a.id, a.number, a.idempotency_key, a.stripe_payment_method_id, a.mandate_id, a.manual
    FROM ch JOIN attempts a ON a.charge_id = ch.id AND a.phase = '{AttemptPhase.started.value}'
    ORDER BY a.number LIMIT 1
), go AS (
    SELECT ch.id, NOT EXISTS (SELECT 1 FROM resumed) AS fresh FROM ch, sub
    WHERE ch.lease_free AND (EXISTS (SELECT 1 FROM resumed) OR (
        ch.chargeable AND ch.may_process AND (sub.status <> '{SubscriptionStatus.canceled.value}' OR :manual)))
), fresh AS (
    INSERT INTO attempts (id, charge_id, number, idempotency_key, phase, manual, payment_method_id,
                          stripe_payment_method_id, mandate_id, started_at)
    SELECT n.id, n.charge_id, n.number, 'attempt-' || n.id || '-' || :key_random, '{AttemptPhase.started.value}',
           :manual, n.pm_id, n.stripe_pm, n.mandate_id, :now
    FROM (SELECT nextval(pg_get_serial_sequence('attempts', 'id')) AS id, ch.id AS charge_id,
                 ch.attempts + 1 AS number, card.id AS pm_id, card.stripe_payment_method_id AS stripe_pm,
                 card.mandate_id
          FROM go JOIN ch ON ch.id = go.id LEFT JOIN card ON true WHERE go.fresh) n
    RETURNING id, number, idempotency_key, stripe_payment_method_id, mandate_id, manual
), claimed AS (
    UPDATE charges c SET
        status = CASE WHEN go.fresh THEN '{ChargeStatus.processing.value}' ELSE c.status END,
        updated_at = CASE WHEN go.fresh THEN :now ELSE c.updated_at END,
        attempts = coalesce((SELECT number FROM fresh), c.attempts),
        retry_requested_at = NULL,
        lease_token = :lease_token, lease_expires_at = {leases.EXPIRES_SQL}
    FROM go WHERE c.id = go.id
    RETURNING c.id
)
SELECT EXISTS (SELECT 1 FROM charges WHERE id = :charge_id) AS present, ch.status, ch.lease_free, ch.chargeable,
       ch.may_process, ch.subscription_id, ch.amount, ch.currency, ch.payment_intent_id, ch.period_start,
       ch.period_index, ch.first_failed_at, ch.failures, ch.last_error_code, sub.status AS subscription_status,
       sub.stripe_customer_id,
       (SELECT count(*) FROM claimed) AS claimed, r.id IS NOT NULL AS resumed,
       coalesce(r.id, f.id) AS attempt_id, coalesce(r.number, f.number) AS attempt_number,
       coalesce(r.idempotency_key, f.idempotency_key) AS idempotency_key,
       CASE WHEN r.id IS NOT NULL THEN r.stripe_payment_method_id ELSE f.stripe_payment_method_id END AS stripe_pm,
       CASE WHEN r.id IS NOT NULL THEN r.mandate_id ELSE f.mandate_id END AS mandate_id,
       coalesce(r.manual, f.manual) AS manual
FROM (SELECT 1) one LEFT JOIN ch ON true LEFT JOIN sub ON true LEFT JOIN resumed r ON true LEFT JOIN fresh f ON true
""")


def _claim(charge_id: int, now: datetime, manual: bool) -> Claim | str:
    """Claim the charge for one attempt (the statement above), or say why not."""
    token = leases.new_token()
    params = {"charge_id": charge_id, "now": now, "manual": manual, "key_random": secrets.token_hex(6),
              **leases.params(token), "move_sources": state.sources(ChargeStatus.processing)}

    def run():
        with autocommit_connection() as conn:
            return conn.execute(_CLAIM, params).one()

    # Safe to send again: the token makes the lease ours on a second try, and an attempt the first
    # try inserted is found as the started one.
    row = retry_on_disconnect(run)
    if not row.present:
        return "missing"
    if row.status is None:
        return "locked"  # held for a moment by a webhook or a staff action: worth trying again shortly
    if not row.claimed:
        return _not_claimed(charge_id, row, now, manual)
    claim = Claim(
        charge_id=charge_id, attempt_id=row.attempt_id, attempt_number=row.attempt_number,
        idempotency_key=row.idempotency_key, resumed=row.resumed, amount=row.amount, currency=row.currency,
        stripe_customer_id=row.stripe_customer_id,
        # The attempt's own record: a resend must carry exactly the parameters of the first send.
        stripe_payment_method_id=row.stripe_pm, mandate_id=row.mandate_id, payment_intent_id=row.payment_intent_id,
        # installation and attempt_key make a PaymentIntent found by this metadata provably this
        # attempt's (billing.ownership): ids repeat in another installation or a restored database.
        metadata={"charge_id": str(charge_id), "attempt_id": str(row.attempt_id),
                  "subscription_id": str(row.subscription_id), "period_start": row.period_start.isoformat(),
                  "installation": installation_id(), "attempt_key": row.idempotency_key},
        lease_token=token, manual=bool(row.manual), subscription_id=row.subscription_id,
        period_index=row.period_index, first_failed_at=row.first_failed_at, failures=row.failures,
        last_error_code=row.last_error_code)
    log.info("charge claimed", extra={"charge_id": charge_id, "attempt_id": claim.attempt_id,
                                      "subscription_id": row.subscription_id,
                                      "attempt_number": claim.attempt_number, "resumed": claim.resumed})
    return claim


def _not_claimed(charge_id: int, row, now: datetime, manual: bool) -> str:
    if not row.lease_free:
        return "busy"
    if not row.chargeable:
        return f"skipped:{row.status}"
    if row.subscription_status == SubscriptionStatus.canceled and not manual:
        return _stop_after_cancel(charge_id, now)
    # Chargeable, but the state machine refuses the move to processing: a bug elsewhere, not a retry.
    log.error("charge not claimed: the state machine refuses the move to processing",
              extra={"charge_id": charge_id, "status": row.status})
    return f"skipped:{row.status}"


def _stop_after_cancel(charge_id: int, now: datetime) -> str:
    """A canceled subscription is not charged automatically any more: a period never attempted is
    void; one already failing keeps its status (the customer may still pay it on the recovery page,
    staff may retry it) but leaves the automatic retry schedule."""
    with unit_of_work() as uow:
        charge = uow.session.scalars(select(Charge).where(Charge.id == charge_id)
                                     .with_for_update(skip_locked=True)).first()
        if charge is None:
            return "locked"
        if lease_held(uow.session, charge_id):
            return "busy"
        if charge.status == ChargeStatus.pending:
            state.move_charge(charge, ChargeStatus.void, now=now)
        charge.next_retry_at = None
        charge.updated_at = now
        status = charge.status
        uow.commit()
    log.info("charge not attempted: subscription canceled", extra={"charge_id": charge_id})
    return f"skipped:canceled:{status}"


def _subscription_and_customer(s: Session, charge: Charge) -> tuple[Subscription, Customer]:
    sub, customer = s.execute(select(Subscription, Customer).join(Customer, Customer.id == Subscription.customer_id)
                              .where(Subscription.id == charge.subscription_id)).one()
    return sub, customer


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
        found = gateway.find_payment_intent(customer_id=claim.stripe_customer_id, attempt_id=claim.attempt_id,
                                            attempt_key=claim.idempotency_key)
        if found is not None and ownership.found_is_ours(found, claim, source=ownership.RESUME):
            log.info("resumed attempt found its PaymentIntent", extra={"charge_id": claim.charge_id,
                                                                       "attempt_id": claim.attempt_id})
            return found
    return gateway.charge_off_session(customer_id=claim.stripe_customer_id,
                                      payment_method_id=claim.stripe_payment_method_id, amount=claim.amount,
                                      currency=claim.currency, mandate_id=claim.mandate_id,
                                      metadata=claim.metadata, idempotency_key=claim.idempotency_key)


# The apply step's common case in one statement: the charge moves as the state machine says
# (billing.state.MOVE_CHARGE_SET_SQL, only from a status of state.sources), fenced by this attempt's
# lease, which it gives back; the attempt records the outcome; and the subscription's other charges
# are summed up so its derived status is checked without another query (state.facts_with).
_APPLY_SIMPLE = text(f"""
WITH ch AS (
    UPDATE charges SET {state.MOVE_CHARGE_SET_SQL},
        payment_intent_id = coalesce(payment_intent_id, :pi), first_failed_at = :first_failed_at,
        next_retry_at = :next_retry_at, give_up_at = :give_up_at,
        retry_requested_at = CASE WHEN :final THEN NULL ELSE retry_requested_at END,
        lease_token = NULL, lease_expires_at = NULL
    WHERE id = :charge_id AND lease_token = :lease_token AND status = ANY(:move_sources)
      AND EXISTS (SELECT 1 FROM attempts WHERE id = :attempt_id AND phase = '{AttemptPhase.started.value}')
    RETURNING subscription_id
), att AS (
    UPDATE attempts SET phase = '{AttemptPhase.finished.value}', finished_at = :now, outcome = :outcome,
        payment_intent_id = coalesce(:pi, payment_intent_id), error_code = :error_code,
        decline_code = :decline_code, advice_code = :advice_code, message = :message
    WHERE id = :attempt_id AND EXISTS (SELECT 1 FROM ch)
    RETURNING id
)
SELECT s.id, s.status, s.canceled_at, (SELECT count(*) FROM att) AS recorded, f.*
FROM ch JOIN subscriptions s ON s.id = ch.subscription_id CROSS JOIN ({state.OTHER_CHARGES_FACTS_SQL}) f
""")


def _simple(decision: dunning.Decision, claim: Claim) -> bool:
    """A decision that writes nothing but the charge and its attempt (no email, no reminder to drop,
    no recovery link to use up, no give-up): a payment or an accepted ``processing`` on a charge that
    never failed — what almost every charge ends as."""
    return (decision.notify is None and not decision.reminders and not decision.give_up and not decision.alert
            and decision.charge_status in (ChargeStatus.paid, ChargeStatus.processing)
            and decision.first_failed_at is None and claim.first_failed_at is None
            and claim.last_error_code is None)


def _finish(claim: Claim, outcome: PaymentOutcome, now: datetime) -> str:
    """Record Stripe's answer and apply it, only while the lease is still this attempt's."""
    result = retry_on_disconnect(lambda: _finish_once(claim, outcome, now))
    metrics.observe_attempt(outcome, result)
    log.info("charge attempt finished", extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id,
                                               "outcome": outcome.kind.value, "decline_code": outcome.decline_code,
                                               "status": result})
    return result


def _finish_once(claim: Claim, outcome: PaymentOutcome, now: datetime) -> str:
    decision = None
    if outcome.kind in (OutcomeKind.succeeded, OutcomeKind.processing):
        decision = dunning.decide(outcome, failures=claim.failures, first_failed_at=claim.first_failed_at, now=now,
                                  config=dunning_config())
    if decision is not None and _simple(decision, claim):
        result = _finish_simple(claim, outcome, decision, now)
        if result is not None:
            return result
    return _finish_general(claim, outcome, now)


def _finish_simple(claim: Claim, outcome: PaymentOutcome, decision: dunning.Decision, now: datetime) -> str | None:
    """One short transaction: BEGIN, the statement above, COMMIT — plus the subscription's refresh in
    the rare case its status changes. ``None`` when the statement found the charge not as the claim
    left it (moved on, or the lease lost): the general path then says what happened.

    A Core connection owns this transaction (committed when the block ends, rolled back if it
    raises): an ORM session costs a tenth of a charge's CPU here, and is made only for the refresh."""
    with get_engine().begin() as conn:
        row = conn.execute(_APPLY_SIMPLE, {
            "charge_id": claim.charge_id, "attempt_id": claim.attempt_id, "lease_token": claim.lease_token,
            "now": now, "pi": outcome.payment_intent_id, "first_failed_at": decision.first_failed_at,
            "next_retry_at": decision.next_retry_at, "give_up_at": decision.give_up_at,
            "final": decision.charge_status in state.FINAL, "outcome": outcome.kind.value,
            "error_code": outcome.error_code, "decline_code": outcome.decline_code,
            "advice_code": outcome.advice_code, "message": outcome.message,
            "facts_sub": claim.subscription_id, "facts_charge": claim.charge_id,
            **state.move_params(decision.charge_status, now=now)}).first()
        if row is None:
            return None
        open_failure, given_up = state.facts_with(
            others_open_failure=row.others_open_failure, others_given_up_index=row.others_given_up_index,
            others_settled_index=row.others_settled_index, status=decision.charge_status,
            first_failed_at=decision.first_failed_at, period_index=claim.period_index)
        if state.subscription_status_with(row.status, row.canceled_at, open_failure, given_up) != row.status:
            with Session(bind=conn) as s:  # joins this transaction
                state.refresh_subscription(s, s.get(Subscription, row.id), now=now)
                s.flush()
    return str(decision.charge_status)


def _finish_general(claim: Claim, outcome: PaymentOutcome, now: datetime) -> str:
    """Every other outcome (a decline and its emails, a hold for staff, a give-up…): the ORM path
    shared with webhooks and the reconciler (:func:`apply_outcome`), in one transaction."""
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == claim.charge_id).with_for_update()).one()
        attempt = s.get(Attempt, claim.attempt_id, populate_existing=True)
        if attempt.phase == AttemptPhase.finished:
            return "already-finished"
        if charge.lease_token != claim.lease_token:
            # Fenced: this process stalled past its lease and another resumed the attempt; that one
            # records Stripe's answer (the same answer: it resends the same idempotency key).
            log.warning("charge lease lost before the outcome was recorded; left to its new holder",
                        extra={"charge_id": claim.charge_id, "attempt_id": claim.attempt_id})
            return "lease-lost"
        with s.no_autoflush:  # one UPDATE per row at commit, not one per attribute group
            record_attempt_outcome(attempt, outcome, now)
            if outcome.payment_intent_id and not charge.payment_intent_id:
                charge.payment_intent_id = outcome.payment_intent_id
            charge.lease_token = charge.lease_expires_at = None
            result = apply_outcome(s, charge, outcome, now=now, attempt_number=attempt.number,
                                   attempt_id=attempt.id, manual=attempt.manual)
        uow.commit()
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
    failures = charge.failures + (1 if outcome.kind is OutcomeKind.declined and not manual else 0)
    decision = dunning.decide(outcome, failures=failures, first_failed_at=charge.first_failed_at, now=now,
                              config=dunning_config())
    if not state.can_move(charge.status, decision.charge_status):
        # Nothing is written, the failure count included: a refused outcome uses up no retry.
        log.warning("outcome ignored: the state machine refuses the move",
                    extra={"charge_id": charge.id, "status": charge.status, "wanted": decision.charge_status.value,
                           "outcome": outcome.kind.value})
        return f"ignored:{charge.status}"
    charge.failures = failures
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
    if decision.charge_status in state.WAITING_ON_CUSTOMER:
        # Emails held while staff reviewed the charge are true again: they go out now.
        notifications.release_held(s, charge.id, now)
    charge.next_retry_at = decision.next_retry_at
    charge.give_up_at = decision.give_up_at
    if decision.charge_status in state.FINAL:
        charge.retry_requested_at = None
    if decision.charge_status == ChargeStatus.paid:
        if decision.first_failed_at is not None:
            # Only a charge that failed has recovery links out (and reminders, dropped below).
            recovery.consume_for_charge(s, charge.id, now)
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
