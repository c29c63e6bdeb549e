"""Attacks on the charge lease and the lean charge path, on real PostgreSQL with the fake gateway.

Each test is one interleaving a money bug would need: a worker that stalled past its lease while its
Stripe call was in flight, a lease lapsing between claim and apply, the recovery page or a staff
action beside a worker, clocks that disagree, the one-statement apply against the state machine, a
canceled subscription, the card rule, and connections lost or exhausted between the steps. What must
hold throughout: the period is charged at most once, the late writer writes nothing, and nothing is
left in flight with nobody to pick it up.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from billing import cards, charging, finance, leases, reconciler, state, webhooks
from billing.db import unit_of_work
from billing.models import Attempt, Charge, ChargeStatus, Customer, Notification, Subscription
from billing.outcomes import OutcomeKind, PaymentOutcome, TemporaryStripeError
from tests import factories
from tests.fakes import FakeGateway
from tests.integration.billing_helpers import lease_runs_out
from tests.integration.test_charge_lease import charge_row, due_charge

NOW = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
NO_JOBS = SimpleNamespace(retry_charge=lambda _id: None, send_recovery=lambda _id: None)

pytestmark = pytest.mark.usefixtures("clean_db")


def declined(_pm: str) -> PaymentOutcome:
    return PaymentOutcome(kind=OutcomeKind.declined, error_code="card_declined", decline_code="insufficient_funds")


def attempts_of(session_factory, charge_id: int) -> list[Attempt]:
    with session_factory() as s:
        return list(s.scalars(select(Attempt).where(Attempt.charge_id == charge_id).order_by(Attempt.id)))


def notifications_of(session_factory, charge_id: int) -> int:
    with session_factory() as s:
        return s.scalar(select(func.count()).select_from(Notification).where(Notification.charge_id == charge_id))


# --- a stalled worker taken over while its Stripe call is in flight ------------------------------

@pytest.mark.parametrize("stalled_lands_first", [True, False])
def test_stalled_payment_taken_over_mid_call_is_charged_once_and_the_late_writer_writes_nothing(
        session_factory, stalled_lands_first):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    stalled = charging._claim(charge_id, NOW, manual=False)  # its renewals stop (thread dead, CPU starved)
    lease_runs_out(charge_id)
    taker = charging._claim(charge_id, NOW, manual=False)
    assert taker.resumed and taker.idempotency_key == stalled.idempotency_key
    if stalled_lands_first:
        late = charging._call_stripe(gw, stalled)  # the in-flight request lands at Stripe first
        assert charging._finish(stalled, late, NOW) == "lease-lost"
        assert charge_row(session_factory, charge_id).status == ChargeStatus.processing
        assert charging._finish(taker, charging._call_stripe(gw, taker), NOW) == "paid"
    else:
        assert charging._finish(taker, charging._call_stripe(gw, taker), NOW) == "paid"
        assert charging._finish(stalled, charging._call_stripe(gw, stalled), NOW) == "already-finished"
    assert gw.created() == 1
    assert {c[1]["key"] for c in gw.calls if c[0] == "create"} == {stalled.idempotency_key}
    [attempt] = attempts_of(session_factory, charge_id)
    assert attempt.phase == "finished" and attempt.outcome == "succeeded"
    charge = charge_row(session_factory, charge_id)
    assert (charge.status, charge.lease_token, charge.paid_at) == (ChargeStatus.paid, None, NOW)


def test_stalled_decline_taken_over_counts_one_failure_and_one_email(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway(script=declined)
    stalled = charging._claim(charge_id, NOW, manual=False)
    late = charging._call_stripe(gw, stalled)
    lease_runs_out(charge_id)
    taker = charging._claim(charge_id, NOW, manual=False)
    assert charging._finish(taker, charging._call_stripe(gw, taker), NOW) == ChargeStatus.requires_payment_method
    assert charging._finish(stalled, late, NOW) == "already-finished"
    charge = charge_row(session_factory, charge_id)
    assert (charge.status, charge.failures) == (ChargeStatus.requires_payment_method, 1)
    assert notifications_of(session_factory, charge_id) == 1 and gw.created() == 1


def test_taker_told_key_in_use_gives_back_and_the_stalled_answer_is_not_lost_for_good(session_factory):
    """The takeover's resend meets the stalled request still running at Stripe (409 in use): the taker
    gives the lease back, the stalled answer is fenced out, and the next try finds the payment."""
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    stalled = charging._claim(charge_id, NOW, manual=False)
    lease_runs_out(charge_id)
    gw.fail_next = ["before"]  # the taker's resend: idempotency key in use
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=NOW)
    assert charge_row(session_factory, charge_id).lease_token is None
    assert charging._finish(stalled, charging._call_stripe(gw, stalled), NOW) == "lease-lost"
    # Nothing is stranded: the task's retry (or the sweep) resumes the attempt and finds its payment.
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    assert gw.created() == 1 and len(attempts_of(session_factory, charge_id)) == 1


def test_a_lease_that_lapses_between_claim_and_apply_without_a_taker_still_records(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    claim = charging._claim(charge_id, NOW, manual=False)
    answer = charging._call_stripe(gw, claim)
    lease_runs_out(charge_id)  # nobody took it over: the token is still this attempt's
    assert charging._finish(claim, answer, NOW) == "paid"
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "skipped:paid" and gw.created() == 1


# --- other parties beside a worker ---------------------------------------------------------------

def test_recovery_page_and_worker_exclude_each_other(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    claim = charging._claim(charge_id, NOW, manual=False)
    with charging.lease(charge_id) as page:
        assert page is None  # a live attempt: the page makes no PaymentIntent
    charging._finish(claim, charging._call_stripe(gw, claim), NOW)
    # And the other way round: the page's lease keeps a retry of a waiting charge out.
    with unit_of_work() as uow:
        uow.session.execute(text("UPDATE charges SET status = 'requires_payment_method', next_retry_at = :t, "
                                 "first_failed_at = :t, paid_at = NULL WHERE id = :c"), {"t": NOW, "c": charge_id})
        uow.commit()
    with charging.lease(charge_id) as page:
        assert page is not None
        assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "busy"
    assert charge_row(session_factory, charge_id).lease_token is None


def test_finance_and_webhooks_keep_out_of_a_live_or_lapsed_attempt(session_factory):
    charge_id = due_charge(session_factory)
    charging._claim(charge_id, NOW, manual=False)
    for lapsed in (False, True):
        if lapsed:
            lease_runs_out(charge_id)
        with pytest.raises(finance.ActionRefused):
            finance.perform("void", charge_id, actor="staff@example.com", reason="attack", now=NOW,
                            jobs=NO_JOBS)
        with unit_of_work() as uow:
            uow.session.scalars(select(Charge).where(Charge.id == charge_id).with_for_update()).one()
            assert webhooks._attempt_in_flight(uow.session, charge_id)  # deferred, lease or not
    assert charge_row(session_factory, charge_id).status == ChargeStatus.processing


def test_the_lease_is_measured_by_the_database_clock_whatever_the_app_clock_says(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    charging._claim(charge_id, NOW - timedelta(days=3650), manual=False)  # a worker ten years slow
    # A worker ten years fast still finds the lease live …
    assert charging.process_charge(charge_id, gateway=gw, now=NOW + timedelta(days=3650)) == "busy"
    with unit_of_work() as uow:
        left = uow.session.scalar(text("SELECT extract(epoch FROM lease_expires_at - clock_timestamp()) "
                                       "FROM charges WHERE id = :c"), {"c": charge_id})
    assert 0 < left <= leases.LEASE_SECONDS  # … because expiry is the database's now + 30 s
    # … and the sweep, with any app clock, leaves a live lease alone.
    assert reconciler.requeue_stale(now=NOW + timedelta(days=3650), enqueue=lambda _id: None) == []
    assert gw.calls == []


# --- the one-statement apply against the state machine --------------------------------------------

@pytest.mark.parametrize("kind", [OutcomeKind.succeeded, OutcomeKind.processing])
@pytest.mark.parametrize("from_status", [s.value for s in ChargeStatus])
def test_the_lean_apply_moves_only_where_the_state_machine_allows(session_factory, from_status, kind):
    charge_id = due_charge(session_factory)
    gw = FakeGateway(script=lambda _pm: PaymentOutcome(kind=kind))
    claim = charging._claim(charge_id, NOW, manual=False)
    answer = charging._call_stripe(gw, claim)
    with unit_of_work() as uow:  # the charge moved under the (still held) lease
        uow.session.execute(text("UPDATE charges SET status = :s WHERE id = :c"), {"s": from_status, "c": charge_id})
        uow.commit()
    charging._finish(claim, answer, NOW)
    wanted = ChargeStatus.paid if kind is OutcomeKind.succeeded else ChargeStatus.processing
    charge = charge_row(session_factory, charge_id)
    if from_status == ChargeStatus.paid or (from_status in state.FINAL and kind is not OutcomeKind.succeeded):
        expected = from_status  # final stays final (money collected after a give-up excepted)
    else:
        expected = wanted if state.can_move(from_status, wanted) else from_status
    assert charge.status == expected
    assert state.can_move(from_status, charge.status)


def test_a_staff_retry_of_a_refusal_answered_processing_keeps_the_subscription_past_due(session_factory):
    """The lean path's facts leave last_error_code out; the subscription must still follow
    billing.state.is_open_failure (a retry of a refusal in flight is an open failure)."""
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, status="past_due", next_period_index=1,
                                          next_charge_at=NOW + timedelta(days=20))
        charge = factories.make_charge(s, sub, status="needs_review", last_error_code="amount_too_small")
        s.commit()
        sub_id, charge_id = sub.id, charge.id
    gw = FakeGateway(script=lambda _pm: PaymentOutcome(kind=OutcomeKind.processing))
    assert charging.process_charge(charge_id, gateway=gw, now=NOW, manual=True) == ChargeStatus.processing
    with unit_of_work() as uow:
        assert state._facts(uow.session, sub_id)[0]
        assert uow.session.get(Subscription, sub_id).status == "past_due"


# --- a canceled subscription, and the card -------------------------------------------------------

def test_a_canceled_subscription_finishes_its_started_attempt_with_the_same_key_only(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    first = charging._claim(charge_id, NOW, manual=False)
    charging._call_stripe(gw, first)  # charged; the worker dies before recording it
    with session_factory() as s:
        s.get(Subscription, s.get(Charge, charge_id).subscription_id).status = "canceled"
        s.commit()
    lease_runs_out(charge_id)
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"  # "a charge in flight finishes"
    assert gw.created() == 1 and len(attempts_of(session_factory, charge_id)) == 1


@pytest.mark.parametrize("own", [None, "ok", "detached"])
@pytest.mark.parametrize("default", [None, "ok", "detached"])
def test_the_claims_card_is_card_for(session_factory, own, default):
    with session_factory() as s:
        customer = factories.make_customer(s)
        pms = {}
        for name, how in (("default", default), ("own", own)):
            if how is not None:
                pm = factories.make_payment_method(s, customer, default=name == "default")
                if how == "detached":
                    pm.detached_at = NOW
                pms[name] = pm
        s.flush()
        customer.default_payment_method_id = pms["default"].id if "default" in pms else None
        sub = factories.make_subscription(s, customer, payment_method_id=pms["own"].id if "own" in pms else None,
                                          anchor_at=NOW - timedelta(days=1), next_charge_at=NOW - timedelta(days=1))
        s.commit()
        sub_id = sub.id
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, NOW, manual=False)
    with session_factory() as s:
        sub = s.get(Subscription, sub_id)
        expected = cards.card_for(s, sub, s.get(Customer, sub.customer_id))
        assert claim.stripe_payment_method_id == (expected.stripe_payment_method_id if expected else None)


# --- lost connections and an exhausted pool between the steps ------------------------------------

def test_a_claim_whose_answer_was_lost_is_resent_and_resumes_its_own_attempt(session_factory, monkeypatch):
    charge_id = due_charge(session_factory)
    real = charging.autocommit_connection
    lost = []

    @contextlib.contextmanager
    def flaky():
        with real() as conn:
            class Conn:
                def execute(self, *a, **kw):
                    result = conn.execute(*a, **kw)  # committed (autocommit) …
                    if not lost:
                        lost.append(1)  # … and the answer never arrives
                        raise OperationalError("WITH ch AS …", {}, Exception("connection lost"),
                                               connection_invalidated=True)
                    return result
            yield Conn()

    monkeypatch.setattr(charging, "autocommit_connection", flaky)
    gw = FakeGateway()
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"
    assert lost and gw.created() == 1 and len(attempts_of(session_factory, charge_id)) == 1


def test_an_exhausted_pool_at_apply_leaves_a_charge_the_sweep_resumes(session_factory, monkeypatch):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()

    def exhausted(*_a, **_kw):
        raise PoolTimeout("QueuePool limit of size 10 overflow 50 reached")

    monkeypatch.setattr(charging, "_finish_once", exhausted)
    with pytest.raises(PoolTimeout):
        charging.process_charge(charge_id, gateway=gw, now=NOW)  # charged, not recorded
    monkeypatch.undo()
    token = charge_row(session_factory, charge_id).lease_token
    assert token and token not in leases.renewer._held  # not renewed: it lapses by itself
    lease_runs_out(charge_id)
    later = NOW + reconciler.STALE_AFTER + timedelta(minutes=1)
    assert reconciler.requeue_stale(now=later, enqueue=lambda _id: None) == [charge_id]
    assert charging.process_charge(charge_id, gateway=gw, now=later) == "paid"
    assert gw.created() == 1
