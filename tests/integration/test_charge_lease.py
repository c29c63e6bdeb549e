"""The charge lease and the lean charge path on real PostgreSQL, with a hand-written fake gateway.

What the lease must give (billing.leases): a second delivery leaves while the first is on Stripe; a
dead worker's attempt resumes once its lease lapses, charged once; a worker that stalled past its
lease and was taken over records nothing (fencing); no connection is held across the Stripe call;
a lost connection or an exhausted pool leaves nothing that the sweeps do not pick up again. And the
path is lean: a payment costs four statements as the server counts them (BEGIN and COMMIT included).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from billing import charging, db, leases, reconciler, state
from billing.db import get_engine, unit_of_work
from billing.models import Attempt, Charge, ChargeStatus, Subscription
from billing.outcomes import TemporaryStripeError
from tests import factories
from tests.fakes import FakeGateway
from tests.integration.billing_helpers import lease_runs_out
from tests.integration.conftest import wait_until

NOW = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)

pytestmark = pytest.mark.usefixtures("clean_db")


def due_charge(session_factory, **sub_kw) -> int:
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        factories.make_subscription(s, customer, anchor_at=NOW - timedelta(days=1),
                                    next_charge_at=NOW - timedelta(days=1), **sub_kw)
        s.commit()
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    return charge_id


@contextlib.contextmanager
def pool_of(size: int, overflow: int, timeout: float = 30.0):
    """This process's pool at that size for the block (as a worker of that concurrency would have)."""
    saved = db._pool_for
    db._pool_for = (size, overflow)
    db.reset_engine()
    get_engine().pool._timeout = timeout
    try:
        yield
    finally:
        db._pool_for = saved
        db.reset_engine()


def in_processing() -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(text("SELECT count(*) FROM charges WHERE status = 'processing'"))


def charge_row(session_factory, charge_id: int) -> Charge:
    with session_factory() as s:
        return s.get(Charge, charge_id)


class SlowGateway(FakeGateway):
    """Stripe taking its time: the call waits until the test lets it go."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def charge_off_session(self, **kw):
        self.entered.set()
        assert self.release.wait(30)
        return super().charge_off_session(**kw)


def test_no_connection_is_held_while_stripe_answers_and_a_second_delivery_leaves(session_factory):
    charge_id = due_charge(session_factory)
    gw = SlowGateway()
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(charging.process_charge(charge_id, gateway=gw, now=NOW)))
    first.start()
    assert gw.entered.wait(20)
    assert get_engine().pool.checkedout() == 0  # nothing pinned across the call
    charge = charge_row(session_factory, charge_id)
    assert charge.status == ChargeStatus.processing and charge.lease_token and charge.lease_expires_at
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "busy"
    gw.release.set()
    first.join(30)
    assert results == ["paid"] and gw.created() == 1
    charge = charge_row(session_factory, charge_id)
    assert (charge.lease_token, charge.lease_expires_at) == (None, None)  # given back with the outcome


def test_many_charges_at_once_on_a_pool_smaller_than_the_concurrency(session_factory):
    charge_ids = [due_charge(session_factory) for _ in range(12)]
    gw = SlowGateway()
    results: list[str] = []

    def run(cid: int) -> None:
        results.append(charging.process_charge(cid, gateway=gw, now=NOW))

    with pool_of(2, 0):  # two connections for twelve charges in flight
        threads = [threading.Thread(target=run, args=(cid,)) for cid in charge_ids]
        for t in threads:
            t.start()
        # All twelve claim, and wait on Stripe together, on two connections.
        wait_until(lambda: in_processing() == 12, timeout=20, message="twelve charges to be claimed")
        gw.release.set()
        for t in threads:
            t.join(30)
    assert sorted(results) == ["paid"] * 12 and gw.created() == 12


def test_a_worker_taken_over_after_its_lease_lapsed_records_nothing(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()
    stalled = charging._claim(charge_id, NOW, manual=False)
    answer = charging._call_stripe(gw, stalled)  # charged at Stripe; then the worker stalls
    lease_runs_out(charge_id)
    taker = charging._claim(charge_id, NOW, manual=False)  # another worker resumes the same attempt
    assert (taker.attempt_id, taker.idempotency_key) == (stalled.attempt_id, stalled.idempotency_key)
    assert taker.lease_token != stalled.lease_token
    assert charging._finish(stalled, answer, NOW) == "lease-lost"  # fenced out
    assert charge_row(session_factory, charge_id).status == ChargeStatus.processing
    assert charging._finish(taker, charging._call_stripe(gw, taker), NOW) == "paid"
    assert gw.created() == 1
    with session_factory() as s:
        assert len(s.scalars(select(Attempt)).all()) == 1


def test_a_live_worker_keeps_its_lease_past_its_length(session_factory, monkeypatch):
    monkeypatch.setattr(leases, "LEASE_SECONDS", 1.5)
    monkeypatch.setattr(leases, "RENEW_EVERY", 0.3)
    monkeypatch.setattr(leases, "renewer", leases.Renewer())
    charge_id = due_charge(session_factory)
    gw = SlowGateway()
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(charging.process_charge(charge_id, gateway=gw, now=NOW)))
    first.start()
    assert gw.entered.wait(20)
    time.sleep(3.0)  # twice the lease's length on one Stripe call
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "busy"
    gw.release.set()
    first.join(30)
    assert results == ["paid"] and gw.created() == 1


def test_stripe_unreachable_gives_the_lease_back_for_the_retry(session_factory):
    charge_id = due_charge(session_factory)
    gw = FakeGateway(fail_next=["before"])
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id, gateway=gw, now=NOW)
    assert charge_row(session_factory, charge_id).lease_token is None
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "paid"  # the task's retry, at once


def test_a_lost_connection_before_the_outcome_is_recorded_is_resumed_by_the_sweep(session_factory, monkeypatch):
    charge_id = due_charge(session_factory)
    gw = FakeGateway()

    def connection_lost(*_a, **_kw):
        raise OperationalError("UPDATE charges …", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(charging, "_finish_once", connection_lost)
    with pytest.raises(OperationalError):
        charging.process_charge(charge_id, gateway=gw, now=NOW)  # charged at Stripe, not recorded
    monkeypatch.undo()
    # The task's own retries find the lease live (the worker might still be on it) …
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "busy"
    later = NOW + timedelta(minutes=10)
    assert reconciler.requeue_stale(now=later, enqueue=lambda _id: None) == []
    # … and once it lapses the sweep sends the charge again; the resumed attempt finds its payment.
    lease_runs_out(charge_id)
    assert reconciler.requeue_stale(now=later, enqueue=lambda _id: None) == [charge_id]
    assert charging.process_charge(charge_id, gateway=gw, now=later) == "paid"
    assert gw.created() == 1 and [c[0] for c in gw.calls] == ["create", "find"]


def test_an_exhausted_pool_leaves_the_charge_pending_for_the_sweep(session_factory):
    charge_id = due_charge(session_factory)
    with pool_of(1, 0, timeout=0.2), get_engine().connect():  # another task has the only connection
        with pytest.raises(Exception, match="QueuePool limit"):
            charging.process_charge(charge_id, gateway=FakeGateway(), now=NOW)
    assert charge_row(session_factory, charge_id).status == ChargeStatus.pending
    # Opened (updated_at) just now by the real clock: the sweep five minutes from now sends it again.
    sweep_at = datetime.now(UTC) + reconciler.STALE_AFTER + timedelta(minutes=1)
    assert reconciler.requeue_stale(now=sweep_at, enqueue=lambda _id: None) == [charge_id]
    assert charging.process_charge(charge_id, gateway=FakeGateway(), now=NOW) == "paid"


def test_connections_dropped_by_the_server_are_replaced_without_a_failed_charge(session_factory, database_url):
    first, second = due_charge(session_factory), due_charge(session_factory)
    gw = FakeGateway()
    assert charging.process_charge(first, gateway=gw, now=NOW) == "paid"  # the pool now holds a connection
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres",
                         autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
    assert killed >= 1  # what a database restart does to every pooled connection
    assert charging.process_charge(second, gateway=gw, now=NOW) == "paid"


def test_a_payment_costs_four_statements_as_the_server_counts_them(session_factory):
    ids = [due_charge(session_factory) for _ in range(3)]
    gw = FakeGateway()
    charging.process_charge(ids[0], gateway=gw, now=NOW)  # warm: the installation id is read once
    engine = get_engine()
    counted: list[str] = []

    def statement(_conn, _cursor, sql, *_a):
        counted.append(sql.split()[0])

    def sent(word: str):
        # In autocommit the driver sends no BEGIN or COMMIT: only what reaches the server counts.
        def listener(conn):
            if not conn.connection.dbapi_connection.autocommit:
                counted.append(word)
        return listener

    listeners = [("before_cursor_execute", statement), ("begin", sent("BEGIN")), ("commit", sent("COMMIT"))]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        assert [charging.process_charge(cid, gateway=gw, now=NOW) for cid in ids[1:]] == ["paid", "paid"]
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)
    # The claim (one statement, autocommit), then BEGIN, the apply statement, COMMIT: per charge.
    assert counted == ["WITH", "BEGIN", "WITH", "COMMIT"] * 2


def test_a_canceled_subscription_is_void_and_not_claimed(session_factory):
    charge_id = due_charge(session_factory)
    with session_factory() as s:
        s.get(Subscription, s.get(Charge, charge_id).subscription_id).status = "canceled"
        s.commit()
    gw = FakeGateway()
    assert charging.process_charge(charge_id, gateway=gw, now=NOW) == "skipped:canceled:void"
    assert gw.calls == [] and charge_row(session_factory, charge_id).lease_token is None


def test_the_claim_takes_the_card_by_the_cards_rule(session_factory):
    """The subscription's card, else the customer's default; a detached card is no card."""
    with session_factory() as s:
        customer = factories.make_customer(s)
        default = factories.make_payment_method(s, customer, mandate_id="mandate_default")
        own = factories.make_payment_method(s, customer, default=False, mandate_id="mandate_own")
        sub = factories.make_subscription(s, customer, payment_method_id=own.id, anchor_at=NOW - timedelta(days=1),
                                          next_charge_at=NOW - timedelta(days=1))
        s.commit()
        ids = (default.stripe_payment_method_id, own.stripe_payment_method_id, own.id, sub.id)
    default_pm, own_pm, own_id, sub_id = ids
    [charge_id] = charging.run_due(now=NOW, enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, NOW, manual=False)
    assert (claim.stripe_payment_method_id, claim.mandate_id) == (own_pm, "mandate_own")
    lease_runs_out(charge_id)
    with unit_of_work() as uow:  # the attempt is abandoned; the subscription's card is detached
        uow.session.execute(text("UPDATE attempts SET phase = 'finished' WHERE charge_id = :c"), {"c": charge_id})
        uow.session.execute(text("UPDATE charges SET status = 'pending' WHERE id = :c"), {"c": charge_id})
        uow.session.execute(text("UPDATE payment_methods SET detached_at = now() WHERE id = :p"), {"p": own_id})
        uow.commit()
    claim = charging._claim(charge_id, NOW, manual=False)
    assert (claim.stripe_payment_method_id, claim.mandate_id) == (default_pm, "mandate_default")
    lease_runs_out(charge_id)
    with unit_of_work() as uow:  # and the default too: no card at all
        uow.session.execute(text("UPDATE attempts SET phase = 'finished' WHERE charge_id = :c"), {"c": charge_id})
        uow.session.execute(text("UPDATE charges SET status = 'pending' WHERE id = :c"), {"c": charge_id})
        uow.session.execute(text("UPDATE payment_methods SET detached_at = now()"))
        uow.commit()
    claim = charging._claim(charge_id, NOW, manual=False)
    assert claim.stripe_payment_method_id is None and claim.mandate_id is None
    assert claim.metadata["subscription_id"] == str(sub_id)


def test_the_claim_moves_to_processing_only_from_where_the_state_machine_allows():
    assert set(state.sources(ChargeStatus.processing)) == {
        s.value for s in ChargeStatus if s == ChargeStatus.processing
        or ChargeStatus.processing in state.CHARGE_TRANSITIONS[s]}
    assert ChargeStatus.paid.value not in state.sources(ChargeStatus.processing)


# --- the subscription's facts, gathered in the apply statement, agree with the state machine's own ----

STATUSES = [s.value for s in ChargeStatus]


@pytest.mark.parametrize("seed", range(6))
def test_facts_gathered_beside_the_move_match_a_refresh_after_it(session_factory, seed):
    rng = random.Random(seed)
    with session_factory() as s:
        customer = factories.make_customer(s)
        subs = []
        for _ in range(25):
            sub = factories.make_subscription(s, customer)
            n = rng.randrange(1, 5)
            charges = [factories.make_charge(s, sub, period_index=i, status=rng.choice(STATUSES),
                                             first_failed_at=rng.choice([None, NOW]),
                                             last_error_code=rng.choice([None, "amount_too_small"]))
                       for i in range(n)]
            subs.append((sub.id, [c.id for c in charges]))
        s.commit()
    for sub_id, charge_ids in subs:
        me = rng.choice(charge_ids)
        new_status, failed = rng.choice(STATUSES), rng.choice([None, NOW])
        code = rng.choice([None, "amount_too_small"])
        with unit_of_work() as uow:
            s = uow.session
            row = s.execute(text(state.OTHER_CHARGES_FACTS_SQL), {"facts_sub": sub_id, "facts_charge": me}).one()
            charge = s.get(Charge, me)
            combined = state.facts_with(
                others_open_failure=row.others_open_failure, others_given_up_index=row.others_given_up_index,
                others_settled_index=row.others_settled_index, status=new_status, first_failed_at=failed,
                period_index=charge.period_index, last_error_code=code)
            charge.status, charge.first_failed_at, charge.last_error_code = new_status, failed, code
            s.flush()
            assert combined == state._facts(s, sub_id), (sub_id, me, new_status)


def test_lease_tokens_are_unique_and_name_their_attempt():
    tokens = {leases.new_token(7) for _ in itertools.repeat(None, 100)}
    assert len(tokens) == 100 and all(t.startswith("7.") for t in tokens)
    assert leases.new_token().startswith("page.")


def test_a_payment_that_ends_a_hold_refreshes_the_subscription_on_the_lean_path(session_factory):
    """A later period paid supersedes a given-up one: the subscription leaves ``unpaid`` in the same
    transaction (the one case where the lean apply statement's facts say the status must change)."""
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, anchor_at=NOW - timedelta(days=40), status="unpaid",
                                          next_period_index=2, next_charge_at=NOW + timedelta(days=20))
        factories.make_charge(s, sub, period_index=0, status="uncollectible", first_failed_at=NOW - timedelta(days=39))
        later = factories.make_charge(s, sub, period_index=1)
        s.commit()
        sub_id, charge_id = sub.id, later.id
    assert charging.process_charge(charge_id, gateway=FakeGateway(), now=NOW) == "paid"
    with session_factory() as s:
        assert s.get(Subscription, sub_id).status == "active"
        assert s.get(Charge, charge_id).paid_at == NOW
