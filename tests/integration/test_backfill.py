"""The event backfill (billing.backfill) against the sandbox: a webhook Stripe never managed to deliver
is read back from the event list and applied through the same inbox, exactly once however often the
backfill runs."""

from __future__ import annotations

import uuid

import pytest
import stripe
from sqlalchemy import func, select

from billing import backfill, charging, webhooks
from billing.db import unit_of_work
from billing.models import Charge, ChargeStatus, Notification, Subscription, WebhookEvent
from billing.stripe_gateway import get_gateway
from tests import factories
from tests.integration.billing_helpers import enrol
from tests.integration.conftest import wait_until
from tests.integration.test_webhooks import AppServer, build_app, inline_enqueue
from tests.stripe_events import SECRET
from workers.celery_app import BACKFILL_EVENTS_INTERVAL, beat_schedule


@pytest.fixture
def delivered(app_env, sandbox, clean_db):
    """The product's webhook endpoint on a real server, registered with the sandbox, processing inline
    with the real gateway; yields the processing results."""
    from billing.web.webhooks import get_webhook_enqueue, get_webhook_secret

    results: list[str] = []
    app = build_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: inline_enqueue(None, results)
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with AppServer(app) as server:
        sandbox.control.add_webhook_endpoint(f"{server.url}/webhooks/stripe", SECRET)
        yield results


def declined_charge(session_factory, sandbox) -> tuple[int, str]:
    """A charge whose off-session attempt was declined: requires_payment_method, with its PaymentIntent."""
    sub_id = enrol(session_factory, sandbox, "pm_card_chargeCustomerFail",
                   email=f"backfill-{uuid.uuid4().hex[:8]}@example.com")
    with unit_of_work() as uow:
        charge_id = factories.make_charge(uow.session, uow.session.get(Subscription, sub_id)).id
        uow.commit()
    assert charging.process_charge(charge_id) == ChargeStatus.requires_payment_method
    with unit_of_work() as uow:
        return charge_id, uow.session.get(Charge, charge_id).payment_intent_id


def rows_for(event_id: str) -> list[WebhookEvent]:
    with unit_of_work() as uow:
        return list(uow.session.scalars(select(WebhookEvent).where(WebhookEvent.stripe_event_id == event_id)))


def charge_state(charge_id: int) -> tuple[str, int]:
    with unit_of_work() as uow:
        notes = uow.session.scalar(select(func.count()).select_from(Notification)
                                   .where(Notification.charge_id == charge_id))
        return uow.session.get(Charge, charge_id).status, notes


def inline(results: list[str]):
    return inline_enqueue(None, results)


def test_a_dropped_success_webhook_is_backfilled_and_applied_once(delivered, session_factory, sandbox):
    charge_id, pi_id = declined_charge(session_factory, sandbox)
    # The customer pays on the recovery page; Stripe's payment_intent.succeeded never reaches us.
    sandbox.control.add_fault("drop", event_type="payment_intent.succeeded", count=1)
    gw = get_gateway()
    client = stripe.StripeClient(sandbox.api_key, base_addresses={"api": sandbox.url})
    client.v1.payment_intents.confirm(pi_id, params={"payment_method": "pm_card_visa"})
    wait_until(lambda: any(d["type"] == "charge.succeeded" and d["delivered"]
                           for d in sandbox.control.webhook_deliveries()), message="the other deliveries")
    [lost] = [e for e in client.v1.events.list(params={"delivery_success": False, "limit": 100}).data]
    assert lost.type == "payment_intent.succeeded" and lost.data.object.id == pi_id
    assert rows_for(lost.id) == []
    assert charge_state(charge_id)[0] == ChargeStatus.requires_payment_method

    results: list[str] = []
    report = backfill.run(enqueue=inline(results), gateway=gw)
    assert report.stored == 1 and report.refused == 0, report
    [row] = rows_for(lost.id)
    assert row.outcome == "applied" and row.processed_at is not None
    status, notes = charge_state(charge_id)
    assert status == ChargeStatus.paid

    # Again (and again): listed every time, stored and applied once.
    for _ in range(2):
        again = backfill.run(enqueue=inline(results), gateway=gw)
        assert again.stored == 0 and again.known >= 1, again
    assert len(rows_for(lost.id)) == 1
    assert charge_state(charge_id) == (status, notes)
    assert results == ["applied"]


def test_only_handled_types_are_stored_and_newer_events_are_read_too(delivered, session_factory, sandbox):
    """Events newer than the newest stored are read whatever Stripe says about their delivery (here a
    delivery the endpoint acknowledged but lost), and types we do not handle are never stored."""
    charge_id, pi_id = declined_charge(session_factory, sandbox)
    wait_until(lambda: any(r in ("applied", "unchanged") for r in delivered), message="a delivered event")
    with unit_of_work() as uow:  # the inbox lost what it had acknowledged about this PaymentIntent
        lost = list(uow.session.scalars(select(WebhookEvent.stripe_event_id).where(
            WebhookEvent.object_id == pi_id, WebhookEvent.type == "payment_intent.payment_failed")))
        uow.session.query(WebhookEvent).filter(WebhookEvent.object_id == pi_id,
                                                WebhookEvent.type == "payment_intent.payment_failed").delete()
        uow.commit()
    assert lost

    with unit_of_work() as uow:
        before = uow.session.scalar(select(func.max(WebhookEvent.id))) or 0
    results: list[str] = []
    report = backfill.run(enqueue=inline(results), gateway=get_gateway())
    assert report.stored >= 1 and report.refused == 0, report
    with unit_of_work() as uow:
        stored = dict(uow.session.execute(select(WebhookEvent.stripe_event_id, WebhookEvent.type)
                                          .where(WebhookEvent.id > before)).all())
    assert lost[0] in stored and len(rows_for(lost[0])) == 1
    # The sandbox also emitted charge.failed, payment_intent.created, customer.created…: never stored by it.
    assert set(stored.values()) <= set(webhooks.HANDLED_TYPES)
    assert charge_state(charge_id)[0] == ChargeStatus.requires_payment_method


def test_beat_runs_the_backfill_every_few_minutes(base_env):
    from billing.settings import get_settings

    entry = beat_schedule(get_settings())["backfill-events"]
    assert entry["task"] == "workers.tasks.backfill_events"
    assert 60 <= entry["schedule"] == BACKFILL_EVENTS_INTERVAL <= 600
