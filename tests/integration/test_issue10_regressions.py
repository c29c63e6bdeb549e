"""One named regression test per bug of issue 10 ("One owner for every charge and subscription
transition"), each asserting what a customer, a merchant or finance staff sees now that it is fixed.

Against the real PostgreSQL, with the hand-written fake gateway (tests/fakes.py) where Stripe's answer
is scripted, the in-process sandbox where Stripe's own behaviour (saved 500s, idempotency replays) is
the point, a real SMTP server for emails and the real HTTP app for the console. Times are pinned
(``now=``) where the dunning calendar matters.

Bugs 1, 7 and 9 also have fuller tests (test_ownership.py, test_outbox_failures.py); the tests here
are the issue's own scenarios, under the issue's numbering.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import html
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import stripe
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from billing import charging, customer_pages, enrolment, finance, notifications, reconciler, recovery, webhooks
from billing.db import unit_of_work
from billing.models import (
    Attempt,
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    PaymentMethod,
    RecoveryToken,
    Subscription,
)
from billing.outcomes import OutcomeKind, PaymentOutcome, TemporaryStripeError
from billing.stripe_gateway import outcome_from_payment_intent
from billing.web.webhooks import get_webhook_enqueue, get_webhook_secret
from tests import factories
from tests.conftest import TABLES
from tests.fakes import FakeGateway, auth_required, declined
from tests.finance import support
from tests.finance.support import RecordingJobs
from tests.integration.test_cli import run_billing
from tests.integration.test_webhooks import Gateway, inline_enqueue
from tests.stripe_events import SECRET, event, payment_intent, signed

pytestmark = pytest.mark.usefixtures("clean_db")

REASON = "customer called; agreed on the phone"


# --- helpers -------------------------------------------------------------------------------------------

def subscription(session_factory, *, anchor: datetime, interval: str = "month", amount: int = 1999,
                 currency: str = "eur", with_card: bool = True) -> int:
    """A customer (with a saved card unless ``with_card=False``) and a subscription anchored at ``anchor``."""
    with session_factory() as s:
        customer = factories.make_customer(s)
        if with_card:
            factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, amount=amount, currency=currency, interval=interval,
                                          anchor_at=anchor, next_charge_at=anchor)
        s.commit()
        return sub.id


def row(session_factory, model, row_id: int):
    with session_factory() as s:
        return s.get(model, row_id)


def opened_periods(session_factory, sub_id: int) -> list[str]:
    with session_factory() as s:
        starts = s.scalars(select(Charge.period_start).where(Charge.subscription_id == sub_id)
                           .order_by(Charge.period_index)).all()
    return [d.date().isoformat() for d in starts]


def outbox(session_factory, charge_id: int) -> list[tuple[str, str]]:
    with session_factory() as s:
        return list(s.execute(select(Notification.kind, Notification.status)
                              .where(Notification.charge_id == charge_id).order_by(Notification.id)).all())


def settle_as_stripe_says(gw: FakeGateway, pi_id: str, kind: OutcomeKind) -> None:
    """The PaymentIntent has moved on at Stripe (its amount, currency and customer as they were)."""
    gw.intents[pi_id]["outcome"] = dataclasses.replace(gw.intents[pi_id]["outcome"], kind=kind)


def late_success(charge_id: int, pi_id: str, now: datetime) -> str:
    """Stripe's news that the charge's PaymentIntent succeeded, applied as every path applies it."""
    with unit_of_work() as uow:
        charge = uow.session.scalars(select(Charge).where(Charge.id == charge_id).with_for_update()).one()
        result = charging.apply_outcome(uow.session, charge, PaymentOutcome(
            OutcomeKind.succeeded, payment_intent_id=pi_id), now=now)
        uow.commit()
    return result


class InlineJobs(RecordingJobs):
    """A staff "retry now" run at once in this process, as the Celery task runs it."""

    def __init__(self, gateway=None):
        super().__init__()
        self.gateway = gateway
        self.results: list[str] = []

    def retry_charge(self, charge_id: int) -> None:
        self.results.append(charging.process_charge(charge_id, gateway=self.gateway, manual=True))


class LostJobs(RecordingJobs):
    """The broker is down: handing the retry on raises."""

    def retry_charge(self, charge_id: int) -> None:
        raise ConnectionError("broker unreachable")


# --- bug 1: a webhook can mark the wrong charge paid ---------------------------------------------------

@contextlib.contextmanager
def webhook_endpoint(gateway) -> Iterator:
    """``POST /webhooks/stripe`` of the real app, processed inline; ``deliver(evt)`` returns the outcome."""
    from billing.web.app import create_app

    app = create_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: inline_enqueue(gateway, [])
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with TestClient(app) as client:
        def deliver(evt: dict) -> str | None:
            body, headers = signed(evt)
            assert client.post("/webhooks/stripe", content=body, headers=headers).status_code == 200
            with unit_of_work() as uow:
                return uow.session.scalar(select(webhooks.WebhookEvent.outcome)
                                          .where(webhooks.WebhookEvent.stripe_event_id == evt["id"]))
        yield deliver


def foreign_intent(pi_id: str, status: str, charge_id: int, **kw) -> dict:
    """Another installation's PaymentIntent on the shared Stripe account, naming a charge id it
    happens to share with ours (their charge 1 is not our charge 1)."""
    pi = payment_intent(pi_id, status, charge_id=charge_id, **kw)
    pi["customer"] = "cus_another_installation"
    pi["metadata"].update(installation="inst_staging", attempt_id="1", attempt_key="attempt-1-0123456789ab")
    return pi


def test_bug1_a_foreign_payment_intent_naming_our_charge_neither_pays_it_nor_emails_our_customer(
        session_factory):
    """Full coverage against the sandbox (every mismatch, two installations on one account) is in
    test_ownership.py; this is the issue's scenario: our charge has no PaymentIntent yet, and another
    installation's ``succeeded`` / ``payment_failed`` events name its id in ``metadata.charge_id``."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    failing = subscription(session_factory, anchor=now, with_card=False)
    [failed_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(failed_id, gateway=FakeGateway(), now=now) == "requires_payment_method"
    with unit_of_work() as uow:
        customer_id = uow.session.get(Subscription, failing).customer_id
        recovery.issue_token(uow.session, customer_id=customer_id, purpose="recover", charge_id=failed_id)
        uow.commit()
    pending_sub = subscription(session_factory, anchor=now)
    [pending_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    emails_before = outbox(session_factory, failed_id)

    with webhook_endpoint(Gateway()) as deliver:
        paid = event("payment_intent.succeeded", foreign_intent("pi_foreign_paid", "succeeded", failed_id))
        failed = event("payment_intent.payment_failed", foreign_intent(
            "pi_foreign_failed", "requires_payment_method", pending_id,
            error={"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"}))
        assert (deliver(paid), deliver(failed)) == ("foreign", "foreign")

    charge = row(session_factory, Charge, failed_id)
    assert (charge.status, charge.payment_intent_id, charge.paid_at) == ("requires_payment_method", None, None)
    with session_factory() as s:
        unused = s.scalar(select(func.count()).select_from(RecoveryToken).where(
            RecoveryToken.charge_id == failed_id, RecoveryToken.used_at.is_(None)))
    assert unused == 1  # the customer's link still works: the period is still owed
    assert outbox(session_factory, failed_id) == emails_before
    assert row(session_factory, Charge, pending_id).status == ChargeStatus.pending
    assert outbox(session_factory, pending_id) == []  # nobody emailed about someone else's decline
    assert row(session_factory, Subscription, pending_sub).status == "active"


# --- bug 2: abandoned attempts used up the retry schedule ---------------------------------------------

def abandoned_attempts(session_factory, charge_id: int) -> int:
    with session_factory() as s:
        return s.scalar(select(func.count()).select_from(Attempt).where(
            Attempt.charge_id == charge_id, Attempt.outcome == "abandoned"))


@dataclasses.dataclass
class OutageGateway(FakeGateway):
    """The fake gateway behind a Stripe outage: the next ``outage`` creates answer the 500 Stripe saved
    under their key, replayed (https://docs.stripe.com/api/idempotent_requests), so each key is spent."""

    outage: int = 0

    def charge_off_session(self, **kw):
        if self.outage:
            self.outage -= 1
            self.calls.append(("create", {"key": kw["idempotency_key"]}))
            raise TemporaryStripeError("500 api_error, replayed for this key", replayed=True)
        return super().charge_off_session(**kw)


def test_bug2_abandoned_attempts_and_staff_retries_do_not_use_up_the_retry_schedule(session_factory, smtp_server):
    """The saved-500 path against the sandbox itself is in test_money_invariants.py
    (``test_saved_500_never_charges_twice_and_moves_on_to_a_new_key``)."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    sub_id = subscription(session_factory, anchor=t0)
    gw = OutageGateway(script=lambda pm: declined("insufficient_funds"), outage=11)
    [charge_id] = charging.run_due(now=t0, enqueue=lambda _id: None).created
    # 25 minutes of Stripe 500s: each task retry is a new attempt, abandoned.
    for minute in range(11):
        with pytest.raises(TemporaryStripeError):
            charging.process_charge(charge_id, gateway=gw, now=t0 + timedelta(minutes=2 * minute))
    assert abandoned_attempts(session_factory, charge_id) == 11
    assert row(session_factory, Charge, charge_id).status == ChargeStatus.pending

    # Stripe is back; the card is declined for insufficient funds: the first real failure.
    failed_at = t0 + timedelta(minutes=25)
    assert charging.process_charge(charge_id, gateway=gw, now=failed_at) == "requires_payment_method"
    charge = row(session_factory, Charge, charge_id)
    assert (charge.attempts, charge.failures, charge.first_failed_at) == (12, 1, failed_at)
    assert charge.next_retry_at == failed_at + timedelta(days=3)  # the insufficient_funds schedule's first step
    assert row(session_factory, Subscription, sub_id).status == "past_due"
    assert [k for k, _ in outbox(session_factory, charge_id)] == ["payment_failed"]
    assert notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory).sent == 1
    (email,) = smtp_server.wait_for(1)
    assert "Final notice" not in email["Subject"] and "failed" in email["Subject"]
    assert "http://billing.test/recover/" in email.get_body(preferencelist=("plain",)).get_content()

    # A staff "retry now", declined again, is recorded but does not advance the schedule.
    jobs = InlineJobs(gateway=gw)
    finance.perform("retry_now", charge_id, actor=support.OPERATOR, reason=REASON, jobs=jobs,
                    now=failed_at + timedelta(hours=2))
    assert jobs.results == ["requires_payment_method"]
    after = row(session_factory, Charge, charge_id)
    assert (after.status, after.failures, after.next_retry_at) == ("requires_payment_method", 1, charge.next_retry_at)
    with session_factory() as s:
        assert s.scalars(select(Attempt.manual).where(Attempt.charge_id == charge_id)
                         .order_by(Attempt.number.desc())).first() is True
    assert [k for k, _ in outbox(session_factory, charge_id)] == ["payment_failed"]
    # The schedule goes on from where the customer's declines left it: the second step, +5 days.
    assert charging.process_charge(charge_id, gateway=gw, now=charge.next_retry_at) == "requires_payment_method"
    assert row(session_factory, Charge, charge_id).next_retry_at == failed_at + timedelta(days=5)


# --- bug 3: void left the subscription past_due forever -------------------------------------------------

def test_bug3_voiding_a_failing_charge_resumes_billing_with_the_next_period(session_factory):
    anchor = datetime(2026, 3, 1, tzinfo=UTC)
    now = anchor + timedelta(hours=9)
    sub_id = subscription(session_factory, anchor=anchor)
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds"))
    [march] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(march, gateway=gw, now=now) == "requires_payment_method"
    assert row(session_factory, Subscription, sub_id).status == "past_due"

    finance.perform("void", march, actor=support.OPERATOR, reason="written off", jobs=RecordingJobs(),
                    now=now + timedelta(days=1))
    assert row(session_factory, Charge, march).status == ChargeStatus.void
    assert row(session_factory, Subscription, sub_id).status == "active"

    assert charging.run_due(now=now + timedelta(days=2), enqueue=lambda _id: None).created == []  # April not due
    april_starts = datetime(2026, 4, 1, tzinfo=UTC)
    [april] = charging.run_due(now=april_starts, enqueue=lambda _id: None).created
    gw.script = lambda pm: None
    assert charging.process_charge(april, gateway=gw, now=april_starts) == "paid"
    assert opened_periods(session_factory, sub_id) == ["2026-03-01", "2026-04-01"]
    assert row(session_factory, Subscription, sub_id).status == "active"


# --- bug 4: a late success back-billed the whole gap ----------------------------------------------------

def test_bug4_january_paid_in_may_bills_may_next_not_february_to_may(session_factory):
    anchor = datetime(2026, 1, 1, tzinfo=UTC)
    sub_id = subscription(session_factory, anchor=anchor)
    gw = FakeGateway(script=lambda pm: auth_required())
    [january] = charging.run_due(now=anchor + timedelta(hours=9), enqueue=lambda _id: None).created
    assert charging.process_charge(january, gateway=gw, now=anchor + timedelta(hours=9)) == "authentication_required"
    assert reconciler.give_up_overdue(now=anchor + timedelta(days=16), gateway=gw) == [january]
    assert row(session_factory, Charge, january).status == ChargeStatus.uncollectible
    assert row(session_factory, Subscription, sub_id).status == "unpaid"
    for month in (2, 3, 4):  # held: nothing is billed while unpaid
        assert charging.run_due(now=datetime(2026, month, 1, 9, tzinfo=UTC), enqueue=lambda _id: None).created == []

    # In May the customer pays January on the recovery page they had opened back then.
    may = datetime(2026, 5, 10, 9, 0, tzinfo=UTC)
    assert late_success(january, row(session_factory, Charge, january).payment_intent_id, may) == "paid"
    assert row(session_factory, Subscription, sub_id).status == "active"

    gw.script = lambda pm: None
    opened: list[int] = []
    for minute in range(5):  # beat's runs, a minute apart; each period opened is charged at once
        at = may + timedelta(minutes=minute)
        for charge_id in charging.run_due(now=at, enqueue=lambda _id: None).created:
            opened.append(charge_id)
            assert charging.process_charge(charge_id, gateway=gw, now=at) == "paid"
    assert len(opened) == 1
    assert opened_periods(session_factory, sub_id) == ["2026-01-01", "2026-05-01"]
    sub = row(session_factory, Subscription, sub_id)
    assert (sub.status, sub.next_charge_at) == ("active", datetime(2026, 6, 1, tzinfo=UTC))


# --- bug 5: subscription status was whichever outcome landed last ---------------------------------------

def test_bug5_one_open_period_at_a_time_and_status_follows_every_open_charge(session_factory):
    anchor = datetime(2026, 3, 1, tzinfo=UTC)
    sub_id = subscription(session_factory, anchor=anchor, interval="day")
    outcomes = {"a": PaymentOutcome(OutcomeKind.processing), "b": declined("insufficient_funds")}
    current = ["a"]
    gw = FakeGateway(script=lambda pm: outcomes[current[0]])
    t0 = anchor + timedelta(hours=9)
    [a] = charging.run_due(now=t0, enqueue=lambda _id: None).created
    assert charging.process_charge(a, gateway=gw, now=t0) == "processing"

    # The next day's period is due while A is still processing: nothing opens over it.
    t1 = t0 + timedelta(days=1)
    assert charging.run_due(now=t1, enqueue=lambda _id: None).created == []
    assert opened_periods(session_factory, sub_id) == ["2026-03-01"]

    # B: the period a run opened over A before the fix (rows an installation may still hold).
    with session_factory() as s:
        sub = s.get(Subscription, sub_id)
        b = factories.make_charge(s, sub, period_index=1).id
        sub.next_period_index, sub.next_charge_at = 2, anchor + timedelta(days=2)
        s.commit()
    current[0] = "b"
    assert charging.process_charge(b, gateway=gw, now=t1) == "requires_payment_method"
    assert row(session_factory, Subscription, sub_id).status == "past_due"
    # A's success lands while B is in dunning.
    settle_as_stripe_says(gw, row(session_factory, Charge, a).payment_intent_id, OutcomeKind.succeeded)
    assert reconciler.settle_processing(now=t1 + timedelta(hours=1), gateway=gw) == [a]
    assert row(session_factory, Charge, a).status == ChargeStatus.paid
    assert row(session_factory, Subscription, sub_id).status == "past_due"
    assert charging.run_due(now=t1 + timedelta(days=1), enqueue=lambda _id: None).created == []
    assert opened_periods(session_factory, sub_id) == ["2026-03-01", "2026-03-02"]


# --- bug 6: a charge could stay processing forever ------------------------------------------------------

@pytest.mark.parametrize(("status", "words"), [
    ("requires_capture", "authorised but not captured"),
    ("requires_confirmation", "created but not confirmed"),
    ("requires_something_new", "(requires_something_new) this worker cannot settle"),
])
def test_bug6_a_payment_intent_in_a_state_nothing_settles_is_held_for_staff_with_the_reason(
        session_factory, status, words):
    now = datetime(2026, 3, 1, 9, tzinfo=UTC)
    sub_id = subscription(session_factory, anchor=now)
    gw = FakeGateway(script=lambda pm: PaymentOutcome(OutcomeKind.processing))
    [charge_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=now) == "processing"
    pi_id = row(session_factory, Charge, charge_id).payment_intent_id
    seen = gw.intents[pi_id]["outcome"]
    # Stripe reports the PaymentIntent in ``status``, read back through the gateway's own mapping.
    gw.intents[pi_id]["outcome"] = outcome_from_payment_intent({
        "id": pi_id, "status": status, "amount": seen.amount, "currency": seen.currency,
        "customer": seen.customer_id, "metadata": seen.metadata, "payment_method": seen.payment_method_id})

    report = reconciler.sweep(now=now + timedelta(minutes=10), enqueue=lambda _id: None, gateway=gw)
    assert report.settled == [charge_id]
    charge = row(session_factory, Charge, charge_id)
    assert charge.status == ChargeStatus.needs_review and charge.last_error_code == f"payment_intent_{status}"
    with unit_of_work() as uow:
        detail = finance.charge_detail(uow.session, charge_id)
        assert words in detail.explanation
        assert detail.actions[finance.Action.void] is None and detail.actions[finance.Action.retry_now] is None
    assert row(session_factory, Subscription, sub_id).status == "past_due"  # no next period over it
    assert outbox(session_factory, charge_id) == []  # the customer did nothing wrong: no email


def test_bug6_a_charge_processing_past_the_limit_becomes_actionable_by_staff(session_factory):
    now = datetime(2026, 3, 1, 9, tzinfo=UTC)
    sub_id = subscription(session_factory, anchor=now)
    gw = FakeGateway(script=lambda pm: PaymentOutcome(OutcomeKind.processing))
    [charge_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=now) == "processing"
    with unit_of_work() as uow:
        actions = finance.charge_detail(uow.session, charge_id).actions
    assert actions[finance.Action.void] and actions[finance.Action.retry_now]  # refused while it may settle

    assert reconciler.sweep(now=now + timedelta(days=1), enqueue=lambda _id: None, gateway=gw).settled == []
    assert row(session_factory, Charge, charge_id).status == ChargeStatus.processing
    later = now + reconciler.PROCESSING_LIMIT + timedelta(hours=1)
    assert reconciler.sweep(now=later, enqueue=lambda _id: None, gateway=gw).settled == [charge_id]
    charge = row(session_factory, Charge, charge_id)
    assert (charge.status, charge.last_error_code) == ("needs_review", reconciler.PROCESSING_TIMEOUT)
    with unit_of_work() as uow:
        detail = finance.charge_detail(uow.session, charge_id)
        assert "still processing at Stripe" in detail.explanation
        assert detail.actions[finance.Action.void] is None and detail.actions[finance.Action.retry_now] is None

    finance.perform("void", charge_id, actor=support.OPERATOR, reason="checked in the dashboard: never settled",
                    jobs=RecordingJobs(), now=later + timedelta(hours=1))
    assert row(session_factory, Charge, charge_id).status == ChargeStatus.void
    assert row(session_factory, Subscription, sub_id).status == "active"


# --- bug 7: emails about settled charges still went out -------------------------------------------------

def test_bug7_a_failure_email_or_final_notice_for_a_charge_paid_meanwhile_is_not_sent(session_factory,
                                                                                      smtp_server):
    """The per-kind table is covered row by row in test_outbox_failures.py
    (``test_an_email_about_a_charge_that_moved_on_is_dropped``); here the charges get there through the
    real charging path: the email is written with the failure, the payment lands before the relay runs."""
    now = datetime.now(UTC) - timedelta(days=20)
    declining = subscription(session_factory, anchor=now)
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds"))
    [failed] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(failed, gateway=gw, now=now) == "requires_payment_method"
    gw.script = lambda pm: None
    assert charging.process_charge(failed, gateway=gw, now=now + timedelta(hours=1), manual=True) == "paid"

    given_up_sub = subscription(session_factory, anchor=now)
    gw.script = lambda pm: auth_required()
    [given_up] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(given_up, gateway=gw, now=now) == "authentication_required"
    assert reconciler.give_up_overdue(now=now + timedelta(days=15), gateway=gw) == [given_up]
    assert ("final_notice", "pending") in outbox(session_factory, given_up)
    pi_id = row(session_factory, Charge, given_up).payment_intent_id
    assert late_success(given_up, pi_id, now + timedelta(days=16)) == "paid"

    result = notifications.relay_due(smtp_url=smtp_server.url, session_factory=session_factory)
    assert result.sent == 0
    assert smtp_server.messages == []
    assert dict(outbox(session_factory, failed))["payment_failed"] == "dropped"
    kinds = dict(outbox(session_factory, given_up))
    assert kinds["final_notice"] == "dropped" and kinds["authentication_required"] == "dropped"
    assert {row(session_factory, Subscription, i).status for i in (declining, given_up_sub)} == {"active"}


# --- bug 8: a staff "retry now" could vanish ------------------------------------------------------------

def retry_sweep(now: datetime) -> list[int]:
    """The retry sweep, with the staff requests it sends again (as ``retry_due_charges`` wires it)."""
    manual: list[int] = []
    charging.retry_due(now=now, enqueue=lambda _id: None, enqueue_manual=manual.append)
    return manual


def test_bug8_a_lost_or_busy_staff_retry_is_sent_again_until_an_attempt_claims_it(session_factory, monkeypatch):
    now = datetime.now(UTC) - timedelta(hours=1)
    subscription(session_factory, anchor=now)
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds"))
    [charge_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=now) == "requires_payment_method"

    # Lost: the broker refuses the job. The action is still done, and recorded.
    asked = now + timedelta(minutes=1)
    finance.perform("retry_now", charge_id, actor=support.OPERATOR, reason=REASON, jobs=LostJobs(), now=asked)
    assert row(session_factory, Charge, charge_id).retry_requested_at == asked
    assert retry_sweep(asked + charging.RETRY_REQUEST_GRACE / 2) == []  # its task may still be on the way
    assert retry_sweep(asked + charging.RETRY_REQUEST_GRACE + timedelta(seconds=1)) == [charge_id]

    # Busy: the re-sent task finds another process on the charge, and leaves.
    with charging.lease(charge_id) as ours:
        assert ours
        assert charging.process_charge(charge_id, gateway=gw, manual=True) == "busy"
    assert retry_sweep(asked + 2 * charging.RETRY_REQUEST_GRACE) == [charge_id]

    # The production sweep sends it to the manual-retry task (not the scheduled one, which would skip it).
    from workers import tasks

    sent: dict[str, list[int]] = {"manual": [], "scheduled": []}
    monkeypatch.setattr(tasks, "enqueue_manual_retry", sent["manual"].append)
    monkeypatch.setattr(tasks, "enqueue_charge", sent["scheduled"].append)
    tasks.retry_due_charges()
    assert sent == {"manual": [charge_id], "scheduled": []}

    # An attempt claims the charge: the request is served, and no longer sent again.
    gw.script = lambda pm: None
    assert charging.process_charge(charge_id, gateway=gw, manual=True) == "paid"
    assert row(session_factory, Charge, charge_id).retry_requested_at is None
    assert retry_sweep(datetime.now(UTC) + timedelta(hours=1)) == []


# --- bug 9: recovery and customer keys had no random part -----------------------------------------------

def restore_empty_backup(database_url: str) -> None:
    """The database comes back from a backup older than every row here: ids start again from 1."""
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


def failing_without_a_card(email: str) -> tuple[int, int, str]:
    """Through the product's enrolment, a customer with no card and a subscription due now, its first
    period failed (no PaymentIntent): (customer id, charge id, Stripe customer id)."""
    customer = enrolment.create_customer(email, "Same Id")
    now = datetime.now(UTC) - timedelta(minutes=1)
    with unit_of_work() as uow:
        factories.make_subscription(uow.session, uow.session.get(Customer, customer.id), amount=2500,
                                    anchor_at=now, next_charge_at=now)
        uow.commit()
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == ChargeStatus.requires_payment_method
    return customer.id, charge_id, customer.stripe_customer_id


def row_of_charge(charge_id: int) -> Charge:
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        uow.session.expunge(charge)
        return charge


def recovery_page(customer_id: int, charge_id: int):
    with unit_of_work() as uow:
        token = recovery.issue_token(uow.session, customer_id=customer_id, purpose="recover", charge_id=charge_id)
        uow.commit()
    return customer_pages.open_recovery(token)


def test_bug9_after_a_restore_new_customers_and_recovery_pages_get_their_own_stripe_objects(
        app_env, sandbox, database_url):
    """test_ownership.py also covers a restore that keeps the charge and loses only its keys
    (``test_after_a_restore_the_page_takes_a_payment_though_its_earlier_payment_intent_was_canceled``)."""
    client = stripe.StripeClient(sandbox.api_key, base_addresses={"api": sandbox.url}, max_network_retries=0)
    customer_id, charge_id, cus_before = failing_without_a_card("before@example.com")
    assert recovery_page(customer_id, charge_id).payable
    pi_before = row_of_charge(charge_id).payment_intent_id
    client.v1.payment_intents.cancel(pi_before)  # e.g. the customer gave up on it

    restore_empty_backup(database_url)
    customer_id2, charge_id2, cus_after = failing_without_a_card("after@example.com")
    assert (customer_id2, charge_id2) == (customer_id, charge_id)  # the ids repeat
    assert cus_after not in (None, cus_before)  # created, and not the earlier customer replayed
    assert client.v1.customers.retrieve(cus_after).email == "after@example.com"
    with unit_of_work() as uow:
        key = uow.session.get(Customer, customer_id2).stripe_create_key
    assert re.fullmatch(rf"customer-{customer_id2}-[0-9a-f]+", key)

    page = recovery_page(customer_id2, charge_id2)
    charge = row_of_charge(charge_id2)
    assert page.payable and page.intent_status == "requires_payment_method"
    assert charge.payment_intent_id not in (None, pi_before)
    assert re.fullmatch(rf"recover-charge-{charge_id2}-[0-9a-f]+", charge.recovery_key)
    assert client.v1.payment_intents.confirm(charge.payment_intent_id, {"payment_method": "pm_card_visa"}
                                             ).status == "succeeded"


# --- bug 10: money formatting and card choice -----------------------------------------------------------

# (currency, amount in minor units, as the console shows it) — zero, two and three decimals.
AMOUNTS = [("jpy", 1500, "¥1,500"), ("eur", 1999, "€19.99"), ("kwd", 1230, "1.230 KWD")]


def seed_currencies(session_factory, now: datetime) -> dict[str, int]:
    """A failing charge in JPY, EUR and KWD (the yen one on a card saved under a previous
    authorization), plus a second JPY and KWD charge so the overview sums them; currency → charge id."""
    ids = {}
    with session_factory() as s:
        for i, (currency, amount, _shown) in enumerate(AMOUNTS):
            customer = factories.make_customer(s, name=f"Customer {currency.upper()}", country="JP")
            factories.make_payment_method(s, customer, country="JP", previous_authorization=currency == "jpy",
                                          saved_at=datetime(2020, 6, 1, tzinfo=UTC))
            sub = factories.make_subscription(s, customer, amount=amount, currency=currency)
            failed_at = now - timedelta(days=2, hours=i)
            charge = factories.make_charge(s, sub, status="requires_payment_method", attempts=1,
                                           last_error_code="card_declined", last_decline_code="insufficient_funds",
                                           first_failed_at=failed_at, created_at=failed_at, updated_at=failed_at,
                                           next_retry_at=now + timedelta(days=1))
            ids[currency] = charge.id
            if currency != "eur":  # a second period of the same amount, so the totals are sums
                factories.make_charge(s, sub, period_index=1, status="requires_payment_method", attempts=1,
                                      last_error_code="card_declined", last_decline_code="insufficient_funds",
                                      first_failed_at=failed_at, created_at=failed_at, updated_at=failed_at)
        s.commit()
    return ids


def test_bug10_billing_queue_shows_three_decimal_currencies_as_they_are(base_env, session_factory):
    seed_currencies(session_factory, datetime.now(UTC))
    result = run_billing("queue", env=base_env)
    assert result.returncode == 0, result.stderr
    lines = {cur: [line for line in result.stdout.splitlines() if cur.upper() in line.split()]
             for cur, _, _ in AMOUNTS}
    assert all(len(found) == 2 or cur == "eur" for cur, found in lines.items()), result.stdout
    assert all("1.230" in line.split() for line in lines["kwd"]), result.stdout
    assert all("1500" in line.split() for line in lines["jpy"]), result.stdout
    assert "19.99" in lines["eur"][0].split(), result.stdout
    assert "12.30" not in result.stdout and "15.00" not in result.stdout


@pytest.fixture
def console_app(app_env):
    """The whole web app (``billing web``) over HTTP, with an operator signed in to the console."""
    from billing.web.app import create_app

    support.truncate_staff(app_env["BILLING_DATABASE_URL"])
    support.add_accounts()
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def test_bug10_every_console_page_answers_with_zero_two_and_three_decimal_currencies(console_app,
                                                                                      session_factory):
    ids = seed_currencies(session_factory, datetime.now(UTC))
    login = console_app.get("/finance/login")
    assert login.status_code == 200
    assert support.login(console_app).status_code == 303

    queue = console_app.get("/finance/queue")
    assert queue.status_code == 200, queue.text
    text = html.unescape(queue.text)
    for currency, _amount, shown in AMOUNTS:
        assert shown in text, (currency, shown)

    for currency, amount, shown in AMOUNTS:
        page = console_app.get(f"/finance/charges/{ids[currency]}")
        assert page.status_code == 200, page.text
        assert shown in html.unescape(page.text), (currency, shown)

    overview = console_app.get("/finance/overview")
    assert overview.status_code == 200, overview.text
    text = html.unescape(overview.text)
    # Charges by status: two of each but EUR; riding on previous-authorization cards: the yen one.
    for total in ("¥3,000", "€19.99", "2.460 KWD", "¥1,500"):
        assert total in text, total

    export = console_app.get("/finance/queue.csv")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = {int(r["charge_id"]): r for r in csv.DictReader(io.StringIO(export.text))}
    for currency, amount, _shown in AMOUNTS:  # minor units, as the CSV's header says
        assert (rows[ids[currency]]["amount"], rows[ids[currency]]["currency"]) == (str(amount), currency)


def test_bug10_a_detached_card_is_no_card_on_the_console_as_for_the_charge_task(console_app, session_factory):
    now = datetime.now(UTC) - timedelta(minutes=1)
    sub_id = subscription(session_factory, anchor=now)
    with session_factory() as s:
        pm = s.get(PaymentMethod, s.get(Subscription, sub_id).payment_method_id)
        pm.detached_at = now  # payment_method.detached: it can never be charged again
        last4 = pm.last4
        s.commit()
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=now, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=now) == "requires_payment_method"
    assert gw.calls == []  # the charge task has no card to charge
    assert row(session_factory, Charge, charge_id).last_error_code == "no_payment_method"

    assert support.login(console_app).status_code == 303
    page = console_app.get(f"/finance/charges/{charge_id}")
    assert page.status_code == 200, page.text
    card = re.search(r"<dt>Card</dt><dd>(.*?)</dd>", page.text, re.S)
    assert card, page.text
    shown = html.unescape(card.group(1))
    assert last4 not in shown or "detached" in shown, shown  # never offered as a card that can be charged
    assert "none" in shown or "detached" in shown, shown


def test_a_late_success_of_an_abandoned_attempt_is_recorded_on_a_pending_charge(session_factory):
    """An attempt abandoned after Stripe's 500s sends the charge back to ``pending``; if a PaymentIntent
    of that attempt succeeds after all (its webhook, or a lookup), the money is recorded: pending → paid
    is a legal move, never an ignored outcome."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    sub_id = subscription(session_factory, anchor=t0)
    gw = OutageGateway(script=lambda pm: declined("insufficient_funds"), outage=1)
    [charge_id] = charging.run_due(now=t0, enqueue=lambda _id: None).created
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=t0)
    assert row(session_factory, Charge, charge_id).status == ChargeStatus.pending
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id, with_for_update=True)
        result = charging.apply_outcome(uow.session, charge, PaymentOutcome(OutcomeKind.succeeded,
                                                                            payment_intent_id="pi_late"),
                                        now=t0 + timedelta(minutes=5))
        uow.commit()
    assert result == ChargeStatus.paid.value
    assert row(session_factory, Charge, charge_id).status == ChargeStatus.paid
    assert row(session_factory, Subscription, sub_id).status == "active"
