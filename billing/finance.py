"""What finance staff see of one charge, what they may do to it, and the overview's figures.

Actions follow Kill Bill's rule for manual writes: each names who did it and why. The audit row is
written in the same transaction as the change it records, so there is never a change without its
entry nor an entry without its change; the table refuses UPDATE and DELETE (a trigger).

Work that must leave the database (a charge attempt, the outbox relay) is handed to ``jobs`` and runs
only after that transaction commits. "Retry now" goes through the very path of the scheduled run,
``charging.process_charge(manual=True)``: the same claim lock, idempotency key and outcome handling.

Actions refuse while an attempt is in flight (someone holds the charge's lease, or the charge is
``processing``): a void racing a successful payment would write off money that was just collected.

A ``needs_review`` charge (Stripe refused the request itself, not the card) waits for staff alone:
"retry now" once the cause is fixed (the amount or currency, the customer at Stripe), or "void".
Nothing retries it automatically, so pausing or resuming retries does not apply, and the customer
was never emailed, so there is no recovery email to resend.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from billing import cards, charging, notifications, state
from billing.clock import utcnow
from billing.db import unit_of_work
from billing.dunning import NotificationKind, explain_decline, explain_refusal
from billing.models import (
    Attempt,
    AuditEntry,
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    NotificationStatus,
    PaymentMethod,
    RecoveryToken,
    Subscription,
    SubscriptionStatus,
    WebhookEvent,
)
from billing.outcomes import OutcomeKind

log = logging.getLogger(__name__)

MAX_REASON_LENGTH = 2000


class Action(enum.StrEnum):
    retry_now = "retry_now"
    pause_retries = "pause_retries"
    resume_retries = "resume_retries"
    resend_recovery_email = "resend_recovery_email"
    void = "void"
    cancel_subscription = "cancel_subscription"


ACTION_LABELS = {
    Action.retry_now: "Retry now",
    Action.pause_retries: "Pause automatic retries",
    Action.resume_retries: "Resume automatic retries",
    Action.resend_recovery_email: "Resend the recovery email",
    Action.void: "Void (write off)",
    Action.cancel_subscription: "Cancel the subscription",
}


DONE_MESSAGES = {
    Action.retry_now: "A retry is on its way; reload this page to see its outcome once the bank has answered.",
    Action.pause_retries: "Automatic retries are paused for this charge.",
    Action.resume_retries: "Automatic retries are back on for this charge.",
    Action.resend_recovery_email: "A new recovery email is on its way to the customer.",
    Action.void: "The charge is written off; its pending reminders are dropped.",
    Action.cancel_subscription: "The subscription is canceled: no further periods will be charged.",
}


class ActionRefused(Exception):
    """The action does not apply to the charge as it is now; nothing was changed or recorded."""


class NotFound(Exception):
    pass


class Jobs(Protocol):
    """What an action hands on after its transaction committed (Celery in production)."""

    def retry_charge(self, charge_id: int) -> None: ...

    def relay_outbox(self) -> None: ...



# --- actions --------------------------------------------------------------------------------------

def _allowed(action: Action, charge: Charge, sub: Subscription) -> str | None:
    """Why ``action`` does not apply now (``None``: it does)."""
    status = charge.status
    if status == ChargeStatus.processing:
        return "an attempt at this charge is running; try again in a moment"
    if action is Action.cancel_subscription:
        return "the subscription is already canceled" if sub.status == SubscriptionStatus.canceled else None
    if status in state.FINAL:
        return f"the charge is {status}; nothing more can be done to it"
    if status == ChargeStatus.needs_review and action in (Action.pause_retries, Action.resume_retries):
        return "Stripe refused this request; it is never retried automatically — retry it once the cause is fixed"
    if action is Action.retry_now:
        if status == ChargeStatus.authentication_required:
            return ("the bank wants the customer to authenticate this payment; a retry without them would be "
                    "declined again — resend the recovery email instead")
        return None
    if action is Action.pause_retries:
        return "automatic retries are already paused" if charge.retry_paused else None
    if action is Action.resume_retries:
        return None if charge.retry_paused else "automatic retries are not paused"
    if action is Action.resend_recovery_email:
        return None if status in state.WAITING_ON_CUSTOMER else "the charge does not wait for the customer"
    return None


def check_reason(reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("a written reason is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise ActionRefused(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    return reason


def perform(action: Action | str, charge_id: int, *, actor: str, reason: str | None, jobs: Jobs,
            now: datetime | None = None) -> str:
    """Do ``action`` to the charge, with its audit entry, in one transaction. Returns what happened,
    in words for the operator. Raises :class:`ActionRefused` (nothing changed) or :class:`NotFound`."""
    try:
        action = Action(action)
    except ValueError:
        raise ActionRefused(f"unknown action {action!r}") from None
    reason = check_reason(reason)
    now = now or utcnow()
    # The row lock keeps a worker from starting an attempt while we change the charge (its claim skips
    # a locked row) and keeps webhooks out; a live lease means an attempt runs: we leave it alone.
    with unit_of_work() as uow:
        s = uow.session
        charge = s.scalars(select(Charge).where(Charge.id == charge_id).with_for_update()).first()
        if charge is None:
            raise NotFound(f"charge {charge_id} not found")
        if charging.lease_held(s, charge_id):
            raise ActionRefused("an attempt at this charge is running; try again in a moment")
        sub = s.get(Subscription, charge.subscription_id, with_for_update=True)
        refusal = _allowed(action, charge, sub)
        if refusal:
            raise ActionRefused(refusal)
        # The entry's id is drawn first, so what the action writes can name it (the resend's key).
        audit_id = s.execute(text("SELECT nextval(pg_get_serial_sequence('audit_log', 'id'))")).scalar_one()
        details: dict[str, Any] = {"charge_status": charge.status, "subscription_status": sub.status}
        after: list[Callable[[], None]] = []
        message = _HANDLERS[action](s, after, charge, sub, jobs, now, audit_id, details)
        s.add(AuditEntry(id=audit_id, at=now, actor=actor, action=action.value, charge_id=charge.id,
                         subscription_id=sub.id, reason=reason, details=details))
        uow.commit()
    log.info("finance action", extra={"action": action.value, "charge_id": charge_id, "audit_id": audit_id})
    # Committed, and the row lock released: a worker taking the job at once finds the charge free.
    for job in after:
        try:
            job()
        except Exception:
            # Recorded and committed; the periodic sweeps (retry_due, relay_outbox) pick the work up.
            log.exception("could not hand a finance action on", extra={"charge_id": charge_id})
    return message


def _retry_now(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    charge_id = charge.id
    # Durable: if the task is lost, or finds the charge busy, the retry sweep sends it again until an
    # attempt has claimed the charge (which clears the request).
    charge.retry_requested_at = now
    after.append(lambda: jobs.retry_charge(charge_id))
    return "A retry is on its way; this page shows its outcome once the bank has answered."


def _pause(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    charge.retry_paused = True
    charge.updated_at = now
    return "Automatic retries are paused for this charge."


def _resume(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    charge.retry_paused = False
    charge.updated_at = now
    details["next_retry_at"] = charge.next_retry_at.isoformat() if charge.next_retry_at else None
    return "Automatic retries are back on for this charge."


def _resend(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    customer = s.get(Customer, sub.customer_id)
    kind = (NotificationKind.authentication_required if charge.status == ChargeStatus.authentication_required
            else NotificationKind.payment_failed)
    key = f"charge-{charge.id}:resend-{audit_id}"
    notifications.enqueue(s, kind=kind, charge=charge, customer=customer, dedupe_key=key, send_after=now)
    details.update(dedupe_key=key, kind=kind.value)
    after.append(jobs.relay_outbox)
    return f"A new recovery email to {customer.email} is on its way."


def _void(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    state.move_charge(charge, ChargeStatus.void, now=now)
    charge.next_retry_at = None
    details["dropped_reminders"] = notifications.drop_pending_reminders(s, charge.id)
    # No open failure left: billing resumes with the next period (the catch-up policy in billing.state).
    details["subscription_status_after"] = state.refresh_subscription(s, sub, now=now).value
    return "The charge is written off; its reminders are dropped."


def _cancel(s, after, charge, sub, jobs, now, audit_id, details) -> str:
    state.cancel_subscription(sub, now=now)
    return "The subscription is canceled: no further periods will be charged. This charge stays as it is."


_HANDLERS: dict[Action, Callable[..., str]] = {
    Action.retry_now: _retry_now, Action.pause_retries: _pause, Action.resume_retries: _resume,
    Action.resend_recovery_email: _resend, Action.void: _void, Action.cancel_subscription: _cancel,
}


def available_actions(charge: Charge, sub: Subscription) -> dict[Action, str | None]:
    """Every action, with why it is unavailable (``None`` when it is available)."""
    return {action: _allowed(action, charge, sub) for action in Action}


# --- one charge -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str  # attempt | email | webhook | staff | recovery | charge
    title: str
    detail: str = ""
    ids: tuple[str, ...] = ()


@dataclass
class ChargeDetail:
    charge: Charge
    subscription: Subscription
    customer: Customer
    card: PaymentMethod | None
    attempts: list[Attempt]
    events: list[Event]
    explanation: str | None
    actions: dict[Action, str | None] = field(default_factory=dict)

    @property
    def stripe_ids(self) -> list[tuple[str, str]]:
        ids = [("Customer", self.customer.stripe_customer_id)]
        if self.card is not None:
            ids.append(("Payment method", self.card.stripe_payment_method_id))
            ids.append(("Mandate", self.card.mandate_id))
        ids.append(("PaymentIntent", self.charge.payment_intent_id))
        return [(k, v) for k, v in ids if v]




def _explanation(charge: Charge) -> str | None:
    """Why the charge is where it is: Stripe's refusal of the request (``needs_review``), else the decline."""
    if charge.status == ChargeStatus.needs_review:
        return explain_refusal(charge.last_error_code)
    if charge.last_error_code or charge.last_decline_code:
        return explain_decline(charge.last_decline_code, charge.last_advice_code, charge.last_error_code)
    return None


def charge_detail(session: Session, charge_id: int) -> ChargeDetail:
    s = session
    charge = s.get(Charge, charge_id)
    if charge is None:
        raise NotFound(f"charge {charge_id} not found")
    sub = s.get(Subscription, charge.subscription_id)
    customer = s.get(Customer, sub.customer_id)
    card = cards.card_for(s, sub, customer)
    attempts = list(s.scalars(select(Attempt).where(Attempt.charge_id == charge.id).order_by(Attempt.number)))
    events: list[Event] = [Event(charge.created_at, "charge", "Period opened",
                                 f"{charge.period_start:%Y-%m-%d} – {charge.period_end:%Y-%m-%d}")]
    for a in attempts:
        events.append(Event(a.started_at, "attempt", f"Attempt {a.number} started",
                            "card " + (a.stripe_payment_method_id or "none"), (a.idempotency_key,)))
        if a.finished_at:
            if a.outcome == OutcomeKind.refused:
                words = explain_refusal(a.error_code)
            elif a.error_code or a.decline_code:
                words = explain_decline(a.decline_code, a.advice_code, a.error_code)
            else:
                words = ""
            codes = "/".join(c for c in (a.error_code, a.decline_code, a.advice_code) if c)
            events.append(Event(a.finished_at, "attempt", f"Attempt {a.number}: {a.outcome}",
                                f"{codes} — {words}" if codes else "", tuple(i for i in (a.payment_intent_id,) if i)))
    for n in s.scalars(select(Notification).where(Notification.charge_id == charge.id).order_by(Notification.id)):
        events.append(Event(n.created_at, "email", f"Email queued: {n.kind}", n.to_email, (n.dedupe_key,)))
        if n.status == NotificationStatus.sent and n.sent_at:
            events.append(Event(n.sent_at, "email", f"Email sent: {n.kind}", n.to_email))
        elif n.status == NotificationStatus.dropped:
            events.append(Event(n.send_after, "email", f"Email dropped: {n.kind}", "no longer needed"))
        elif n.status == NotificationStatus.dead:
            events.append(Event(n.send_after, "email", f"Email given up: {n.kind}",
                                f"not sent after {n.tries} tries; last error {(n.last_error or '')[:200]}"))
        elif n.last_error:
            events.append(Event(n.send_after, "email", f"Email not sent yet: {n.kind}",
                                f"{n.tries} tries; last error {n.last_error[:200]}"))
    for t in s.scalars(select(RecoveryToken).where(RecoveryToken.charge_id == charge.id)):
        if t.opened_at:
            events.append(Event(t.opened_at, "recovery", "Customer opened the recovery page"))
        if t.used_at:
            events.append(Event(t.used_at, "recovery", "Customer completed the recovery page"))
    intents = {i for i in [charge.payment_intent_id, *(a.payment_intent_id for a in attempts)] if i}
    if intents:
        for w in s.scalars(select(WebhookEvent).where(WebhookEvent.object_id.in_(intents))):
            events.append(Event(w.received_at, "webhook", f"Webhook {w.type}", f"outcome: {w.outcome or 'pending'}",
                                (w.stripe_event_id,)))
    for e in s.scalars(select(AuditEntry).where(AuditEntry.charge_id == charge.id).order_by(AuditEntry.id)):
        events.append(Event(e.at, "staff", f"{ACTION_LABELS.get(e.action, e.action)} — by {e.actor}",
                            e.reason or ""))
    if charge.paid_at:
        events.append(Event(charge.paid_at, "charge", "Paid"))
    events.sort(key=lambda e: e.at)
    explanation = _explanation(charge)
    return ChargeDetail(charge, sub, customer, card, attempts, events, explanation, available_actions(charge, sub))


# --- the overview -------------------------------------------------------------------------------------

@dataclass
class Overview:
    # (status, currency) → (count, amount in minor units)
    totals: list[tuple[str, str, int, int]]
    # (week start, failed, recovered)
    weekly: list[tuple[datetime, int, int]]
    # code → {"recovered": n, "waiting": n, "lost": n}
    by_decline: list[tuple[str, dict[str, int]]]
    by_country: list[tuple[str, dict[str, int]]]
    # currency → (active subscriptions, amount per period) riding on previous-authorization cards
    previous_authorization: list[tuple[str, int, int]]
    previous_authorization_failed: int


def _outcome_case():
    return case((Charge.status == ChargeStatus.paid.value, "recovered"),
                (Charge.status.in_([ChargeStatus.uncollectible.value, ChargeStatus.void.value]), "lost"),
                else_="waiting")


def _outcomes(rows) -> list[tuple[str, dict[str, int]]]:
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"recovered": 0, "waiting": 0, "lost": 0})
    for key, outcome, n in rows:
        table[key or "unknown"][outcome] += n
    return sorted(table.items(), key=lambda kv: -sum(kv[1].values()))


def overview(session: Session, *, weeks: int = 12, now: datetime | None = None) -> Overview:
    s = session
    now = now or utcnow()
    totals = [tuple(r) for r in s.execute(
        select(Charge.status, Charge.currency, func.count(), func.sum(Charge.amount))
        .group_by(Charge.status, Charge.currency).order_by(Charge.currency, Charge.status))]
    week = func.date_trunc("week", Charge.first_failed_at)
    since = now - timedelta(weeks=weeks)
    weekly_rows = {r[0]: (r[1], r[2]) for r in s.execute(
        select(week, func.count(), func.count().filter(Charge.status == ChargeStatus.paid.value))
        .where(Charge.first_failed_at.is_not(None), Charge.first_failed_at >= since).group_by(week))}
    start = (now - timedelta(days=now.weekday(), weeks=weeks - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    weekly = []
    for i in range(weeks):
        w = start + timedelta(weeks=i)
        failed, recovered = next(((f, r) for k, (f, r) in weekly_rows.items() if k.date() == w.date()), (0, 0))
        weekly.append((w, failed, recovered))
    failed = Charge.first_failed_at.is_not(None)
    code = func.coalesce(Charge.last_decline_code, Charge.last_error_code)
    # Grouped by position: the CASE's bound parameters would make two spellings of one expression.
    by_decline = _outcomes(s.execute(select(code, _outcome_case(), func.count()).where(failed)
                                     .group_by(text("1"), text("2"))))
    card_id = cards.card_on_file_sql()
    by_country = _outcomes(s.execute(
        select(PaymentMethod.country, _outcome_case(), func.count())
        .select_from(Charge).join(Subscription, Subscription.id == Charge.subscription_id)
        .join(Customer, Customer.id == Subscription.customer_id)
        .outerjoin(PaymentMethod, PaymentMethod.id == card_id)
        .where(failed).group_by(text("1"), text("2"))))
    prev = [tuple(r) for r in s.execute(
        select(Subscription.currency, func.count(), func.sum(Subscription.amount))
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(PaymentMethod, PaymentMethod.id == card_id)
        .where(PaymentMethod.previous_authorization.is_(True), Subscription.status != SubscriptionStatus.canceled)
        .group_by(Subscription.currency).order_by(Subscription.currency))]
    prev_failed = s.scalar(
        select(func.count()).select_from(Charge).join(Subscription, Subscription.id == Charge.subscription_id)
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(PaymentMethod, PaymentMethod.id == card_id)
        .where(PaymentMethod.previous_authorization.is_(True), failed)) or 0
    return Overview(totals, weekly, by_decline, by_country, prev, prev_failed)
