"""The charging phases on real PostgreSQL with a hand-written fake gateway: claim, resume, apply.

End-to-end runs through real workers and the sandbox are in test_billing_e2e.py; these pin down the
recovery points one by one, including a crash between every two phases."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from billing import charging, reconciler
from billing.models import Attempt, AttemptPhase, Charge, ChargeStatus, Notification, PaymentMethod, Subscription
from billing.outcomes import TemporaryStripeError
from tests import factories
from tests.fakes import FakeGateway, auth_required, declined
from tests.integration.billing_helpers import lease_runs_out

NOW = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)


@pytest.fixture
def sub_id(clean_db, session_factory):
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, amount=1999, currency="eur", interval="month",
                                          anchor_at=datetime(2026, 1, 31, tzinfo=UTC),
                                          next_charge_at=datetime(2026, 1, 31, tzinfo=UTC))
        s.commit()
        return sub.id


def one_charge(session_factory) -> Charge:
    with session_factory() as s:
        return s.scalars(select(Charge)).one()


def _settle(session_factory, charge_ids: list[int]) -> None:
    with session_factory() as s:
        s.execute(update(Charge).where(Charge.id.in_(charge_ids)).values(status=ChargeStatus.paid.value))
        s.commit()


def test_run_opens_each_due_period_once_and_enqueues_after_commit(sub_id, session_factory):
    enqueued = []
    report = charging.run_due(now=NOW, enqueue=enqueued.append)
    assert report.created == enqueued and len(enqueued) == 1
    # One open period at a time: February is due too, but January is not decided yet.
    assert charging.run_due(now=NOW, enqueue=enqueued.append).created == []
    _settle(session_factory, report.created)
    report2 = charging.run_due(now=NOW, enqueue=enqueued.append)  # next period is Feb 28, also due
    _settle(session_factory, report2.created)
    report3 = charging.run_due(now=NOW, enqueue=enqueued.append)  # Mar 31: due at 00:00, NOW is noon
    assert len(report2.created) == 1 and len(report3.created) == 1
    _settle(session_factory, report3.created)
    assert charging.run_due(now=NOW, enqueue=enqueued.append).created == []  # Apr 30 is not due
    with session_factory() as s:
        starts = s.scalars(select(Charge.period_start).order_by(Charge.period_index)).all()
        sub = s.get(Subscription, sub_id)
    assert [d.date().isoformat() for d in starts] == ["2026-01-31", "2026-02-28", "2026-03-31"]
    assert sub.next_charge_at == datetime(2026, 4, 30, tzinfo=UTC)


def test_concurrent_runs_open_a_period_once(sub_id, session_factory):
    enqueued: list[int] = []
    barrier = threading.Barrier(4)

    def run():
        barrier.wait()
        charging.run_due(now=datetime(2026, 2, 1, tzinfo=UTC), enqueue=enqueued.append)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Charge)) == 1
    assert len(enqueued) == 1


def test_success_marks_paid_with_our_key_and_metadata(sub_id, session_factory):
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    charge = one_charge(session_factory)
    assert charge.status == ChargeStatus.paid and charge.payment_intent_id == "pi_fake_1"
    kind, params = gw.calls[0]
    with session_factory() as s:
        attempt = s.scalars(select(Attempt)).one()
    assert kind == "create" and params["key"] == attempt.idempotency_key
    assert attempt.idempotency_key.startswith(f"attempt-{attempt.id}-")
    assert params["metadata"]["charge_id"] == str(charge_id)
    assert params["metadata"]["attempt_id"] == str(attempt.id)
    assert params["amount"] == 1999 and params["currency"] == "eur"
    assert attempt.phase == AttemptPhase.finished
    # A redelivered task finds nothing left to do.
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "skipped:paid"
    assert gw.created() == 1


def test_crash_after_claim_resumes_with_same_key_and_looks_up_first(sub_id, session_factory):
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, NOW, manual=False)  # the worker dies right after this commit
    assert one_charge(session_factory).status == ChargeStatus.processing
    # Its lease is live: a second delivery leaves the charge alone, and sends nothing.
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "busy" and gw.calls == []
    lease_runs_out(charge_id)
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    assert [c[0] for c in gw.calls] == ["find", "create"]
    assert gw.calls[1][1]["key"] == claim.idempotency_key
    assert gw.created() == 1


def test_response_lost_after_stripe_processed_it_charges_once(sub_id, session_factory):
    gw = FakeGateway(fail_next=["after"])
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=NOW)
    with session_factory() as s:
        attempt = s.scalars(select(Attempt)).one()
        assert attempt.phase == AttemptPhase.started
    # The retried task finds the PaymentIntent by our metadata instead of creating another.
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    assert gw.created() == 1 and [c[0] for c in gw.calls] == ["create", "find"]


def test_crash_after_stripe_before_apply_is_settled_by_the_reconciler(sub_id, session_factory):
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, NOW, manual=False)
    charging._call_stripe(gw, claim)  # charged at Stripe; the worker dies before recording it
    enqueued: list[int] = []
    later = NOW + timedelta(minutes=10)
    # While its lease is live the worker may still be on it: not sent again.
    assert reconciler.sweep(now=later, enqueue=enqueued.append, gateway=gw).requeued == []
    lease_runs_out(charge_id)
    report = reconciler.sweep(now=later, enqueue=enqueued.append, gateway=gw)
    assert report.requeued == [charge_id] == enqueued
    assert charging.process_charge(charge_id, gateway=gw, now=later) == "paid"
    assert gw.created() == 1


def test_soft_decline_schedules_retry_on_same_payment_intent_and_emails_once(sub_id, session_factory):
    outcomes = [declined("insufficient_funds"), declined("insufficient_funds"), None]
    gw = FakeGateway(script=lambda pm: outcomes.pop(0))
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "requires_payment_method"
    charge = one_charge(session_factory)
    assert charge.last_decline_code == "insufficient_funds" and charge.next_retry_at > NOW
    # Not due yet: the retry sweep leaves it alone.
    assert charging.retry_due(now=NOW, enqueue=lambda _id: None) == []
    retry_at = charge.next_retry_at
    assert charging.retry_due(now=retry_at, enqueue=lambda _id: None) == [charge_id]
    assert charging.process_charge(charge_id, gateway=gw, now=retry_at) == "requires_payment_method"
    retry_at2 = one_charge(session_factory).next_retry_at
    assert retry_at2 > retry_at
    assert charging.process_charge(charge_id, gateway=gw, now=retry_at2) == "paid"
    assert [c[0] for c in gw.calls] == ["create", "confirm", "confirm"]
    assert {c[1]["pi"] for c in gw.calls[1:]} == {"pi_fake_1"}
    keys = [c[1]["key"] for c in gw.calls]
    assert len(set(keys)) == 3  # one key per attempt
    with session_factory() as s:
        kinds = s.scalars(select(Notification.kind).order_by(Notification.id)).all()
        sub = s.get(Subscription, sub_id)
    assert kinds == ["payment_failed"]
    assert sub.status == "active"


def test_authentication_required_waits_for_customer_and_gives_up_at_horizon(sub_id, session_factory):
    gw = FakeGateway(script=lambda pm: auth_required())
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "authentication_required"
    assert charging.retry_due(now=NOW + timedelta(days=30), enqueue=lambda _id: None) == []
    with session_factory() as s:
        assert s.get(Subscription, sub_id).status == "past_due"
        notes = s.scalars(select(Notification.kind)).all()
    assert notes.count("authentication_required") == 1 and "reminder" in notes
    assert reconciler.give_up_overdue(now=NOW + timedelta(days=13), gateway=gw) == []
    assert reconciler.give_up_overdue(now=NOW + timedelta(days=15), gateway=gw) == [charge_id]
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        statuses = dict(s.execute(select(Notification.kind, Notification.status)).all())
        assert charge.status == ChargeStatus.uncollectible
        assert s.get(Subscription, sub_id).status == "unpaid"
    assert statuses["final_notice"] == "pending" and statuses["reminder"] == "dropped"


def test_no_saved_card_fails_without_calling_stripe(clean_db, session_factory):
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_subscription(s, customer, next_charge_at=NOW - timedelta(hours=1))
        s.commit()
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "requires_payment_method"
    assert gw.calls == []
    assert one_charge(session_factory).last_error_code == "no_payment_method"


def test_one_task_delivered_twice_at_once_charges_once(sub_id, session_factory):
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    results: list[str] = []
    barrier = threading.Barrier(2)

    def deliver():
        barrier.wait()
        results.append(charging.process_charge(charge_id, gateway=gw, now=NOW))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gw.created() == 1
    assert "paid" in results


def test_canceled_subscription_is_not_charged_automatically(sub_id, session_factory):
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds"))
    [first] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    charging.process_charge(first, gateway=gw, now=NOW)
    with session_factory() as s:
        s.get(Subscription, sub_id).status = "canceled"
        s.commit()
        retry_at = s.get(Charge, first).next_retry_at
    assert charging.process_charge(first, gateway=gw, now=retry_at) == "skipped:canceled:requires_payment_method"
    with session_factory() as s:
        assert s.get(Charge, first).next_retry_at is None  # out of the retry schedule
    assert charging.retry_due(now=retry_at + timedelta(days=30), enqueue=lambda _id: None) == []
    # Staff may still retry it by hand.
    gw.script = lambda pm: None
    assert charging.process_charge(first, gateway=gw, now=retry_at, manual=True) == "paid"


def test_period_opened_just_before_cancel_is_void_not_charged(sub_id, session_factory):
    gw = FakeGateway()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    with session_factory() as s:
        s.get(Subscription, sub_id).status = "canceled"
        s.commit()
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "skipped:canceled:void"
    assert gw.calls == []


def test_resumed_attempt_resends_the_mandate_it_was_first_sent_with(clean_db, session_factory):
    with session_factory() as s:
        customer = factories.make_customer(s)
        pm = factories.make_payment_method(s, customer, mandate_id="mandate_1")
        factories.make_subscription(s, customer, next_charge_at=NOW - timedelta(hours=1))
        s.commit()
        pm_id = pm.id
    gw = FakeGateway(fail_next=["before"])
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=NOW)
    # Meanwhile the mandate was revoked and cleared from the card (mandate.updated webhook).
    with session_factory() as s:
        s.get(PaymentMethod, pm_id).mandate_id = None
        s.commit()
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    sends = [c for c in gw.calls if c[0] == "create"]
    assert len(sends) == 2 and {c[1]["mandate"] for c in sends} == {"mandate_1"}
    assert len({c[1]["key"] for c in sends}) == 1


def test_give_up_asks_stripe_first_and_records_a_payment_whose_webhook_was_lost(sub_id, session_factory):
    from billing.outcomes import OutcomeKind, PaymentOutcome

    gw = FakeGateway(script=lambda pm: auth_required())
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    charging.process_charge(charge_id, gateway=gw, now=NOW)
    # The customer authenticated on the recovery page; the webhook never arrived.
    gw.intents["pi_fake_1"]["outcome"] = PaymentOutcome(kind=OutcomeKind.succeeded, payment_intent_id="pi_fake_1")
    assert reconciler.give_up_overdue(now=NOW + timedelta(days=15), gateway=gw) == []
    with session_factory() as s:
        assert s.get(Charge, charge_id).status == ChargeStatus.paid
        assert s.get(Subscription, sub_id).status == "active"
        kinds = set(s.scalars(select(Notification.kind).where(Notification.status != "dropped")))
    assert "final_notice" not in kinds


def test_a_canceled_payment_intent_is_replaced_not_reconfirmed(sub_id, session_factory):
    from billing.outcomes import OutcomeKind, PaymentOutcome

    outcomes = [PaymentOutcome(kind=OutcomeKind.canceled, error_code="payment_intent_canceled"), None]
    gw = FakeGateway(script=lambda pm: outcomes.pop(0))
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "requires_payment_method"
    with session_factory() as s:
        assert s.get(Charge, charge_id).payment_intent_id is None  # the dead one is let go
    assert charging.process_charge(charge_id, gateway=gw, now=NOW, manual=True) == "paid"
    assert [c[0] for c in gw.calls] == ["create", "create"]  # a new PaymentIntent, not a confirm
