"""A request Stripe refuses is not a card decline (issue 9, part 4), against the real sandbox.

A subscription of EUR 0.01 (below Stripe's minimum charge amount, which the sandbox enforces as Stripe
does: docs.stripe.com, "Minimum and maximum charge amounts") and a customer deleted at Stripe
(``resource_missing``) are charged through the real charging path. Each charge must be held for staff
(``needs_review``): an ERROR line and a metric, no email and no reminder, no automatic retry, no next
period; the recovery page answers a clear 4xx page; the reconciler leaves it alone; staff retry it
after fixing the cause, or void it.

The API refuses such amounts at the edge, so these rows are written with the factories (the state a
merchant is in whose rows predate that check, or whose customer was deleted at Stripe since).
"""

from __future__ import annotations

import html
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
import stripe
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from billing import charging, finance, reconciler, recovery
from billing import queue as queue_mod
from billing.db import unit_of_work
from billing.models import Attempt, AuditEntry, Charge, ChargeStatus, Customer, Notification, Subscription
from tests import factories
from tests.finance import support
from tests.integration.billing_helpers import enqueue, enrol
from tests.integration.conftest import _reset_process_caches, wait_until
from tests.integration.test_cli import run_billing

pytestmark = pytest.mark.usefixtures("clean_db")

SECRET_MARKERS = ("sk_test_", "_secret_", "whsec_")


# --- helpers -------------------------------------------------------------------------------------------

class InlineJobs:
    """A staff action's follow-up work, run at once in this process (Celery's task does the same call)."""

    def __init__(self):
        self.results: list[str] = []

    def retry_charge(self, charge_id: int) -> None:
        self.results.append(charging.process_charge(charge_id, manual=True))

    def relay_outbox(self) -> None:
        self.results.append("relay")


def refused_total(code: str) -> float:
    return REGISTRY.get_sample_value("billing_charge_refused_total", {"code": code}) or 0.0


def charge_row(session_factory, charge_id: int) -> Charge:
    with session_factory() as s:
        return s.get(Charge, charge_id)


def sub_row(session_factory, sub_id: int) -> Subscription:
    with session_factory() as s:
        return s.get(Subscription, sub_id)


def notification_count(session_factory) -> int:
    with session_factory() as s:
        return s.scalar(select(func.count()).select_from(Notification))


def recover_token(charge_id: int) -> str:
    """A recovery link to the charge, as one sent for an earlier failure of it would be."""
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, uow.session.get(Charge, charge_id).subscription_id)
        token = recovery.issue_token(uow.session, customer_id=sub.customer_id, purpose="recover", charge_id=charge_id)
        uow.commit()
    return token


def delete_stripe_customer(sandbox, sub_id: int, session_factory) -> None:
    with session_factory() as s:
        cus = s.get(Customer, s.get(Subscription, sub_id).customer_id).stripe_customer_id
    client = stripe.StripeClient(sandbox.api_key, base_addresses={"api": sandbox.url}, max_network_retries=0)
    client.v1.customers.delete(cus)


def first_charge() -> int:
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    return charge_id


@pytest.fixture
def pages(monkeypatch, app_env, sandbox):
    """The web app with the customer pages configured (a publishable key, the sandbox's Stripe.js)."""
    monkeypatch.setenv("BILLING_STRIPE_PUBLISHABLE_KEY", "pk_test_needs_review")
    monkeypatch.setenv("BILLING_STRIPE_JS_URL", f"{sandbox.url}/js/v3/stripe.js")
    _reset_process_caches()
    from billing.web.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client
    monkeypatch.undo()
    _reset_process_caches()


def assert_cannot_pay_page(client: TestClient, token: str) -> None:
    page = client.get(f"/recover/{token}")
    assert page.status_code == 409, page.text
    assert "text/html" in page.headers["content-type"]
    text = html.unescape(page.text)
    assert "can't be completed online" in text and "contact you" in text
    assert "client_secret" not in page.text and "_secret_" not in page.text
    done = client.post(f"/recover/{token}/complete", json={})
    assert 400 <= done.status_code < 500, done.text


# --- the scenario of the issue: EUR 0.01 --------------------------------------------------------------

def test_amount_below_stripes_minimum_is_held_for_staff_not_declined(app_env, sandbox, session_factory, caplog,
                                                                      pages):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", amount=1, currency="eur")
    charge_id = first_charge()
    before = refused_total("amount_too_small")

    with caplog.at_level(logging.INFO):
        assert charging.process_charge(charge_id) == ChargeStatus.needs_review

    charge = charge_row(session_factory, charge_id)
    assert (charge.status, charge.last_error_code, charge.last_decline_code) == (
        "needs_review", "amount_too_small", None)
    assert charge.next_retry_at is None and charge.payment_intent_id is None
    with session_factory() as s:
        attempt = s.scalars(select(Attempt).where(Attempt.charge_id == charge_id)).one()
    assert (attempt.outcome, attempt.error_code) == ("refused", "amount_too_small")
    # Not a "your bank declined" email, and no reminders: no outbox row at all.
    assert notification_count(session_factory) == 0
    # One ERROR line that names the charge, the attempt and Stripe's code, and nothing secret.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and getattr(r, "charge_id", None) == charge_id]
    assert len(errors) == 1
    assert (errors[0].attempt_id, errors[0].error_code) == (attempt.id, "amount_too_small")
    assert not any(m in caplog.text for m in SECRET_MARKERS)
    assert refused_total("amount_too_small") == before + 1
    # An open failure: past_due, and the billing run opens no next period over it, however late.
    assert sub_row(session_factory, sub_id).status == "past_due"
    assert charging.run_due(now=datetime.now(UTC) + timedelta(days=90), enqueue=lambda _id: None).created == []
    # Nothing retries it: not the dunning schedule, not the reconciler, not a give-up weeks later.
    later = datetime.now(UTC) + timedelta(days=30)
    assert charging.retry_due(now=later, enqueue=lambda _id: None) == []
    report = reconciler.sweep(now=later, enqueue=lambda _id: None)
    assert charge_id not in report.requeued + report.settled + report.given_up
    assert charging.process_charge(charge_id) == "skipped:needs_review"
    assert charge_row(session_factory, charge_id).status == "needs_review"
    assert len(sandbox.control.ledger()) == 0 and notification_count(session_factory) == 0
    # A recovery link (one sent for an earlier failure of this charge) answers a clear page, never a 500.
    assert_cannot_pay_page(pages, recover_token(charge_id))


def test_staff_retry_after_fixing_the_amount_collects_it_once(app_env, sandbox, session_factory):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", amount=1, currency="eur")
    charge_id = first_charge()
    assert charging.process_charge(charge_id) == "needs_review"
    jobs = InlineJobs()
    # Retried unchanged, Stripe refuses again: still held, still no email.
    finance.perform("retry_now", charge_id, actor="olga@example.com", reason="try once more", jobs=jobs)
    assert jobs.results == ["needs_review"]
    assert notification_count(session_factory) == 0
    # Staff correct the price (the merchant meant EUR 25.00), then retry: paid once, subscription active.
    with session_factory() as s:
        s.get(Charge, charge_id).amount = 2500
        s.get(Subscription, sub_id).amount = 2500
        s.commit()
    finance.perform("retry_now", charge_id, actor="olga@example.com", reason="price corrected to 25.00", jobs=jobs)
    assert jobs.results == ["needs_review", "paid"]
    assert charge_row(session_factory, charge_id).status == "paid"
    assert sub_row(session_factory, sub_id).status == "active"
    ledger = sandbox.control.ledger()
    assert [(e["amount"], e["metadata"]["charge_id"]) for e in ledger] == [(2500, str(charge_id))]
    assert notification_count(session_factory) == 0
    with session_factory() as s:
        assert s.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all() == ["retry_now", "retry_now"]


# --- a customer deleted at Stripe -----------------------------------------------------------------------

def test_deleted_customer_is_held_and_staff_void_it(app_env, sandbox, session_factory, pages):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", amount=2500, currency="eur")
    delete_stripe_customer(sandbox, sub_id, session_factory)
    charge_id = first_charge()
    before = refused_total("resource_missing")
    assert charging.process_charge(charge_id) == "needs_review"
    charge = charge_row(session_factory, charge_id)
    assert (charge.status, charge.last_error_code) == ("needs_review", "resource_missing")
    assert refused_total("resource_missing") == before + 1
    assert notification_count(session_factory) == 0
    assert_cannot_pay_page(pages, recover_token(charge_id))

    jobs = InlineJobs()
    with unit_of_work() as uow:
        offered = finance.available_actions(uow.session.get(Charge, charge_id),
                                            uow.session.get(Subscription, sub_id))
    assert offered[finance.Action.retry_now] is None and offered[finance.Action.void] is None
    # It is never retried automatically and the customer was never emailed: nothing to pause or resend.
    for action in ("pause_retries", "resume_retries", "resend_recovery_email"):
        assert offered[finance.Action(action)] is not None
        with pytest.raises(finance.ActionRefused):
            finance.perform(action, charge_id, actor="olga@example.com", reason="r", jobs=jobs)
    finance.perform("void", charge_id, actor="olga@example.com", reason="customer left; deleted at Stripe",
                    jobs=jobs)
    assert charge_row(session_factory, charge_id).status == "void"
    assert jobs.results == [] and notification_count(session_factory) == 0
    assert len(sandbox.control.ledger()) == 0
    with session_factory() as s:
        assert s.scalars(select(AuditEntry.action)).all() == ["void"]


# --- a legacy row the page cannot act on -----------------------------------------------------------------

def test_recovery_page_for_a_charge_stripe_will_not_take_is_a_clear_page(app_env, sandbox, session_factory,
                                                                         pages):
    """A charge failed before refusals were held (``requires_payment_method``, no PaymentIntent) for an
    amount Stripe refuses: the page's own PaymentIntent is refused too. A clear 409 page, not a 500."""
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", amount=1, currency="eur")
    with session_factory() as s:
        charge = factories.make_charge(s, s.get(Subscription, sub_id), status="requires_payment_method",
                                       last_error_code="amount_too_small", attempts=1,
                                       first_failed_at=datetime.now(UTC) - timedelta(days=1))
        s.commit()
        charge_id = charge.id
    assert_cannot_pay_page(pages, recover_token(charge_id))
    assert charge_row(session_factory, charge_id).status == "requires_payment_method"
    assert charge_row(session_factory, charge_id).payment_intent_id is None


# --- the queue: console, CLI --------------------------------------------------------------------------

def test_needs_review_is_in_the_queue_console_and_cli(app_env, sandbox, session_factory, database_url, base_env):
    held_sub = enrol(session_factory, sandbox, "pm_card_visa", amount=1, currency="eur", email="held@example.com")
    declined_sub = enrol(session_factory, sandbox, "pm_card_chargeCustomerFail", email="declined@example.com")
    ids = charging.run_due(enqueue=lambda _id: None).created
    results = {charging.process_charge(cid) for cid in ids}
    assert results == {"needs_review", "requires_payment_method"}
    with session_factory() as s:
        held = s.scalars(select(Charge.id).where(Charge.subscription_id == held_sub)).one()
        assert s.scalars(select(Charge.status).where(Charge.subscription_id == declined_sub)).one() \
            == "requires_payment_method"

    with unit_of_work() as uow:
        rows = queue_mod.unpaid_charges(uow.session, flt=queue_mod.QueueFilter.parse(status="needs_review"))
        everything = queue_mod.unpaid_charges(uow.session)
    assert [r.charge_id for r in rows] == [held]
    assert "minimum" in rows[0].explanation and "bank" not in rows[0].explanation
    assert {r.status for r in everything} == {"needs_review", "requires_payment_method"}

    support.truncate_staff(database_url)
    support.add_accounts()
    app = FastAPI()
    app.mount("/finance", finance_app())
    with TestClient(app) as console:
        support.login(console, support.VIEWER)
        page = console.get("/finance/queue", params={"status": "needs_review"})
        assert page.status_code == 200
        assert "held@example.com" in page.text and "declined@example.com" not in page.text
        assert '<option value="needs_review" selected' in page.text
        detail = console.get(f"/finance/charges/{held}")
        assert detail.status_code == 200 and "minimum" in detail.text

    cli = run_billing("queue", "--json", "--status", "needs_review", env=base_env)
    assert cli.returncode == 0, cli.stderr
    assert [(r["charge_id"], r["status"]) for r in json.loads(cli.stdout)] == [(held, "needs_review")]


def finance_app():
    from billing.web.finance import create_finance_app

    return create_finance_app(InlineJobs())


# --- through a real worker ---------------------------------------------------------------------------------

def test_a_real_worker_holds_the_refused_charge_and_logs_it(app_env, sandbox, session_factory, worker):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", amount=1, currency="eur")
    charge_id = first_charge()
    enqueue(charge_id)
    wait_until(lambda: charge_row(session_factory, charge_id).status not in charging.IN_FLIGHT, 60,
               message="the worker to decide the charge")
    assert charge_row(session_factory, charge_id).status == "needs_review"
    assert sub_row(session_factory, sub_id).status == "past_due"
    assert notification_count(session_factory) == 0
    log_line = wait_until(lambda: next((line for line in worker.log().splitlines()
                                        if "held for staff review" in line), None), 20,
                          message="the worker's ERROR line")
    assert "ERROR" in log_line and "amount_too_small" in log_line and str(charge_id) in log_line
    assert not any(m in worker.log() for m in SECRET_MARKERS)
