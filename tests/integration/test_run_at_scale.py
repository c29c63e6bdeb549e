"""The billing run at scale and in batches: every due period opened exactly once, never a crash.

Rows are made by set-based SQL (tests.scale): 1,000,000 subscriptions of which about 100,000 are due,
as in bench/run_at_scale.py (which times the run; tests never assert a timing). The run's enqueue is a
counting stand-in that takes whole batches, as the product's does."""

from __future__ import annotations

import json
import logging
import random
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import select, text

from billing import charging
from billing.models import Charge, ChargeStatus, Subscription
from billing.periods import period_bounds
from tests import factories
from tests.scale import plain, seed_subscriptions

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


class CountingEnqueue:
    """Records every charge id it is handed, one by one or (``many``) a batch at a time."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, charge_id: int) -> None:
        with self._lock:
            self.ids.append(charge_id)

    def many(self, charge_ids: tuple[int, ...]) -> None:
        with self._lock:
            self.ids.extend(charge_ids)
            self.batches.append(len(charge_ids))


def opened_by_subscription(session_factory, charge_ids: list[int]) -> dict[int, int]:
    """subscription id → how many of these charges it got."""
    with session_factory() as s:
        rows = s.execute(text("SELECT subscription_id, count(*) FROM charges WHERE id = ANY(:ids) GROUP BY 1"),
                         {"ids": charge_ids}).all()
    return dict(rows)


def two_open_charges(session_factory) -> list[int]:
    with session_factory() as s:
        return list(s.scalars(text("SELECT subscription_id FROM charges WHERE status NOT IN ('paid', 'uncollectible', "
                                   "'void') GROUP BY 1 HAVING count(*) > 1")))


def test_a_run_opens_every_due_period_once_and_a_second_run_none(clean_db, database_url, session_factory):
    due = seed_subscriptions(database_url, total=1_000_000, due_every=10, now=NOW)
    assert len(due) > 90_000
    with session_factory() as s:
        index_sum_before = s.scalar(text("SELECT sum(next_period_index) FROM subscriptions"))

    enqueue = CountingEnqueue()
    report = charging.run_due(now=NOW, enqueue=enqueue)

    assert report.failed_subscriptions == []
    assert len(report.created) == len(set(report.created)) == len(due)
    assert sorted(enqueue.ids) == sorted(report.created)
    assert max(enqueue.batches) <= 500 and len(enqueue.batches) == -(-len(due) // 500)
    assert opened_by_subscription(session_factory, report.created) == dict.fromkeys(due, 1)
    assert two_open_charges(session_factory) == []
    with session_factory() as s:
        # Only the due subscriptions moved, each by exactly one period.
        assert s.scalar(text("SELECT sum(next_period_index) FROM subscriptions")) == index_sum_before + len(due)
        sample = random.Random(7).sample(report.created, 500)
        for charge, sub in s.execute(select(Charge, Subscription).join(Subscription)
                                     .where(Charge.id.in_(sample))).all():
            assert (charge.period_start, charge.period_end) == period_bounds(
                sub.anchor_at, sub.interval, sub.interval_count, charge.period_index)
            assert charge.status == ChargeStatus.pending and (charge.amount, charge.currency) == (sub.amount,
                                                                                                   sub.currency)
            assert sub.next_period_index == charge.period_index + 1
            assert (sub.current_period_start, sub.current_period_end, sub.next_charge_at) == (
                charge.period_start, charge.period_end, charge.period_end)

    again = CountingEnqueue()
    assert charging.run_due(now=NOW, enqueue=again).created == [] and again.ids == []


def test_concurrent_runs_open_each_period_once(clean_db, database_url, session_factory):
    # Behind: once opened, each subscription's next period is due as well, so only one open period at
    # a time (and the run's check that the row it locked is the row it read) stops a second opening.
    due = seed_subscriptions(database_url, total=100_000, due_every=10, now=NOW, behind=True)
    reports: list[charging.RunReport] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        reports.append(charging.run_due(now=NOW, enqueue=CountingEnqueue(), batch_size=200))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    first, second = (set(r.created) for r in reports)
    assert not first & second
    assert [r.failed_subscriptions for r in reports] == [[], []]
    assert opened_by_subscription(session_factory, [*first, *second]) == dict.fromkeys(due, 1)
    assert two_open_charges(session_factory) == []


# --- a batch that cannot be opened in one statement --------------------------------------------------

def subscriptions(session_factory, n: int, **kw) -> list[int]:
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        ids = [factories.make_subscription(s, customer, anchor_at=NOW - timedelta(days=3),
                                           next_charge_at=NOW - timedelta(days=3), **kw).id for _ in range(n)]
        s.commit()
    return ids


def test_a_bad_subscription_is_contained_and_logged_and_its_batch_still_opens(clean_db, session_factory,
                                                                              caplog):
    good = subscriptions(session_factory, 4)
    with session_factory() as s:
        customer = factories.make_customer(s)
        # Its first period ends in the year 10000, which no datetime holds.
        bad = factories.make_subscription(s, customer, interval="year", anchor_at=datetime(9999, 6, 1, tzinfo=UTC),
                                          next_charge_at=datetime(9999, 6, 1, tzinfo=UTC)).id
        s.commit()

    with caplog.at_level(logging.WARNING, logger="billing.charging"):
        report = charging.run_due(now=datetime(9999, 7, 1, tzinfo=UTC), enqueue=CountingEnqueue())

    assert report.failed_subscriptions == [bad]
    assert opened_by_subscription(session_factory, report.created) == dict.fromkeys(good, 1)
    logged = {(r.getMessage(), getattr(r, "subscription_id", None)) for r in caplog.records}
    assert ("could not open a period", bad) in logged
    assert any("row by row" in message for message, _ in logged)
    with session_factory() as s:
        assert s.get(Subscription, bad).next_period_index == 0  # not advanced


def test_a_period_that_has_its_charge_already_is_not_opened_twice(clean_db, session_factory, caplog):
    a, b, c = subscriptions(session_factory, 3)
    with session_factory() as s:
        # Period 0 of b exists and is settled, but b still says period 0 is next (a restored row, say).
        factories.make_charge(s, s.get(Subscription, b), period_index=0, status=ChargeStatus.paid.value)
        s.commit()

    with caplog.at_level(logging.ERROR, logger="billing.charging"):
        report = charging.run_due(now=NOW, enqueue=CountingEnqueue())

    assert report.failed_subscriptions == [b]
    assert opened_by_subscription(session_factory, report.created) == {a: 1, c: 1}
    assert any(getattr(r, "subscription_id", None) == b for r in caplog.records)
    with session_factory() as s:
        assert s.get(Subscription, b).next_period_index == 0
        assert s.scalar(text("SELECT count(*) FROM charges WHERE subscription_id = :b"), {"b": b}) == 1


# --- enqueueing ------------------------------------------------------------------------------------

def test_batches_are_enqueued_whole_and_only_after_their_commit(clean_db, database_url, session_factory):
    subscriptions(session_factory, 7)
    seen_committed: list[int] = []

    class CheckingEnqueue(CountingEnqueue):
        def many(self, charge_ids):
            with psycopg.connect(plain(database_url)) as other:  # another connection sees only commits
                seen_committed.append(other.execute("SELECT count(*) FROM charges WHERE id = ANY(%s)",
                                                    (list(charge_ids),)).fetchone()[0])
            super().many(charge_ids)

    enqueue = CheckingEnqueue()
    report = charging.run_due(now=NOW, enqueue=enqueue, batch_size=3)
    assert enqueue.batches == [3, 3, 1] == seen_committed
    assert enqueue.ids == report.created


def test_a_failed_batch_enqueue_leaves_the_charges_pending_for_the_sweep(clean_db, session_factory, caplog):
    subscriptions(session_factory, 2)

    class BrokerDown(CountingEnqueue):
        def many(self, charge_ids):
            raise ConnectionError("broker unreachable")

    with caplog.at_level(logging.ERROR, logger="billing.charging"):
        report = charging.run_due(now=NOW, enqueue=BrokerDown())
    assert len(report.created) == 2
    assert any("could not enqueue a batch" in r.getMessage() for r in caplog.records)
    with session_factory() as s:
        assert set(s.scalars(select(Charge.status))) == {ChargeStatus.pending}


def test_the_products_enqueue_sends_a_batch_as_one_message_fanned_out_per_charge(redis_client):
    from workers import tasks

    tasks.enqueue_charge.many((11, 12, 13))
    [message] = redis_client.lrange("billing", 0, -1)
    assert json.loads(message)["headers"]["task"] == "workers.tasks.charge_attempts"
    redis_client.delete("billing")

    tasks.charge_attempts.run([11, 12, 13])  # what a worker does with that message
    sent = [json.loads(m)["headers"] for m in reversed(redis_client.lrange("billing", 0, -1))]
    assert [(h["task"], h["argsrepr"]) for h in sent] == [("workers.tasks.charge_attempt", f"({n},)")
                                                          for n in (11, 12, 13)]


@pytest.fixture(autouse=True)
def _quiet_sqlalchemy():
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
