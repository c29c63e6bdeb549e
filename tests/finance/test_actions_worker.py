"""The console's actions through the whole system: HTTP → database → Celery (Redis) → a real
``billing worker`` → the Stripe sandbox and SMTP. One worker thread, so tasks run in the order sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from billing import charging, notifications
from billing.db import unit_of_work
from billing.models import Attempt, AuditEntry, Charge, PaymentMethod, Subscription
from billing.web.app import create_app
from tests.finance import support
from tests.integration.conftest import wait_until
from tests.integration.test_billing_e2e import enrol


def enqueue_charge(charge_id: int) -> None:
    # Imported late: Celery reads its broker from the settings of the test's environment.
    from workers.tasks import enqueue_charge as enqueue

    enqueue(charge_id)


def _charge(sub_id: int) -> Charge:
    with unit_of_work() as uow:
        return uow.session.scalars(select(Charge).where(Charge.subscription_id == sub_id)).one()


def _attempts(charge_id: int) -> int:
    with unit_of_work() as uow:
        return len(uow.session.scalars(select(Attempt.id).where(Attempt.charge_id == charge_id)).all())


def _pm(sub_id: int) -> str:
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, sub_id)
        return uow.session.get(PaymentMethod, sub.payment_method_id).stripe_payment_method_id


@pytest.mark.timeout(240)
def test_actions_through_a_real_worker(app_env, accounts, session_factory, sandbox, smtp_server, worker_factory):
    worker_factory(concurrency=1)
    ada = enrol(session_factory, sandbox, "pm_card_visa", email="ada@example.com", declines_later="insufficient_funds")
    bob = enrol(session_factory, sandbox, "pm_card_mastercard", email="bob@example.com",
                declines_later="insufficient_funds")
    charging.run_due(enqueue=enqueue_charge)
    wait_until(lambda: all(_charge(s).status == "requires_payment_method" for s in (ada, bob)), 60,
               message="both first attempts declined")
    a, b = _charge(ada).id, _charge(bob).id
    assert notifications.relay_due().sent == 2
    smtp_server.wait_for(2)
    client = TestClient(create_app())
    assert support.login(client).status_code == 303

    # Resend: a second email to Ada, with a fresh recovery link, sent by the worker's relay.
    assert support.act(client, a, "resend_recovery_email", "customer lost the first email").status_code == 303
    mails = smtp_server.wait_for(3, timeout=60)
    to_ada = smtp_server.to("ada@example.com")
    assert len(to_ada) == 2 and mails[-1] is to_ada[-1]
    assert "http://billing.test/recover/" in to_ada[-1].get_body(("plain",)).get_content()

    # Pause Ada: the scheduled retry sweep (run by the worker) retries Bob and passes Ada by.
    assert support.act(client, a, "pause_retries", "customer says the salary lands on Friday").status_code == 303
    with unit_of_work() as uow:
        uow.session.execute(update(Charge).where(Charge.id.in_([a, b]))
                            .values(next_retry_at=datetime.now(UTC) - timedelta(minutes=1)))
        uow.commit()
    from workers.tasks import retry_due_charges

    retry_due_charges.delay()
    wait_until(lambda: _attempts(b) == 2 and _charge(bob).status == "requires_payment_method", 60,
               message="Bob's scheduled retry")
    assert _attempts(a) == 1

    # Cancel Bob's subscription: the next automatic attempt the worker gets leaves the schedule instead.
    assert support.act(client, b, "cancel_subscription", "customer asked to stop").status_code == 303
    with unit_of_work() as uow:
        uow.session.execute(update(Charge).where(Charge.id == b)
                            .values(next_retry_at=datetime.now(UTC) - timedelta(minutes=1)))
        uow.commit()
    enqueue_charge(b)
    wait_until(lambda: _charge(bob).next_retry_at is None, 60, message="Bob's charge leaving the schedule")
    assert _attempts(b) == 2

    # Void Bob's charge; a stale message for it, delivered after, changes nothing.
    assert support.act(client, b, "void", "written off after the cancellation").status_code == 303
    enqueue_charge(b)

    # Retry Ada now (paused or not: staff decide), with her card working again: paid, on attempt 2.
    sandbox.control.decline_later(_pm(ada), None)
    assert support.act(client, a, "retry_now", "customer topped up the account").status_code == 303
    wait_until(lambda: _charge(ada).status == "paid", 60, message="Ada's manual retry")
    assert _attempts(a) == 2
    bob_charge = _charge(bob)
    assert (bob_charge.status, _attempts(b)) == ("void", 2)
    assert "paid" in client.get(f"/finance/charges/{a}").text

    with unit_of_work() as uow:
        audit = [(e.charge_id, e.action) for e in uow.session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert audit == [(a, "resend_recovery_email"), (a, "pause_retries"), (b, "cancel_subscription"), (b, "void"),
                     (a, "retry_now")]
