"""The state machine: the only code that changes a charge's or a subscription's status.

Every path that moves money or dunning along (the charge task, webhooks, the reconciler, the recovery
page, staff actions, cancellation) asks this module for a transition. It refuses an illegal one with
:class:`IllegalTransition`, so a bug elsewhere shows up as an error in a log, not as a silently wrong
book (cosmicpython ``domain/model.py``: one aggregate owns its invariants).

Charges. One row per subscription period; the table below is the whole lifecycle::

    pending ──▶ processing ──▶ paid
       │            │  ▲
       │            ▼  │  (retry, recovery page, staff retry)
       │     authentication_required · requires_payment_method · needs_review
       │            │
       ▼            ▼
      void     uncollectible ──▶ paid   (money collected after give-up or write-off is still money)

A charge is *open* until it is ``paid``, ``uncollectible`` or ``void``. ``processing`` may return to
``pending`` only when an attempt is abandoned before it reached Stripe's books (a replayed saved 500).

Subscriptions. Their status is **derived** from their charges, never written by a caller:

* ``canceled`` once canceled (by the merchant, staff, or a give-up under
  ``BILLING_FINAL_SUBSCRIPTION_STATUS=canceled``); final;
* else ``past_due`` while any charge has an open failure (waiting on the customer or staff, or a
  retry of a failed charge still in flight);
* else ``unpaid`` while a given-up (``uncollectible``) charge is the latest word on the subscription
  (no later period paid or written off);
* else ``active``.

So "whichever outcome landed last" cannot decide it: two charges of one subscription settling in any
order give the same answer. One open period at a time: the billing run opens a period only for an
``active`` subscription with no open charge (:func:`has_open_charge`).

Catch-up after a hold (documented in the README): periods that ended entirely while billing was held
(``past_due`` / ``unpaid``) are skipped, not back-billed; billing resumes with the period that contains
the moment it resumed, on the subscription's original calendar (:func:`skip_missed_periods`). A void
therefore resumes billing from the next period, and a January paid in May bills May next, not
February to May.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session, aliased

from billing.models import Charge, ChargeStatus, Subscription, SubscriptionStatus
from billing.periods import period_bounds
from billing.settings import get_settings

log = logging.getLogger(__name__)

_P, _PR, _PAID = ChargeStatus.pending, ChargeStatus.processing, ChargeStatus.paid
_AUTH, _RPM, _REVIEW = (ChargeStatus.authentication_required, ChargeStatus.requires_payment_method,
                        ChargeStatus.needs_review)
_UNC, _VOID = ChargeStatus.uncollectible, ChargeStatus.void

FINAL = frozenset({_PAID, _UNC, _VOID})
# Waiting on the customer after a failure (authenticate, give a new card): emails and links concern these.
WAITING_ON_CUSTOMER = frozenset({_AUTH, _RPM})
# Waiting on someone (the customer or staff) after a failure: the retry queue's working set.
WAITING = WAITING_ON_CUSTOMER | {_REVIEW}
# Not decided yet: the run's `--wait` and the demo wait for charges to leave these.
IN_FLIGHT = frozenset({_P, _PR})
OPEN = frozenset(ChargeStatus) - FINAL

# from → the statuses it may move to. A status may always "move" to itself (a refresh of timestamps).
CHARGE_TRANSITIONS: dict[ChargeStatus, frozenset[ChargeStatus]] = {
    # → paid: a success about an attempt that was abandoned (the charge went back to pending) is still
    # money collected, and is recorded.
    _P: frozenset({_PR, _VOID, _PAID}),
    _PR: frozenset({_PAID, _AUTH, _RPM, _REVIEW, _UNC, _P}),
    _AUTH: frozenset({_PR, _PAID, _RPM, _UNC, _VOID}),
    _RPM: frozenset({_PR, _PAID, _AUTH, _UNC, _VOID}),
    _REVIEW: frozenset({_PR, _PAID, _UNC, _VOID}),
    _UNC: frozenset({_PAID}),
    _VOID: frozenset({_PAID}),
    _PAID: frozenset(),
}


class IllegalTransition(Exception):
    """A caller asked for a move the table does not allow; nothing was changed."""

    def __init__(self, charge_id: int | None, current: str, wanted: str):
        super().__init__(f"charge {charge_id}: {current} → {wanted} is not a legal transition")
        self.charge_id, self.current, self.wanted = charge_id, current, wanted


def can_move(current: str, wanted: str) -> bool:
    current, wanted = ChargeStatus(current), ChargeStatus(wanted)
    return wanted == current or wanted in CHARGE_TRANSITIONS[current]


def move_charge(charge: Charge, wanted: ChargeStatus | str, *, now: datetime) -> bool:
    """Move a (locked) charge to ``wanted``. Returns whether its status changed.

    The caller holds the charge's row lock and refreshes its subscription afterwards
    (:func:`refresh_subscription`) in the same transaction."""
    wanted = ChargeStatus(wanted)
    if not can_move(charge.status, wanted):
        raise IllegalTransition(charge.id, charge.status, wanted)
    changed = charge.status != wanted
    charge.status = wanted
    charge.updated_at = now
    if wanted is _PAID and changed:
        charge.paid_at = now
    return changed


def sources(wanted: ChargeStatus | str) -> list[str]:
    """The statuses a charge may move to ``wanted`` from (itself included), read off
    :data:`CHARGE_TRANSITIONS`: what a set-based move puts in its ``WHERE status = ANY(…)``."""
    wanted = ChargeStatus(wanted)
    return sorted(s.value for s in ChargeStatus if can_move(s, wanted))


# :func:`move_charge` as SQL, for the charge path's single-statement writes: the same columns, the same
# rule for ``paid_at``. The statement must also say ``WHERE status = ANY(:move_sources)`` (:func:`sources`),
# so a move the table refuses changes no row. Parameters: :func:`move_params`.
MOVE_CHARGE_SET_SQL = ("status = CAST(:move_to AS varchar), updated_at = :move_now, paid_at = CASE "
                       "WHEN CAST(:move_to AS varchar) = 'paid' AND status <> 'paid' THEN :move_now ELSE paid_at END")


def move_params(wanted: ChargeStatus | str, *, now: datetime) -> dict:
    wanted = ChargeStatus(wanted)
    return {"move_to": wanted.value, "move_now": now, "move_sources": sources(wanted)}


# --- subscriptions --------------------------------------------------------------------------------

def derive_subscription_status(*, canceled: bool, open_failure: bool, given_up: bool,
                               final_status: SubscriptionStatus) -> SubscriptionStatus:
    """The status a subscription's charges imply (pure: the rule itself, tested without a database)."""
    if canceled:
        return SubscriptionStatus.canceled
    if open_failure:
        return SubscriptionStatus.past_due
    if given_up:
        # ``canceled`` as the final status is applied as a cancellation (canceled_at) by give_up().
        return SubscriptionStatus.unpaid if final_status is SubscriptionStatus.unpaid else SubscriptionStatus.canceled
    return SubscriptionStatus.active


def is_open_failure(status: str, first_failed_at: datetime | None, last_error_code: str | None) -> bool:
    """A charge that is waiting on someone after a failure, or a retry of one still in flight. A
    refusal held for staff sets no ``first_failed_at`` (the customer's dunning clock never started)
    but does record its ``last_error_code``, so a staff retry of it in flight is a failure too."""
    if status in WAITING:
        return True
    return status in IN_FLIGHT and (first_failed_at is not None or last_error_code is not None)


def _facts(s: Session, sub_id: int) -> tuple[bool, bool]:
    """(an open failure, a given-up charge not superseded by a later paid or void period)."""
    later = aliased(Charge)
    rows = s.execute(
        select(Charge.status, Charge.first_failed_at, Charge.last_error_code).where(
            Charge.subscription_id == sub_id,
            Charge.status.in_([*(v.value for v in OPEN), _UNC.value]),
            ~exists().where(and_(later.subscription_id == Charge.subscription_id,
                                 later.period_index > Charge.period_index,
                                 later.status.in_([_PAID.value, _VOID.value]))) | (Charge.status != _UNC.value))
    ).all()
    open_failure = any(is_open_failure(status, failed, code) for status, failed, code in rows)
    given_up = any(status == _UNC for status, _, _ in rows)
    return open_failure, given_up


# What a subscription's *other* charges say, gathered in the statement that moves one charge (the charge
# path's apply): that charge's new status is not visible to the statement that writes it, so it is
# combined in Python by :func:`facts_with`. Parameters: ``:facts_sub`` (the subscription), ``:facts_charge``.
OTHER_CHARGES_FACTS_SQL = f"""
    SELECT coalesce(bool_or(o.status = ANY(ARRAY[{", ".join(f"'{v.value}'" for v in sorted(WAITING))}])
                            OR (o.status = ANY(ARRAY[{", ".join(f"'{v.value}'" for v in sorted(IN_FLIGHT))}])
                                AND (o.first_failed_at IS NOT NULL OR o.last_error_code IS NOT NULL))),
                    false) AS others_open_failure,
           max(o.period_index) FILTER (WHERE o.status = '{_UNC.value}' AND NOT EXISTS (
               SELECT 1 FROM charges l WHERE l.subscription_id = o.subscription_id AND l.id <> :facts_charge
                 AND l.period_index > o.period_index
                 AND l.status IN ('{_PAID.value}', '{_VOID.value}'))) AS others_given_up_index,
           max(o.period_index) FILTER (WHERE o.status IN ('{_PAID.value}', '{_VOID.value}')) AS others_settled_index
    FROM charges o WHERE o.subscription_id = :facts_sub AND o.id <> :facts_charge"""


def facts_with(*, others_open_failure: bool, others_given_up_index: int | None, others_settled_index: int | None,
               status: ChargeStatus | str, first_failed_at: datetime | None, period_index: int,
               last_error_code: str | None = None) -> tuple[bool, bool]:
    """:func:`_facts` for a subscription, from :data:`OTHER_CHARGES_FACTS_SQL` plus one charge's new
    status (the same rule: :func:`is_open_failure`; a given-up charge no later paid or void period
    supersedes)."""
    status = ChargeStatus(status)
    open_failure = others_open_failure or is_open_failure(status, first_failed_at, last_error_code)
    supersedes = status in (_PAID, _VOID)
    given_up = (others_given_up_index is not None
                and not (supersedes and period_index > others_given_up_index))
    if status == _UNC and not (others_settled_index is not None and others_settled_index > period_index):
        given_up = True
    return open_failure, given_up


def subscription_status_with(sub_status: str, canceled_at: datetime | None, open_failure: bool, given_up: bool,
                             final_status: SubscriptionStatus | None = None) -> SubscriptionStatus:
    """What :func:`refresh_subscription` would set, from facts already gathered (no query)."""
    if final_status is None:
        final_status = SubscriptionStatus(get_settings().final_subscription_status)
    canceled = canceled_at is not None or sub_status == SubscriptionStatus.canceled
    return derive_subscription_status(canceled=canceled, open_failure=open_failure, given_up=given_up,
                                      final_status=final_status)


def refresh_subscription(s: Session, sub: Subscription, *, now: datetime,
                         final_status: SubscriptionStatus | None = None) -> SubscriptionStatus:
    """Set the subscription's status to what its charges imply (call after every charge transition,
    in its transaction; the caller holds the charge's lock). ``final_status`` defaults to
    ``BILLING_FINAL_SUBSCRIPTION_STATUS``.

    Leaving a hold (``past_due``/``unpaid`` → ``active``) applies the catch-up policy."""
    if final_status is None:
        final_status = SubscriptionStatus(get_settings().final_subscription_status)
    s.flush()  # the charge's new status must be visible to the query below
    open_failure, given_up = _facts(s, sub.id)
    canceled = sub.canceled_at is not None or sub.status == SubscriptionStatus.canceled
    wanted = derive_subscription_status(canceled=canceled, open_failure=open_failure, given_up=given_up,
                                        final_status=final_status)
    previous = sub.status
    if wanted != previous:
        if wanted is SubscriptionStatus.active:
            skip_missed_periods(sub, now)
        sub.status = wanted
        log.info("subscription status", extra={"subscription_id": sub.id, "from": previous, "to": wanted.value})
    return wanted


def cancel_subscription(sub: Subscription, *, now: datetime) -> bool:
    """Cancel (final). Returns whether it was not canceled before."""
    if sub.status == SubscriptionStatus.canceled:
        return False
    sub.status = SubscriptionStatus.canceled
    sub.canceled_at = now
    return True


def skip_missed_periods(sub: Subscription, now: datetime) -> int:
    """Move the subscription's next period forward past every period that ended before ``now``, so
    billing resumes with the period containing ``now``. Returns how many periods were skipped."""
    skipped = 0
    while True:
        _start, end = period_bounds(sub.anchor_at, sub.interval, sub.interval_count, sub.next_period_index)
        if end > now:
            break
        sub.next_period_index += 1
        skipped += 1
    if skipped:
        sub.next_charge_at, _ = period_bounds(sub.anchor_at, sub.interval, sub.interval_count, sub.next_period_index)
        log.info("missed periods skipped on resume", extra={"subscription_id": sub.id, "skipped": skipped})
    return skipped


def has_open_charge():
    """SQL: the subscription (``Subscription``) has a charge that is not final (one open period at a time)."""
    return exists().where(Charge.subscription_id == Subscription.id,
                          Charge.status.in_([v.value for v in OPEN]))
