"""``POST /webhooks/stripe`` over HTTP on the real PostgreSQL, with events signed exactly as Stripe
signs them: applied, duplicated (also concurrently), reordered, forged, stale; setup and card events;
and deliveries made by the sandbox itself to a real uvicorn server, processed inline and by a real
Celery worker."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from billing import charging, webhooks
from billing.db import unit_of_work
from billing.dunning import NotificationKind
from billing.models import (
    Attempt,
    AttemptPhase,
    CardSetup,
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    PaymentMethod,
    Subscription,
    WebhookEvent,
)
from billing.outcomes import CardDetails, OutcomeKind, PaymentOutcome
from billing.web.webhooks import get_webhook_enqueue, get_webhook_secret
from tests import factories
from tests.fakes import FakeGateway, declined
from tests.integration.conftest import wait_until
from tests.stripe_events import DECLINE, SECRET, event, payment_intent, signed

FAILURE_KINDS = (NotificationKind.payment_failed.value, NotificationKind.authentication_required.value)


def build_app() -> FastAPI:
    from billing.web.app import create_app

    return create_app()


@dataclass
class Gateway(FakeGateway):
    """The fake gateway, plus the reads webhooks make: PaymentIntents and PaymentMethods by id."""

    cards: dict[str, CardDetails] = field(default_factory=dict)

    def set_intent(self, pi_id: str, outcome: PaymentOutcome) -> None:
        self.intents[pi_id] = {"metadata": {}, "outcome": outcome, "customer": None}

    def retrieve_payment_method(self, payment_method_id: str) -> CardDetails:
        self.calls.append(("retrieve_pm", {"pm": payment_method_id}))
        return self.cards[payment_method_id]

    def reads(self) -> list[str]:
        return [name for name, _ in self.calls if name.startswith("retrieve")]


class Hook:
    """The app with processing run inline; ``results`` holds what each processing returned."""

    def __init__(self, client: TestClient, gateway: Gateway, results: list[str]):
        self.client, self.gateway, self.results = client, gateway, results

    def post(self, evt: dict, *, secret: str = SECRET, timestamp: int | None = None) -> httpx.Response:
        body, headers = signed(evt, secret, timestamp)
        return self.client.post("/webhooks/stripe", content=body, headers=headers)


def inline_enqueue(gateway, results: list[str]):
    def enqueue(row_id: int) -> None:
        try:
            results.append(webhooks.process(row_id, gateway=gateway))
        except webhooks.EventDeferred:
            results.append("deferred")
    return enqueue


@pytest.fixture
def hook(clean_db):
    gateway, results = Gateway(), []
    app = build_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: inline_enqueue(gateway, results)
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with TestClient(app) as client:
        yield Hook(client, gateway, results)


# --- rows --------------------------------------------------------------------------------------------

def new_pi() -> str:
    return f"pi_wh_{uuid.uuid4().hex[:16]}"


def make_charge(status: str = "processing", *, pi_id: str | None = None, attempts: int = 1,
                attempt_outcome: str = "processing", finished_ago: timedelta = timedelta(hours=1),
                first_failed: bool = False) -> int:
    """A charge whose ``attempts`` attempts are finished, the last one ``finished_ago``."""
    now = datetime.now(UTC)
    with unit_of_work() as uow:
        s = uow.session
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer)
        charge = factories.make_charge(s, sub, status=status, payment_intent_id=pi_id, attempts=attempts,
                                       first_failed_at=now - finished_ago if first_failed else None)
        for n in range(1, attempts + 1):
            s.add(Attempt(charge_id=charge.id, number=n, idempotency_key=f"attempt-test-{charge.id}-{n}",
                          phase=AttemptPhase.finished, outcome=attempt_outcome, payment_intent_id=pi_id,
                          started_at=now - finished_ago, finished_at=now - finished_ago))
        uow.commit()
        return charge.id


def pending_charge() -> int:
    with unit_of_work() as uow:
        s = uow.session
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        charge = factories.make_charge(s, factories.make_subscription(s, customer))
        uow.commit()
        return charge.id


def detached(obj):
    """A loaded row that stays readable after its unit of work rolled back."""
    if obj is not None:
        from sqlalchemy.orm import object_session

        object_session(obj).expunge(obj)
    return obj


def charge(charge_id: int) -> Charge:
    with unit_of_work() as uow:
        return detached(uow.session.get(Charge, charge_id))


def failure_emails(charge_id: int) -> list[str]:
    with unit_of_work() as uow:
        return list(uow.session.scalars(select(Notification.dedupe_key).where(
            Notification.charge_id == charge_id, Notification.kind.in_(FAILURE_KINDS))))


def stored(evt: dict) -> WebhookEvent | None:
    with unit_of_work() as uow:
        return detached(uow.session.scalars(select(WebhookEvent)
                                            .where(WebhookEvent.stripe_event_id == evt["id"])).first())


def event_count() -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.count()).select_from(WebhookEvent))


def failed_pi(pi_id: str, **kw) -> dict:
    return payment_intent(pi_id, "requires_payment_method", error=DECLINE, **kw)


# --- applied, duplicated -------------------------------------------------------------------------------

def test_valid_event_is_applied(hook):
    pi = new_pi()
    cid = make_charge(pi_id=pi)
    evt = event("payment_intent.succeeded", payment_intent(pi, "succeeded"))
    resp = hook.post(evt)
    assert resp.status_code == 200
    assert resp.json() == {"received": True, "duplicate": False}
    assert charge(cid).status == ChargeStatus.paid
    row = stored(evt)
    assert row.outcome == "applied" and row.processed_at is not None
    assert row.type == "payment_intent.succeeded" and row.object_id == pi
    assert hook.gateway.reads() == []  # the snapshot was clearly newer than the attempt: no re-read


def test_failure_uses_the_latest_attempt_number_and_is_processed_once(hook):
    pi = new_pi()
    cid = make_charge(pi_id=pi, attempts=2)
    evt = event("payment_intent.payment_failed", failed_pi(pi))
    first = hook.post(evt)
    again = hook.post(evt)
    assert first.json() == {"received": True, "duplicate": False}
    assert again.status_code == 200 and again.json() == {"received": True, "duplicate": True}
    assert hook.results == ["applied"]  # the duplicate was acknowledged, not processed
    assert charge(cid).status == ChargeStatus.requires_payment_method
    assert charge(cid).last_decline_code == "insufficient_funds"
    assert failure_emails(cid) == [f"charge-{cid}:attempt-2:payment_failed"]
    assert event_count() == 1


def test_metadata_finds_a_charge_whose_payment_intent_id_never_reached_us(hook):
    cid = make_charge(pi_id=None)
    # Our charge id in metadata proves nothing (another installation on the account numbers its charges
    # alike): not applied, recorded as foreign.
    claim = event("payment_intent.succeeded", payment_intent(new_pi(), "succeeded", charge_id=cid))
    hook.post(claim)
    assert stored(claim).outcome == "foreign"
    assert charge(cid).status == ChargeStatus.processing and charge(cid).payment_intent_id is None
    # The attempt's own PaymentIntent: our installation, customer, amount, currency and attempt key.
    pi = new_pi()
    hook.post(event("payment_intent.succeeded", ours(payment_intent(pi, "succeeded", charge_id=cid), cid)))
    assert charge(cid).status == ChargeStatus.paid
    assert charge(cid).payment_intent_id == pi


def ours(pi: dict, charge_id: int) -> dict:
    """``pi`` as this installation's attempt at ``charge_id`` made it (what billing.ownership checks)."""
    from billing.installation import installation_id

    with unit_of_work() as uow:
        s = uow.session
        attempt = s.scalars(select(Attempt).where(Attempt.charge_id == charge_id)
                            .order_by(Attempt.number.desc())).first()
        customer = s.scalar(select(Customer.stripe_customer_id).join(Subscription).join(Charge)
                            .where(Charge.id == charge_id))
        pi["customer"] = customer
        pi["metadata"].update(installation=installation_id(), attempt_id=str(attempt.id),
                              attempt_key=attempt.idempotency_key)
    return pi


def test_payment_intent_that_is_not_ours_is_stored_and_left(hook):
    evt = event("payment_intent.succeeded", payment_intent(new_pi(), "succeeded", charge_id=999999))
    assert hook.post(evt).status_code == 200
    assert stored(evt).outcome == "unknown_object"


class AppServer:
    """The app on a real uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app: FastAPI):
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> AppServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=15, message="the app server")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def test_concurrent_duplicate_deliveries_are_processed_once(clean_db):
    pi = new_pi()
    cid = make_charge(pi_id=pi)
    gateway, results = Gateway(), []
    app = build_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: inline_enqueue(gateway, results)
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    body, headers = signed(event("payment_intent.payment_failed", failed_pi(pi)))
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def deliver():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            answers.append(client.post("/webhooks/stripe", content=body, headers=headers))

    with AppServer(app) as server:
        threads = [threading.Thread(target=deliver) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["duplicate"] for a in answers) == [False] + [True] * 7
    assert results.count("applied") == 1
    assert set(results) <= {"applied", "already_processed"}
    assert event_count() == 1
    assert failure_emails(cid) == [f"charge-{cid}:attempt-1:payment_failed"]


# --- ordering ------------------------------------------------------------------------------------------

def test_succeeded_then_an_older_failure_stays_paid(hook):
    pi, now = new_pi(), int(time.time())
    cid = make_charge(pi_id=pi)
    hook.post(event("payment_intent.succeeded", payment_intent(pi, "succeeded"), created=now))
    late = event("payment_intent.payment_failed", failed_pi(pi), created=now - 5)
    hook.post(late)
    assert charge(cid).status == ChargeStatus.paid
    assert stored(late).outcome == "ignored"
    assert failure_emails(cid) == []


def test_failed_then_succeeded_ends_paid(hook):
    pi, now = new_pi(), int(time.time())
    cid = make_charge(pi_id=pi)
    hook.post(event("payment_intent.payment_failed", failed_pi(pi), created=now - 5))
    assert charge(cid).status == ChargeStatus.requires_payment_method
    hook.post(event("payment_intent.succeeded", payment_intent(pi, "succeeded"), created=now))
    assert charge(cid).status == ChargeStatus.paid
    assert len(failure_emails(cid)) == 1


def test_an_older_event_never_moves_a_charge_backwards(hook):
    # The customer is paying on the recovery page (processing); a failure from before arrives late.
    pi, now = new_pi(), int(time.time())
    cid = make_charge("authentication_required", pi_id=pi, attempt_outcome="authentication_required",
                      first_failed=True)
    newer = event("payment_intent.processing", payment_intent(pi, "processing"), created=now)
    older = event("payment_intent.payment_failed", failed_pi(pi), created=now - 30)
    hook.post(newer)
    hook.post(older)
    assert stored(newer).outcome == "applied"
    assert stored(older).outcome == "stale"
    assert charge(cid).status == ChargeStatus.processing


def test_events_of_the_same_second_are_settled_by_asking_stripe(hook):
    pi, now = new_pi(), int(time.time())
    cid = make_charge("authentication_required", pi_id=pi, attempt_outcome="authentication_required",
                      first_failed=True)
    hook.gateway.set_intent(pi, PaymentOutcome(kind=OutcomeKind.succeeded, payment_intent_id=pi))
    hook.post(event("payment_intent.processing", payment_intent(pi, "processing"), created=now))
    tie = event("payment_intent.payment_failed", failed_pi(pi), created=now)
    hook.post(tie)
    assert hook.gateway.reads() == ["retrieve"]
    assert stored(tie).outcome == "applied"
    assert charge(cid).status == ChargeStatus.paid  # Stripe's current state, not the snapshot


# --- webhook and charge task: one email whichever comes first ------------------------------------------

def test_task_first_then_webhook_sends_one_email(hook):
    cid = pending_charge()
    hook.gateway.script = lambda pm: declined("insufficient_funds")
    assert charging.process_charge(cid, gateway=hook.gateway) == ChargeStatus.requires_payment_method
    pi = charge(cid).payment_intent_id
    evt = event("payment_intent.payment_failed", failed_pi(pi))
    hook.post(evt)
    assert stored(evt).outcome == "unchanged"
    assert failure_emails(cid) == [f"charge-{cid}:attempt-1:payment_failed"]


def test_webhook_during_the_attempt_is_left_to_it_and_sends_one_email(hook):
    cid = pending_charge()
    hook.gateway.script = lambda pm: declined("insufficient_funds")
    # The attempt has called Stripe (whose event is already here) but not recorded the answer yet.
    evt = event("payment_intent.payment_failed", failed_pi("pi_fake_1", charge_id=cid))
    with charging.lease(cid) as ours:
        assert ours
        assert hook.post(evt).json() == {"received": True, "duplicate": False}
    assert hook.results == ["deferred"]
    assert stored(evt).processed_at is None
    assert failure_emails(cid) == []

    assert charging.process_charge(cid, gateway=hook.gateway) == ChargeStatus.requires_payment_method
    assert charge(cid).payment_intent_id == "pi_fake_1"
    row_id = stored(evt).id
    assert webhooks.process(row_id, gateway=hook.gateway) == "unchanged"  # the task's retry
    assert failure_emails(cid) == [f"charge-{cid}:attempt-1:payment_failed"]
    assert hook.post(evt).json() == {"received": True, "duplicate": True}
    assert failure_emails(cid) == [f"charge-{cid}:attempt-1:payment_failed"]


def test_unfinished_attempt_defers_the_event(hook):
    pi = new_pi()
    cid = make_charge(pi_id=pi)
    with unit_of_work() as uow:
        uow.session.add(Attempt(charge_id=cid, number=2, idempotency_key=f"attempt-test-{cid}-2",
                                phase=AttemptPhase.started))
        uow.commit()
    evt = event("payment_intent.succeeded", payment_intent(pi, "succeeded"))
    hook.post(evt)
    assert hook.results == ["deferred"]
    assert charge(cid).status == ChargeStatus.processing


# --- refused deliveries --------------------------------------------------------------------------------

def assert_refused(resp: httpx.Response, code: str, status: int = 400) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert event_count() == 0


def test_wrong_secret_is_refused(hook):
    evt = event("payment_intent.succeeded", payment_intent(new_pi(), "succeeded"))
    assert_refused(hook.post(evt, secret="whsec_someone_else"), "bad_signature")
    assert hook.results == []


def test_forged_body_is_refused(hook):
    pi = new_pi()
    cid = make_charge(pi_id=pi)
    body, headers = signed(event("payment_intent.payment_failed", failed_pi(pi)))
    forged = body.replace(b"requires_payment_method", b"succeeded").replace(b"payment_failed", b"succeeded")
    assert_refused(hook.client.post("/webhooks/stripe", content=forged, headers=headers), "bad_signature")
    headers["Stripe-Signature"] = headers["Stripe-Signature"].split(",v1=")[0] + ",v1=" + "0" * 64
    assert_refused(hook.client.post("/webhooks/stripe", content=body, headers=headers), "bad_signature")
    assert charge(cid).status == ChargeStatus.processing


def test_stale_and_future_timestamps_are_refused(hook):
    evt = event("payment_intent.succeeded", payment_intent(new_pi(), "succeeded"))
    now = int(time.time())
    assert_refused(hook.post(evt, timestamp=now - 301), "timestamp_too_old")
    assert_refused(hook.post(evt, timestamp=now - 86400 * 3), "timestamp_too_old")
    assert_refused(hook.post(evt, timestamp=now + 400), "timestamp_in_future")


@pytest.mark.parametrize("header", ["t=notanumber,v1=abc", "v1=abc", "t=1700000000", "nonsense", "t=1,,v1=a"])
def test_malformed_signature_header_is_refused(hook, header):
    body, _ = signed(event("customer.created", {"id": "cus_x", "object": "customer"}))
    resp = hook.client.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": header})
    assert_refused(resp, "malformed_signature")


def test_missing_signature_header_is_refused(hook):
    body, _ = signed(event("customer.created", {"id": "cus_x", "object": "customer"}))
    assert_refused(hook.client.post("/webhooks/stripe", content=body), "missing_signature")


def test_non_json_and_non_event_bodies_are_refused(hook):
    from tests.stripe_events import signature

    for raw, code in ((b"this is not json", "invalid_json"), (b"\xff\xfe", "invalid_json"),
                      (json.dumps({"id": "evt_1", "created": 1, "data": {"object": {}}}).encode(), "invalid_event"),
                      (json.dumps({"type": "x", "created": 1, "data": {"object": {}}}).encode(), "invalid_event")):
        resp = hook.client.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": signature(raw)})
        assert_refused(resp, code)


def test_oversized_body_is_refused(hook):
    evt = event("customer.created", {"id": "cus_x", "object": "customer", "blob": "x" * (1024 * 1024)})
    assert_refused(hook.post(evt), "payload_too_large", status=413)


def test_no_secret_configured_is_503_and_logged(hook, caplog):
    hook.client.app.dependency_overrides[get_webhook_secret] = lambda: None
    with caplog.at_level(logging.ERROR):
        resp = hook.post(event("customer.created", {"id": "cus_x", "object": "customer"}))
    assert_refused(resp, "webhook_secret_not_configured", status=503)
    assert "BILLING_STRIPE_WEBHOOK_SECRET" in caplog.text


def test_unknown_type_is_stored_and_ignored(hook):
    evt = event("customer.created", {"id": "cus_unknown", "object": "customer", "email": "x@example.com"})
    assert hook.post(evt).json() == {"received": True, "duplicate": False}
    row = stored(evt)
    assert row.outcome == "unknown_type" and row.processed_at is not None
    assert row.payload["data"]["object"]["id"] == "cus_unknown"


# --- cards -----------------------------------------------------------------------------------------------

def make_customer_with_setup(setup_intent_id: str) -> tuple[int, str]:
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session)
        uow.session.add(CardSetup(customer_id=customer.id, setup_intent_id=setup_intent_id, status="requires_action"))
        uow.commit()
        return customer.id, customer.stripe_customer_id


def setup_intent(si_id: str, status: str, customer: str, pm: str | None = None, mandate: str | None = None,
                 error: dict | None = None) -> dict:
    return {"id": si_id, "object": "setup_intent", "status": status, "customer": customer, "payment_method": pm,
            "mandate": mandate, "usage": "off_session", "client_secret": f"{si_id}_secret_DO_NOT_LOG",
            "last_setup_error": error}


def card(pm_id: str, customer: str, fingerprint: str = "fpWebhook0001") -> CardDetails:
    return CardDetails(payment_method_id=pm_id, customer_id=customer, brand="visa", last4="4242", exp_month=12,
                       exp_year=2031, country="FR", fingerprint=fingerprint)


def cards_of(customer_id: int) -> list[PaymentMethod]:
    with unit_of_work() as uow:
        rows = list(uow.session.scalars(select(PaymentMethod).where(PaymentMethod.customer_id == customer_id)))
        uow.session.expunge_all()
        return rows


def setup_row(si_id: str) -> CardSetup:
    with unit_of_work() as uow:
        return detached(uow.session.scalars(select(CardSetup).where(CardSetup.setup_intent_id == si_id)).one())


def test_setup_intent_succeeded_saves_the_card_once(hook):
    customer_id, cus = make_customer_with_setup("seti_wh_1")
    hook.gateway.cards["pm_wh_1"] = card("pm_wh_1", cus)
    now = int(time.time())
    evt = event("setup_intent.succeeded", setup_intent("seti_wh_1", "succeeded", cus, "pm_wh_1", "mandate_1"),
                created=now)
    assert hook.post(evt).json()["duplicate"] is False
    assert hook.post(evt).json()["duplicate"] is True
    [pm] = cards_of(customer_id)
    assert (pm.stripe_payment_method_id, pm.mandate_id, pm.last4) == ("pm_wh_1", "mandate_1", "4242")
    setup = setup_row("seti_wh_1")
    assert setup.status == "succeeded" and setup.payment_method_id == pm.id
    with unit_of_work() as uow:
        assert uow.session.get(Customer, customer_id).default_payment_method_id == pm.id

    # An older requires_action arriving late does not undo it.
    late = event("setup_intent.requires_action", setup_intent("seti_wh_1", "requires_action", cus), created=now - 20)
    hook.post(late)
    assert stored(late).outcome == "stale" and setup_row("seti_wh_1").status == "succeeded"

    # The same card (same fingerprint) saved again through a second SetupIntent: still one row.
    with unit_of_work() as uow:
        uow.session.add(CardSetup(customer_id=customer_id, setup_intent_id="seti_wh_2", status="requires_action"))
        uow.commit()
    hook.gateway.cards["pm_wh_2"] = card("pm_wh_2", cus)
    hook.post(event("setup_intent.succeeded", setup_intent("seti_wh_2", "succeeded", cus, "pm_wh_2", "mandate_2")))
    [pm2] = cards_of(customer_id)
    assert pm2.id == pm.id and pm2.stripe_payment_method_id == "pm_wh_2" and pm2.mandate_id == "mandate_2"
    assert setup_row("seti_wh_2").payment_method_id == pm.id


def test_setup_failure_is_recorded_and_secrets_stay_out_of_logs_and_rows(hook, caplog):
    customer_id, cus = make_customer_with_setup("seti_wh_3")
    err = {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
           "message": "Your card was declined."}
    evt = event("setup_intent.setup_failed", setup_intent("seti_wh_3", "requires_payment_method", cus, error=err))
    with caplog.at_level(logging.DEBUG):
        hook.post(evt)
    setup = setup_row("seti_wh_3")
    assert (setup.status, setup.last_error_code) == ("requires_payment_method", "card_declined")
    assert cards_of(customer_id) == []
    assert "secret_DO_NOT_LOG" not in caplog.text
    assert "secret_DO_NOT_LOG" not in json.dumps(stored(evt).payload)
    assert stored(evt).payload["data"]["object"]["client_secret"] == "[redacted]"


def test_payment_method_detached_leaves_the_next_charge_without_a_card(hook):
    cid = pending_charge()
    with unit_of_work() as uow:
        sub = charge(cid).subscription_id
        from billing.models import Subscription

        pm = uow.session.get(PaymentMethod, uow.session.get(Subscription, sub).payment_method_id)
        pm_id = pm.stripe_payment_method_id
    evt = event("payment_method.detached", {"id": pm_id, "object": "payment_method", "customer": None,
                                            "card": {"brand": "visa", "last4": "4242"}})
    hook.post(evt)
    assert stored(evt).outcome == "applied"
    with unit_of_work() as uow:
        assert uow.session.scalars(select(PaymentMethod).where(
            PaymentMethod.stripe_payment_method_id == pm_id)).one().detached_at is not None
    gateway = FakeGateway()
    assert charging.process_charge(cid, gateway=gateway) == ChargeStatus.requires_payment_method
    assert gateway.created() == 0
    assert charge(cid).last_error_code == "no_payment_method"


def test_automatically_updated_card_and_inactive_mandate(hook):
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session)
        pm = factories.make_payment_method(uow.session, customer, mandate_id="mandate_wh_9")
        pm_row, pm_id = pm.id, pm.stripe_payment_method_id
        uow.commit()
    hook.post(event("payment_method.automatically_updated", {
        "id": pm_id, "object": "payment_method",
        "card": {"brand": "visa", "last4": "1881", "exp_month": 3, "exp_year": 2032, "country": "FR"}}))
    hook.post(event("mandate.updated", {"id": "mandate_wh_9", "object": "mandate", "status": "inactive",
                                        "payment_method": pm_id}))
    with unit_of_work() as uow:
        pm = uow.session.get(PaymentMethod, pm_row)
        assert (pm.last4, pm.exp_month, pm.exp_year, pm.mandate_id) == ("1881", 3, 2032, None)


# --- deliveries made by the sandbox ------------------------------------------------------------------------

def test_sandbox_deliveries_save_the_card_and_settle_a_declined_charge_once(app_env, sandbox):
    from billing.stripe_gateway import get_gateway

    results: list[str] = []
    app = build_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: inline_enqueue(None, results)
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with AppServer(app) as server:
        sandbox.control.add_webhook_endpoint(f"{server.url}/webhooks/stripe", SECRET)
        gw = get_gateway()
        tag = uuid.uuid4().hex[:8]
        cus = gw.create_customer(email=f"wh-{tag}@example.com", name="Webhook", idempotency_key=f"cus-{tag}")
        with unit_of_work() as uow:
            customer = factories.make_customer(uow.session, stripe_customer_id=cus, email=f"wh-{tag}@example.com")
            customer_id = customer.id
            uow.commit()
        si = gw.create_setup_intent(customer_id=cus, payment_method=None, idempotency_key=f"si-{tag}")
        with unit_of_work() as uow:
            uow.session.add(CardSetup(customer_id=customer_id, setup_intent_id=si.setup_intent_id, status=si.status))
            uow.commit()
        gw.confirm_setup_intent(si.setup_intent_id, payment_method="pm_card_chargeCustomerFail",
                                idempotency_key=f"si-{tag}-confirm")
        wait_until(lambda: setup_row(si.setup_intent_id).payment_method_id, message="the card saved by webhook")
        [pm] = cards_of(customer_id)
        assert pm.last4 == "0341" and pm.fingerprint

        with unit_of_work() as uow:
            customer = uow.session.get(Customer, customer_id)
            sub = factories.make_subscription(uow.session, customer)
            cid = factories.make_charge(uow.session, sub).id
            uow.commit()
        assert charging.process_charge(cid) == ChargeStatus.requires_payment_method
        pi = charge(cid).payment_intent_id

        def failure_event_processed():
            with unit_of_work() as uow:
                return uow.session.scalars(select(WebhookEvent.outcome).where(
                    WebhookEvent.object_id == pi, WebhookEvent.type == "payment_intent.payment_failed",
                    WebhookEvent.processed_at.is_not(None))).first()

        assert wait_until(failure_event_processed, message="payment_intent.payment_failed") in ("unchanged",
                                                                                               "applied")
        deliveries = sandbox.control.webhook_deliveries()
    assert deliveries and all(d["status"] == 200 for d in deliveries)
    assert failure_emails(cid) == [f"charge-{cid}:attempt-1:payment_failed"]
    assert charge(cid).status == ChargeStatus.requires_payment_method


def test_sandbox_delivery_processed_by_a_real_worker(app_env, sandbox, worker, clean_db):
    from billing.stripe_gateway import get_gateway

    app = build_app()  # the default enqueue: the Celery task, run by the worker process
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with AppServer(app) as server:
        sandbox.control.add_webhook_endpoint(f"{server.url}/webhooks/stripe", SECRET,
                                             enabled_events=["setup_intent.*"])
        gw = get_gateway()
        tag = uuid.uuid4().hex[:8]
        cus = gw.create_customer(email=f"wk-{tag}@example.com", name="Worker", idempotency_key=f"cus-{tag}")
        with unit_of_work() as uow:
            customer_id = factories.make_customer(uow.session, stripe_customer_id=cus).id
            uow.commit()
        si = gw.create_setup_intent(customer_id=cus, payment_method=None, idempotency_key=f"si-{tag}")
        with unit_of_work() as uow:
            uow.session.add(CardSetup(customer_id=customer_id, setup_intent_id=si.setup_intent_id, status=si.status))
            uow.commit()
        gw.confirm_setup_intent(si.setup_intent_id, payment_method="pm_card_visa", idempotency_key=f"si-{tag}-c")
        wait_until(lambda: cards_of(customer_id), timeout=60, message="the worker to save the card")
    assert setup_row(si.setup_intent_id).status == "succeeded"
    [pm] = cards_of(customer_id)
    assert pm.last4 == "4242"
