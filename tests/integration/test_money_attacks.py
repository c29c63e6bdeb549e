"""Money attacks: interleavings of the billing run, the charge task, webhooks, the recovery page, staff
actions and the reconciler, and crashes between their phases, each written down as a test.

Every test asserts the *safe* outcome, what SPEC "What must always hold" promises:

- each period charged at most once; one open period per subscription at a time;
- every due period eventually paid or in the retry queue, and every sweep goes on past a bad row;
- every failure notified exactly once, nobody emailed about a settled charge;
- the subscription's status is what its charges imply (re-deriving it changes nothing);
- nothing back-billed beyond the catch-up policy, and nothing stuck in a non-final state.

An attack the product withstands is a passing guard; one that gets through fails until it is fixed.

Against the real PostgreSQL; the hand-written fake gateway (tests/fakes.py) where Stripe's answer is
scripted and the interleaving must be exact, the sandbox where Stripe's own answers are the point, a
real SMTP server for what customers receive, and a real ``billing worker`` killed with SIGKILL where a
crash between phases is the attack.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from billing import charging, customer_pages, enrolment, finance, notifications, reconciler, recovery, state, webhooks
from billing.db import unit_of_work
from billing.models import (
    Attempt,
    AttemptPhase,
    Charge,
    ChargeStatus,
    Notification,
    Subscription,
    WebhookEvent,
)
from billing.outcomes import OutcomeKind, PaymentIntentView, PaymentOutcome, TemporaryStripeError
from tests import factories
from tests.conftest import environ_applied
from tests.fakes import FakeGateway, auth_required, declined
from tests.finance import support
from tests.integration.billing_helpers import enqueue, enrol
from tests.integration.conftest import wait_until
from tests.stripe_events import event, payment_intent

pytestmark = pytest.mark.usefixtures("clean_db")

REASON = "customer called; agreed on the phone"
NOOP: Callable[[int], None] = lambda _id: None  # noqa: E731 - an enqueue that drops the work


# --- helpers -------------------------------------------------------------------------------------------

def subscription(session_factory, *, anchor: datetime, interval: str = "month", amount: int = 1999,
                 currency: str = "eur") -> int:
    """A customer with a saved card and a subscription whose first period starts at ``anchor``."""
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, amount=amount, currency=currency, interval=interval,
                                          anchor_at=anchor, next_charge_at=anchor)
        s.commit()
        return sub.id


def charge_of(charge_id: int) -> Charge:
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        uow.session.expunge(charge)
        return charge


def sub_of(sub_id: int) -> Subscription:
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, sub_id)
        uow.session.expunge(sub)
        return sub


def outbox(charge_id: int) -> list[tuple[str, str]]:
    with unit_of_work() as uow:
        return [tuple(r) for r in uow.session.execute(
            select(Notification.kind, Notification.status).where(Notification.charge_id == charge_id)
            .order_by(Notification.id))]


def open_charges(sub_id: int) -> list[Charge]:
    with unit_of_work() as uow:
        rows = list(uow.session.scalars(select(Charge).where(
            Charge.subscription_id == sub_id, Charge.status.in_([s.value for s in state.OPEN]))))
        uow.session.expunge_all()
    return rows


def rederived(sub_id: int, now: datetime) -> str:
    """What the state machine says the subscription's status is from its charges as they are now (in a
    transaction rolled back): on a consistent book it is the stored status."""
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, sub_id, with_for_update=True)
        wanted = state.refresh_subscription(uow.session, sub, now=now).value
        uow.session.rollback()
    return wanted


def deliver(pi: dict, type_: str, gateway) -> str:
    """Stripe's event about ``pi``: stored as the endpoint stores it, then processed once."""
    accepted = webhooks.accept(event(type_, pi), enqueue=NOOP)
    return webhooks.process(accepted.event_row_id, gateway=gateway)


def pi_payload(charge: Charge, status: str, **kw) -> dict:
    return payment_intent(charge.payment_intent_id, status, charge_id=charge.id, amount=charge.amount, **kw)


@dataclasses.dataclass
class Scripted(FakeGateway):
    """The fake gateway answering each call with the next scripted outcome, with two of Stripe's habits
    the plain fake lacks: a refused request creates no PaymentIntent, and a 500 saved under the key is
    replayed to every resend (https://docs.stripe.com/api/idempotent_requests). ``during_call`` runs
    while the request is at Stripe (the charge's in-flight lock held, the claim committed)."""

    answers: list[PaymentOutcome | str] = dataclasses.field(default_factory=list)
    during_call: Callable[[], None] | None = None
    # The next confirm is processed at Stripe (its answer saved under the key), and the worker dies
    # before reading it: as a SIGKILL between "Stripe called" and "apply committed".
    lose_next_answer: bool = False

    def __post_init__(self):
        self._current: PaymentOutcome | None = None
        self.script = lambda pm: self._current

    def _next(self) -> PaymentOutcome | None:
        if self.during_call is not None:
            hook, self.during_call = self.during_call, None
            hook()
        answer = self.answers.pop(0) if self.answers else None
        if answer == "saved_500":
            raise TemporaryStripeError("500 api_error, replayed for this key", replayed=True)
        self._current = answer
        return answer

    def charge_off_session(self, **kw):
        answer = self._next()
        if answer is not None and answer.kind is OutcomeKind.refused:
            self.calls.append(("create", {"key": kw["idempotency_key"], "refused": answer.error_code}))
            return answer
        return super().charge_off_session(**kw)

    def confirm_off_session(self, **kw):
        self._next()
        outcome = super().confirm_off_session(**kw)
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise TemporaryStripeError("connection reset after Stripe processed the request")
        return outcome

    def payment_intent_for_customer(self, payment_intent_id: str) -> PaymentIntentView:
        """What the recovery page reads: the PaymentIntent as Stripe holds it now."""
        outcome = self.intents[payment_intent_id]["outcome"]
        status = {OutcomeKind.succeeded: "succeeded", OutcomeKind.processing: "processing",
                  OutcomeKind.authentication_required: "requires_action",
                  OutcomeKind.canceled: "canceled"}.get(outcome.kind, "requires_payment_method")
        return PaymentIntentView(outcome=outcome, status=status, client_secret=f"{payment_intent_id}_secret_x",
                                 amount=outcome.amount or 0, currency=outcome.currency or "",
                                 customer_id=outcome.customer_id, setup_future_usage=None)


def refused(code: str) -> PaymentOutcome:
    return PaymentOutcome(OutcomeKind.refused, error_code=code)


class Jobs:
    """A staff action's follow-up: a "retry now" runs at once in this process, as the Celery task runs it."""

    def __init__(self, gateway=None):
        self.gateway = gateway
        self.results: list[str] = []

    def retry_charge(self, charge_id: int) -> None:
        self.results.append(charging.process_charge(charge_id, gateway=self.gateway, manual=True))

    def relay_outbox(self) -> None:
        pass


def staff(action: str, charge_id: int, *, gateway=None, now: datetime | None = None) -> str:
    return finance.perform(action, charge_id, actor=support.OPERATOR, reason=REASON, jobs=Jobs(gateway), now=now)


def first_period(session_factory, sub_id: int, gw, now: datetime) -> int:
    """The billing run opens the subscription's due period and the charge task runs it once."""
    [charge_id] = charging.run_due(now=now, enqueue=NOOP).created
    charging.process_charge(charge_id, gateway=gw, now=now)
    return charge_id


def to_needs_review_by_timeout(session_factory, gw: Scripted, t0: datetime) -> int:
    """A first attempt whose PaymentIntent stays ``processing`` at Stripe past the limit: held for staff."""
    sub_id = subscription(session_factory, anchor=t0)
    gw.answers.append(PaymentOutcome(OutcomeKind.processing))
    charge_id = first_period(session_factory, sub_id, gw, t0)
    assert charge_of(charge_id).status == ChargeStatus.processing
    later = t0 + reconciler.PROCESSING_LIMIT + timedelta(hours=1)
    assert reconciler.settle_processing(now=later, gateway=gw) == [charge_id]
    charge = charge_of(charge_id)
    assert (charge.status, charge.first_failed_at, charge.failures) == ("needs_review", None, 0)
    return charge_id


# =====================================================================================================
# Attacks that get through today (each fails until fixed)
# =====================================================================================================

def behind_daily_subscriptions(session_factory, count: int, now: datetime) -> None:
    """``count`` daily subscriptions whose scheduler was down: five periods behind."""
    anchor = now - timedelta(days=5, minutes=1)
    with session_factory() as s:
        for _ in range(count):
            customer = factories.make_customer(s)
            factories.make_payment_method(s, customer)
            factories.make_subscription(s, customer, interval="day", anchor_at=anchor, next_charge_at=anchor)
        s.commit()


def concurrent_runs(now: datetime, *, runs: int, each: int, batch_size: int) -> list[BaseException]:
    """``runs`` billing runs started together, each run ``each`` times in a row (beats a minute apart
    whose runs overlap); the exceptions they raised."""
    barrier = threading.Barrier(runs)
    errors: list[BaseException] = []

    def billing_run() -> None:
        barrier.wait()
        try:
            for _ in range(each):
                charging.run_due(now=now, enqueue=NOOP, batch_size=batch_size)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=billing_run) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_billing_runs_open_one_period_at_a_time_for_subscriptions_that_are_behind(session_factory):
    """Beat was down for five days; then billing runs overlap (two beats, or a manual ``billing run-due``
    beside the scheduled one, which the README says split the work) over daily subscriptions five
    periods behind.

    Each run selects ``active`` subscriptions with no open charge ``FOR UPDATE SKIP LOCKED``. When one run
    commits a batch while another's statement is still walking the rows, PostgreSQL re-checks the newly
    committed version of a row it then locks (``next_charge_at`` is still in the past, so it qualifies)
    but evaluates the ``NOT EXISTS`` open-charge subquery with the statement's older snapshot: the second
    run opens the next period over the first one's still-pending charge. Two open periods, charged in
    parallel, the second billed whatever the first one's outcome (a hold would have skipped it)."""
    now = datetime.now(UTC)
    for _round in range(3):  # the overlap is a race: three rounds make it show every time
        behind_daily_subscriptions(session_factory, 200, now)
        assert concurrent_runs(now, runs=6, each=2, batch_size=10) == []
        with session_factory() as s:
            per_sub = dict(s.execute(select(Charge.subscription_id, func.count())
                                     .group_by(Charge.subscription_id)).all())
            periods = set(s.scalars(select(Charge.period_index)))
        assert len(per_sub) == 200 * (_round + 1)  # every due subscription was billed by one of the runs
        doubly_open = {sub_id: n for sub_id, n in per_sub.items() if n > 1}
        assert doubly_open == {}, f"{len(doubly_open)} subscriptions got two open periods at once"
        assert periods == {0}  # one period at a time, each after the previous one is decided (README)


def test_one_payment_intent_stripe_does_not_know_does_not_stop_the_reconciler(app_env, sandbox, session_factory,
                                                                              monkeypatch):
    """A charge left ``processing`` on a PaymentIntent Stripe answers 404 ``resource_missing`` for (the
    database restored onto another Stripe account, an API key switched to another account, a row from a
    Stripe-compatible server), and one waiting past its give-up time on such a PaymentIntent.

    ``retrieve_payment_intent`` lets ``stripe.InvalidRequestError`` out of ``settle_processing`` and
    ``give_up_overdue``: the sweep stops at that row, every sweep, forever — the rows after it (ordered
    by the oldest first, so the bad row is always first) are never settled or given up, and the
    reconcile task dies before it requeues stored webhook events."""
    from workers import tasks

    now = datetime.now(UTC)
    old = now - timedelta(days=20)
    with session_factory() as s:
        def failing_sub():
            customer = factories.make_customer(s)
            factories.make_payment_method(s, customer)
            return factories.make_subscription(s, customer, anchor_at=old, status="past_due")

        stuck = factories.make_charge(s, factories.make_subscription(
            s, factories.make_customer(s), anchor_at=old), status="processing", attempts=1,
            payment_intent_id="pi_unknown_to_this_account", updated_at=old)
        s.add(Attempt(charge_id=stuck.id, number=1, idempotency_key="attempt-900001-aa", phase="finished",
                      outcome="processing", started_at=old, finished_at=old))
        waiting = dict(status="authentication_required", attempts=1, first_failed_at=old, updated_at=old)
        unknown = factories.make_charge(s, failing_sub(), payment_intent_id="pi_also_unknown",
                                        give_up_at=old + timedelta(days=14), **waiting)
        overdue = factories.make_charge(s, failing_sub(), give_up_at=old + timedelta(days=14, hours=1), **waiting)
        s.add(WebhookEvent(stripe_event_id="evt_lost_task", type="payment_intent.succeeded", object_id="pi_x",
                           event_created=int(old.timestamp()), payload={}, received_at=now - timedelta(hours=1)))
        s.commit()
        stuck_id, unknown_id, overdue_id = stuck.id, unknown.id, overdue.id
    requeued_events: list[int] = []
    monkeypatch.setattr(tasks, "enqueue_charge", NOOP)
    monkeypatch.setattr(tasks, "enqueue_webhook_event", requeued_events.append)

    tasks.reconcile()  # beat's reconcile task, as it runs every few minutes

    assert charge_of(overdue_id).status == ChargeStatus.uncollectible  # given up, with its final notice
    assert len(requeued_events) == 1  # the stored event whose task was lost is processed again
    assert charge_of(stuck_id).status != ChargeStatus.paid and charge_of(unknown_id).status != ChargeStatus.paid


def test_a_decline_whose_email_a_refusal_held_back_is_still_notified(session_factory, smtp_server):
    """The card is declined (soft): the "payment failed" email is written, but the mail server is down.
    Minutes later staff press "retry now" and Stripe refuses the request (the card was detached at Stripe):
    ``needs_review``. The mail server is back: the failure email is dropped at send time ("no longer
    true": the charge is held for staff). Staff fix it and retry; the card is declined again — not the
    first failure, so ``decide`` writes no email. The customer is never told the payment failed, never
    gets a recovery link, and their first email would be the final notice two weeks later."""
    t0 = datetime.now(UTC) - timedelta(hours=2)
    sub_id = subscription(session_factory, anchor=t0)
    gw = Scripted(answers=[declined("insufficient_funds"), refused("payment_method_unexpected_state"),
                           declined("insufficient_funds")])
    charge_id = first_period(session_factory, sub_id, gw, t0)
    assert outbox(charge_id) == [("payment_failed", "pending")]

    staff("retry_now", charge_id, gateway=gw, now=t0 + timedelta(minutes=10))
    assert charge_of(charge_id).status == ChargeStatus.needs_review
    notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
    staff("retry_now", charge_id, gateway=gw, now=t0 + timedelta(minutes=40))
    assert charge_of(charge_id).status == ChargeStatus.requires_payment_method  # waits on the customer again
    notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)

    failure_emails = [m for m in smtp_server.messages if "failed" in m["Subject"]]
    assert len(failure_emails) == 1, outbox(charge_id)
    assert "http://billing.test/recover/" in failure_emails[0].get_body(preferencelist=("plain",)).get_content()


def test_a_payment_that_went_processing_minutes_ago_is_not_declared_stuck(session_factory):
    """Authentication required; on day 14 the customer authenticates on the recovery page and Stripe
    holds the payment ``processing``. The give-up sweep sees it and moves the charge to ``processing``.
    Ten minutes later the next sweep measures "processing since" from the charge's *first attempt*, two
    weeks old, and holds it as ``needs_review`` ("still processing at Stripe after 3 days"): staff are
    asked to act on a payment minutes old, and if it then fails the webhook cannot move it back to the
    customer (``needs_review`` → ``requires_payment_method`` is refused), so nobody asks them to pay."""
    now = datetime.now(UTC)
    t0 = now - timedelta(days=14, minutes=5)
    sub_id = subscription(session_factory, anchor=t0)
    gw = Scripted(answers=[auth_required()])
    charge_id = first_period(session_factory, sub_id, gw, t0)
    pi_id = charge_of(charge_id).payment_intent_id
    # The customer authenticated on the page; Stripe has the payment in processing.
    gw.intents[pi_id]["outcome"] = dataclasses.replace(gw.intents[pi_id]["outcome"], kind=OutcomeKind.processing,
                                                       error_code=None)
    assert reconciler.give_up_overdue(now=now, gateway=gw) == []
    assert charge_of(charge_id).status == ChargeStatus.processing

    report = reconciler.sweep(now=now + timedelta(minutes=10), enqueue=NOOP, gateway=gw)
    assert report.settled == []
    assert charge_of(charge_id).status == ChargeStatus.processing  # waits for Stripe, as any payment minutes old


def test_an_abandoned_staff_retry_of_a_refused_charge_leaves_it_held_for_staff(session_factory):
    """Stripe refused the first request (``resource_missing``): ``needs_review`` with no
    ``first_failed_at`` (the customer's dunning clock has not started), subscription ``past_due``.

    Staff press "retry now". While that attempt is at Stripe, the state machine's own rule already
    disagrees with the stored status (a ``processing`` charge without ``first_failed_at`` is "no
    failure", so re-deriving gives ``active``). Stripe answers a saved 500: the attempt is abandoned and
    the charge goes back "to where it was claimable" — ``pending``, as if it had never been attempted,
    no longer held for staff; the subscription stays ``past_due`` while its charges imply ``active``."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    sub_id = subscription(session_factory, anchor=t0)
    gw = Scripted(answers=[refused("resource_missing"), "saved_500"])
    charge_id = first_period(session_factory, sub_id, gw, t0)
    assert (charge_of(charge_id).status, sub_of(sub_id).status) == ("needs_review", "past_due")

    during: list[tuple[str, str]] = []
    gw.during_call = lambda: during.append((sub_of(sub_id).status, rederived(sub_id, t0)))
    staff("retry_now", charge_id, gateway=gw, now=t0 + timedelta(minutes=5))

    assert during == [("past_due", "past_due")]  # a retry of a failed charge in flight is still past_due
    charge = charge_of(charge_id)
    assert charge.status == ChargeStatus.needs_review  # still held for staff, the reason shown
    assert sub_of(sub_id).status == rederived(sub_id, t0) == "past_due"


def test_a_decline_the_state_machine_refuses_does_not_use_up_the_retry_schedule(session_factory):
    """A charge held for staff (its PaymentIntent processing past the limit) whose PaymentIntent then
    fails at Stripe: the ``payment_failed`` webhook is refused by the state machine (``needs_review`` →
    ``requires_payment_method`` is not in the table) and recorded as ignored — but ``apply_outcome``
    counted the decline (``charges.failures += 1``) before asking, and the webhook's transaction commits
    it. Each such event moves the customer's retry schedule on without a retry."""
    t0 = datetime.now(UTC) - timedelta(days=4)
    gw = Scripted()
    charge_id = to_needs_review_by_timeout(session_factory, gw, t0)
    charge = charge_of(charge_id)
    failed = pi_payload(charge, "requires_payment_method", error={
        "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"})
    gw.intents[charge.payment_intent_id]["outcome"] = PaymentOutcome(
        OutcomeKind.declined, payment_intent_id=charge.payment_intent_id, error_code="card_declined",
        decline_code="insufficient_funds")

    assert deliver(failed, "payment_intent.payment_failed", gw) == "ignored"
    after = charge_of(charge_id)
    assert after.status == ChargeStatus.needs_review
    assert after.failures == 0  # nothing was applied, so nothing was counted


# =====================================================================================================
# Attacks the product withstands (guards against regressions)
# =====================================================================================================

def test_concurrent_billing_runs_over_due_subscriptions_charge_each_period_once(session_factory):
    """Six overlapping runs over subscriptions due now (not behind): the SKIP LOCKED batches split
    them, and each subscription gets its one period."""
    now = datetime.now(UTC)
    with session_factory() as s:
        for _ in range(200):
            customer = factories.make_customer(s)
            factories.make_payment_method(s, customer)
            factories.make_subscription(s, customer, anchor_at=now - timedelta(minutes=1),
                                        next_charge_at=now - timedelta(minutes=1))
        s.commit()
    assert concurrent_runs(now, runs=6, each=2, batch_size=10) == []
    with session_factory() as s:
        per_sub = s.execute(select(Charge.subscription_id, func.count()).group_by(Charge.subscription_id)).all()
    assert {n for _sub, n in per_sub} == {1} and len(per_sub) == 200


def test_a_subscription_locked_by_a_staff_action_is_billed_by_the_next_run_and_the_others_now(session_factory):
    """The keyset run skips a subscription another transaction holds (a staff action on one of its old
    charges) and goes on; the next run, a minute later, bills it."""
    now = datetime.now(UTC)
    subs = [subscription(session_factory, anchor=now - timedelta(minutes=1)) for _ in range(3)]
    with unit_of_work() as holder:
        holder.session.get(Subscription, subs[1], with_for_update=True)
        created = charging.run_due(now=now, enqueue=NOOP, batch_size=1).created
        holder.session.rollback()
    assert sorted(charge_of(c).subscription_id for c in created) == [subs[0], subs[2]]
    [later] = charging.run_due(now=now + timedelta(minutes=1), enqueue=NOOP).created
    assert charge_of(later).subscription_id == subs[1]


def test_void_during_an_attempt_is_refused_and_cancel_stops_the_retries_after_it(session_factory):
    """While the charge's request is at Stripe, staff try to void it (refused: the payment may be
    collected this very moment) and the merchant cancels the subscription through the API (allowed).
    The card is declined: the charge stays owed, but the canceled subscription is never charged again
    automatically, and its status is what its charges imply (canceled)."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    sub_id = subscription(session_factory, anchor=t0)
    refusals: list[str] = []

    def staff_and_merchant_act() -> None:
        [cid] = [c.id for c in open_charges(sub_id)]
        try:
            staff("void", cid)
        except finance.ActionRefused as exc:
            refusals.append(str(exc))
        enrolment.cancel_subscription(sub_id)

    gw = Scripted(answers=[declined("insufficient_funds")], during_call=staff_and_merchant_act)
    charge_id = first_period(session_factory, sub_id, gw, t0)
    assert len(refusals) == 1 and "running" in refusals[0]
    charge = charge_of(charge_id)
    assert charge.status == ChargeStatus.requires_payment_method and charge.next_retry_at is not None

    for day in range(1, 16):  # the retry schedule's days come and go, and the give-up horizon
        at = t0 + timedelta(days=day)
        for cid in charging.retry_due(now=at, enqueue=NOOP):
            assert charging.process_charge(cid, gateway=gw, now=at).startswith("skipped:canceled")
        reconciler.give_up_overdue(now=at, gateway=gw)
        assert sub_of(sub_id).status == rederived(sub_id, at) == "canceled"
    assert [name for name, _ in gw.calls if name in ("create", "confirm")] == ["create"]
    assert gw.created() == 1
    assert charging.run_due(now=t0 + timedelta(days=400), enqueue=NOOP).created == []


def test_final_status_canceled_then_a_late_payment_is_recorded_and_nothing_more_is_billed(session_factory,
                                                                                          smtp_server):
    """``BILLING_FINAL_SUBSCRIPTION_STATUS=canceled``: the give-up cancels the subscription. The customer
    then pays on the page opened earlier: the money is recorded (``paid``), the final notice written at
    give-up is dropped at send time, the subscription stays canceled (final) and no period opens again."""
    with environ_applied({"BILLING_FINAL_SUBSCRIPTION_STATUS": "canceled"}):
        t0 = datetime.now(UTC) - timedelta(days=15)
        sub_id = subscription(session_factory, anchor=t0)
        gw = Scripted(answers=[auth_required()])
        charge_id = first_period(session_factory, sub_id, gw, t0)
        notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
        sent_before = len(smtp_server.messages)  # "authenticate your payment", and the reminders since
        assert sent_before >= 1

        now = datetime.now(UTC)
        assert reconciler.give_up_overdue(now=now, gateway=gw) == [charge_id]
        sub = sub_of(sub_id)
        assert (charge_of(charge_id).status, sub.status) == ("uncollectible", "canceled") and sub.canceled_at

        charge = charge_of(charge_id)
        assert deliver(pi_payload(charge, "succeeded"), "payment_intent.succeeded", gw) == "applied"
        assert charge_of(charge_id).status == ChargeStatus.paid
        assert sub_of(sub_id).status == rederived(sub_id, now) == "canceled"
        notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
        assert len(smtp_server.messages) == sent_before  # no final notice to a customer who has paid
        assert dict(outbox(charge_id))["final_notice"] == "dropped"
        assert charging.run_due(now=now + timedelta(days=90), enqueue=NOOP).created == []


@pytest.mark.parametrize("payment_lands", ["after_give_up", "between_read_and_lock"])
def test_give_up_racing_a_recovery_page_payment_records_the_money_once_and_mails_no_final_notice(
        session_factory, smtp_server, payment_lands):
    """On the horizon the give-up sweep asks Stripe how the PaymentIntent stands ("requires action"), and
    the customer pays on the page in that same moment: just after the sweep committed the give-up, or
    after its read but before it locked the charge. The period is paid once, no final notice reaches
    the customer, the subscription is active again and billing resumes with the current period only."""
    now = datetime.now(UTC)
    t0 = now - timedelta(days=40)  # monthly: the next period also ended during the hold
    sub_id = subscription(session_factory, anchor=t0)
    gw = Scripted(answers=[auth_required()])
    charge_id = first_period(session_factory, sub_id, gw, t0)
    notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
    sent_before = len(smtp_server.messages)  # "authenticate your payment", and the reminders since
    charge = charge_of(charge_id)
    stale = gw.intents[charge.payment_intent_id]["outcome"]
    paid: list[str] = []

    def customer_pays() -> None:
        gw.intents[charge.payment_intent_id]["outcome"] = dataclasses.replace(stale, kind=OutcomeKind.succeeded,
                                                                             error_code=None)
        paid.append(deliver(pi_payload(charge, "succeeded"), "payment_intent.succeeded", gw))

    class Racing(Scripted):
        def retrieve_payment_intent(self, payment_intent_id):
            if payment_lands == "between_read_and_lock":
                customer_pays()
            return stale  # what Stripe said just before the payment landed

    given_up = reconciler.give_up_overdue(now=now, gateway=Racing(intents=gw.intents))
    if payment_lands == "after_give_up":
        assert given_up == [charge_id]
        customer_pays()
    else:
        assert given_up == []
    assert paid == ["applied"]

    assert charge_of(charge_id).status == ChargeStatus.paid
    assert sub_of(sub_id).status == rederived(sub_id, now) == "active"
    notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
    assert [m["Subject"] for m in smtp_server.messages if "Final notice" in m["Subject"]] == []
    assert len(smtp_server.messages) == sent_before  # nothing new: the charge is settled
    [resumed] = charging.run_due(now=now, enqueue=NOOP).created
    assert charge_of(resumed).period_start <= now < charge_of(resumed).period_end  # not the skipped period
    assert charging.run_due(now=now + timedelta(minutes=1), enqueue=NOOP).created == []


def test_staff_retry_of_a_held_charge_with_its_webhook_arriving_mid_attempt_pays_once(session_factory):
    """A charge held for staff (its PaymentIntent processing past the limit). Staff retry it; while the
    retry's confirm is at Stripe, the ``payment_intent.succeeded`` webhook of that same PaymentIntent
    arrives (deferred: an attempt is in flight) and is delivered again after: one PaymentIntent, paid
    once, the subscription active, and no email to a customer who was never asked to act."""
    t0 = datetime.now(UTC) - timedelta(days=4)
    gw = Scripted()
    charge_id = to_needs_review_by_timeout(session_factory, gw, t0)
    charge = charge_of(charge_id)
    webhook_results: list[str] = []
    accepted = webhooks.accept(event("payment_intent.succeeded", pi_payload(charge, "succeeded")), enqueue=NOOP)

    def webhook_now() -> None:
        try:
            webhook_results.append(webhooks.process(accepted.event_row_id, gateway=gw))
        except webhooks.EventDeferred:
            webhook_results.append("deferred")

    gw.answers.append(PaymentOutcome(OutcomeKind.succeeded))
    gw.during_call = webhook_now
    staff("retry_now", charge_id, gateway=gw)
    webhook_now()  # the task retries the deferred event
    assert webhook_results[0] == "deferred" and webhook_results[1] in ("unchanged", "ignored")
    after = charge_of(charge_id)
    assert (after.status, after.payment_intent_id) == ("paid", charge.payment_intent_id)
    assert gw.created() == 1
    sub_id = after.subscription_id
    assert sub_of(sub_id).status == rederived(sub_id, datetime.now(UTC)) == "active"
    assert outbox(charge_id) == []


def test_a_webhook_the_state_machine_refuses_is_recorded_once_not_retried_forever(session_factory):
    """A late ``payment_intent.payment_failed`` for a charge already paid, and a ``processing`` one for a
    charge already given up: each is recorded (``ignored``) and processed; a redelivery is a no-op."""
    t0 = datetime.now(UTC) - timedelta(days=16)
    paid_sub = subscription(session_factory, anchor=t0)
    gw = Scripted()
    paid_id = first_period(session_factory, paid_sub, gw, t0)
    gone_sub = subscription(session_factory, anchor=t0)
    gw.answers.append(auth_required())
    gone_id = first_period(session_factory, gone_sub, gw, t0)
    assert reconciler.give_up_overdue(now=datetime.now(UTC), gateway=gw) == [gone_id]

    paid, gone = charge_of(paid_id), charge_of(gone_id)
    late_failure = event("payment_intent.payment_failed", pi_payload(paid, "requires_payment_method"))
    late_processing = event("payment_intent.processing", pi_payload(gone, "processing"))
    for evt in (late_failure, late_processing):
        row_id = webhooks.accept(evt, enqueue=NOOP).event_row_id
        assert webhooks.process(row_id, gateway=gw) == "ignored"
        assert webhooks.process(row_id, gateway=gw) == "already_processed"
    assert (charge_of(paid_id).status, charge_of(gone_id).status) == ("paid", "uncollectible")
    assert webhooks.requeue_unprocessed(enqueue=NOOP, older_than=timedelta(0)) == []


def test_a_charge_locked_during_the_give_up_sweep_does_not_stop_the_others(session_factory):
    """The give-up sweep meets a charge whose row a webhook holds this instant: it is left for the next
    sweep, and the charges after it are given up now."""
    t0 = datetime.now(UTC) - timedelta(days=16)
    gw = Scripted(answers=[auth_required(), auth_required(), auth_required()])
    ids = [first_period(session_factory, subscription(session_factory, anchor=t0 + timedelta(minutes=i)), gw,
                        t0 + timedelta(minutes=i)) for i in range(3)]
    now = datetime.now(UTC)
    with unit_of_work() as holder:
        holder.session.execute(select(Charge).where(Charge.id == ids[0]).with_for_update())
        assert reconciler.give_up_overdue(now=now, gateway=gw) == ids[1:]
        holder.session.rollback()
    assert reconciler.give_up_overdue(now=now, gateway=gw) == ids[:1]


def test_worker_dying_after_a_declined_retry_while_the_customer_pays_on_the_page_pays_once(session_factory):
    """The scheduled retry re-confirms the period's PaymentIntent; Stripe declines it and saves the answer
    under the attempt's key, and the worker dies before applying it (the attempt stays ``started``).
    Meanwhile the customer, on the recovery page opened after the first email, pays that same
    PaymentIntent with another card; the page's return applies the payment (no worker holds the charge).
    Then the task is delivered again and resumes the attempt: Stripe replays the saved decline. The
    period is paid once, on one PaymentIntent, and nobody is told the payment failed a second time."""
    t0 = datetime.now(UTC) - timedelta(days=2)
    sub_id = subscription(session_factory, anchor=t0)
    gw = Scripted(answers=[declined("insufficient_funds"), declined("insufficient_funds")])
    charge_id = first_period(session_factory, sub_id, gw, t0)
    with unit_of_work() as uow:
        token = recovery.issue_token(uow.session, customer_id=sub_of(sub_id).customer_id, purpose="recover",
                                     charge_id=charge_id)
        uow.commit()
    retry_at = charge_of(charge_id).next_retry_at
    gw.lose_next_answer = True
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=retry_at)
    assert charge_of(charge_id).status == ChargeStatus.processing

    pi_id = charge_of(charge_id).payment_intent_id
    gw.intents[pi_id]["outcome"] = dataclasses.replace(gw.intents[pi_id]["outcome"], kind=OutcomeKind.succeeded,
                                                       error_code=None, decline_code=None)
    done = customer_pages.complete_recovery(token, gateway=gw)
    assert (done.paid, done.charge_status) == (True, "paid")

    assert charging.process_charge(charge_id, gateway=gw, now=retry_at + timedelta(seconds=30)) == "ignored:paid"
    charge = charge_of(charge_id)
    assert (charge.status, charge.payment_intent_id) == ("paid", pi_id)
    assert gw.created() == 1
    assert [k for k, _status in outbox(charge_id)] == ["payment_failed"]  # the first decline's, only
    with unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(Attempt).where(
            Attempt.charge_id == charge_id, Attempt.phase == AttemptPhase.started)) == 0
    assert sub_of(sub_id).status == rederived(sub_id, datetime.now(UTC)) == "active"


# --- a real worker killed between phases --------------------------------------------------------------

def test_worker_killed_after_stripe_charged_then_subscription_canceled_records_the_money(
        app_env, sandbox, worker_factory, session_factory):
    """The first attempt's request reaches Stripe and is charged, and the worker is SIGKILLed before its
    answer is applied. Before any worker resumes it, the merchant cancels the subscription. The resumed
    attempt must record the money Stripe took (``paid``), not void the period as "never attempted after
    a cancel", and never send a second PaymentIntent."""
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", email="killed-then-canceled@example.com")
    sandbox.control.add_fault("slow", method="POST", path="/v1/payment_intents", count=1, delay_ms=4000)
    worker = worker_factory(concurrency=1)
    [charge_id] = charging.run_due(enqueue=enqueue).created
    wait_until(lambda: sandbox.control.requests()["by_endpoint"].get("POST /v1/payment_intents"), timeout=30,
               message="the charge's request to reach Stripe")
    worker.kill()
    assert charge_of(charge_id).status == ChargeStatus.processing
    enrolment.cancel_subscription(sub_id)

    worker.start()
    for k in range(1, 20):  # beat's reconcile task, every few minutes (the clock moved on each time)
        reconciler.sweep(now=datetime.now(UTC) + timedelta(minutes=10 * k), enqueue=enqueue)
        deadline = time.monotonic() + 4
        while charge_of(charge_id).status in state.IN_FLIGHT and time.monotonic() < deadline:
            time.sleep(0.2)
        if charge_of(charge_id).status not in state.IN_FLIGHT:
            break
    assert charge_of(charge_id).status == ChargeStatus.paid
    ledger = collections.Counter(e["metadata"].get("charge_id") for e in sandbox.control.ledger())
    assert ledger == {str(charge_id): 1}
    with unit_of_work() as uow:
        phases = uow.session.scalars(select(Attempt.phase).where(Attempt.charge_id == charge_id)).all()
        assert phases == [AttemptPhase.finished]
        assert uow.session.scalar(text("SELECT status FROM subscriptions WHERE id = :i"), {"i": sub_id}) == "canceled"
