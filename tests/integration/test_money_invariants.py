"""Hostile tests of what must always hold on the money paths (SPEC, "What must always hold"):

- each subscription period is charged at most once (the sandbox's ledger of successful charges, or
  the fake gateway's PaymentIntents, is where "charged twice" shows);
- every due period ends ``paid`` or in the retry queue, never stuck in ``pending``/``processing``;
- every failure is notified exactly once (outbox rows and the messages the SMTP server received);
- no secret, API key, ``client_secret`` or recovery token in a log line.

They race the paths that can touch one charge against each other (the charge task, webhooks, the
recovery page, a staff retry, the reconciler), kill real workers mid-run, and feed Stripe's nastier
answers (a 500 saved under the idempotency key, 429 storms, lost responses) through the sandbox.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import stripe
from sqlalchemy import func, select

from billing import charging, customer_pages, notifications, reconciler, recovery, webhooks
from billing.db import unit_of_work
from billing.models import (
    Attempt,
    AttemptPhase,
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    PaymentMethod,
    Subscription,
)
from billing.outcomes import TemporaryStripeError
from billing.stripe_gateway import get_gateway
from tests import factories
from tests.fakes import FakeGateway, declined
from tests.integration.billing_helpers import SETTLED, charge_statuses, enqueue, enrol, lease_runs_out
from tests.integration.conftest import wait_until
from tests.stripe_events import event

pytestmark = pytest.mark.usefixtures("clean_db")

FAILURE_KINDS = ("payment_failed", "authentication_required")


# --- helpers -------------------------------------------------------------------------------------------

def add_card(session_factory, sandbox, sub_id: int, card: str = "pm_card_visa") -> str:
    """The customer saves a (new) card: it becomes their default and the subscription's card."""
    gw = get_gateway()
    with session_factory() as s:
        sub = s.get(Subscription, sub_id)
        customer = s.get(Customer, sub.customer_id)
        cus = customer.stripe_customer_id
    setup = gw.create_setup_intent(customer_id=cus, payment_method=card, idempotency_key=f"test-si2-{sub_id}")
    if setup.status == "requires_action":
        sandbox.control.complete_3ds(setup.setup_intent_id)
        setup = gw.retrieve_setup_intent(setup.setup_intent_id)
    details = gw.retrieve_payment_method(setup.payment_method_id)
    with session_factory() as s:
        sub = s.get(Subscription, sub_id)
        customer = s.get(Customer, sub.customer_id)
        pm = factories.make_payment_method(s, customer, default=False,
                                           stripe_payment_method_id=details.payment_method_id,
                                           fingerprint=details.fingerprint)
        customer.default_payment_method_id = pm.id
        sub.payment_method_id = pm.id
        s.commit()
    return details.payment_method_id


def get_charge(session_factory, charge_id: int) -> Charge:
    with session_factory() as s:
        return s.get(Charge, charge_id)


def ledger_by_charge(sandbox) -> collections.Counter:
    return collections.Counter(entry["metadata"].get("charge_id") for entry in sandbox.control.ledger())


def failure_rows(session_factory, charge_id: int | None = None) -> list[str]:
    with session_factory() as s:
        q = select(Notification.dedupe_key).where(Notification.kind.in_(FAILURE_KINDS))
        if charge_id is not None:
            q = q.where(Notification.charge_id == charge_id)
        return list(s.scalars(q))


def recover_token(charge_id: int) -> str:
    """The link the failure email would carry (issued as the relay issues it)."""
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        sub = uow.session.get(Subscription, charge.subscription_id)
        token = recovery.issue_token(uow.session, customer_id=sub.customer_id, purpose="recover",
                                     charge_id=charge_id)
        uow.commit()
    return token


def stripe_client(sandbox) -> stripe.StripeClient:
    return stripe.StripeClient(sandbox.api_key, base_addresses={"api": sandbox.url}, max_network_retries=0)


def customer_pays_on_session(sandbox, pi_id: str, pm_id: str) -> str:
    """What Stripe.js does on the recovery page: confirm this PaymentIntent with the customer
    present, 3-D Secure completed when the issuer asks."""
    client = stripe_client(sandbox)
    try:
        pi = client.v1.payment_intents.confirm(pi_id, {"payment_method": pm_id})
    except stripe.StripeError:
        return client.v1.payment_intents.retrieve(pi_id).status
    if pi.status == "requires_action":
        sandbox.control.complete_3ds(pi_id)
        pi = client.v1.payment_intents.retrieve(pi_id)
    return pi.status


def deliver_webhook(pi_id: str, type_: str, *, gateway=None) -> str:
    """Stripe's event about the PaymentIntent as it is now, stored and processed once."""
    pi = stripe_client_for_env().v1.payment_intents.retrieve(pi_id).to_dict()
    evt = event(type_, pi)
    accepted = webhooks.accept(evt, enqueue=lambda _id: None)
    return webhooks.process(accepted.event_row_id, gateway=gateway)


def stripe_client_for_env() -> stripe.StripeClient:
    from billing.settings import get_settings

    s = get_settings()
    return stripe.StripeClient(s.stripe_api_key, base_addresses={"api": s.stripe_api_base}, max_network_retries=0)


# --- the recovery page against an attempt in flight ---------------------------------------------------

def test_recovery_page_opened_while_a_retry_creates_the_first_payment_intent(app_env, sandbox,
                                                                             session_factory):
    # The period fell due while the customer had no usable card: failed, no PaymentIntent, email sent.
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", with_card=False)
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == "requires_payment_method"
    assert get_charge(session_factory, charge_id).payment_intent_id is None
    # The customer saves a card; staff press "retry now" while the customer opens the emailed link.
    pm_id = add_card(session_factory, sandbox, sub_id)
    token = recover_token(charge_id)
    sandbox.control.add_fault("slow", method="POST", path="/v1/payment_intents", count=1, delay_ms=3000)
    results: list[str] = []
    retry = threading.Thread(target=lambda: results.append(charging.process_charge(charge_id, manual=True)))
    retry.start()
    wait_until(lambda: get_charge(session_factory, charge_id).status == ChargeStatus.processing,
               timeout=20, message="the retry to claim the charge")
    wait_until(lambda: sandbox.control.requests()["by_endpoint"].get("POST /v1/payment_intents"), timeout=20,
               message="the retry's PaymentIntent to reach Stripe")
    page = customer_pages.open_recovery(token)
    retry.join(60)
    assert results == ["paid"]
    if page.client_secret:  # the page offered a payment: the customer makes it
        pi_on_page = get_charge(session_factory, charge_id).payment_intent_id
        customer_pays_on_session(sandbox, pi_on_page, pm_id)
    assert ledger_by_charge(sandbox)[str(charge_id)] == 1


def test_payment_completed_after_give_up_is_recorded(app_env, sandbox, session_factory):
    sub_id = enrol(session_factory, sandbox, "pm_card_authenticationRequired")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == "authentication_required"
    charge = get_charge(session_factory, charge_id)
    token = recover_token(charge_id)
    page = customer_pages.open_recovery(token)  # the customer has the page open, with its client secret
    assert page.payable
    # Fourteen days pass; the sweep gives up just before the customer clicks "pay".
    assert reconciler.give_up_overdue(now=charge.first_failed_at + timedelta(days=15)) == [charge_id]
    with session_factory() as s:
        pm_id = s.get(PaymentMethod, s.get(Subscription, sub_id).payment_method_id).stripe_payment_method_id
    assert customer_pays_on_session(sandbox, charge.payment_intent_id, pm_id) == "succeeded"
    assert ledger_by_charge(sandbox)[str(charge_id)] == 1  # Stripe took the money
    # Both ways the news reaches us: the page's return and the webhook.
    customer_pages.complete_recovery(token)
    deliver_webhook(charge.payment_intent_id, "payment_intent.succeeded")
    with session_factory() as s:
        assert s.get(Charge, charge_id).status == ChargeStatus.paid
        assert s.get(Subscription, sub_id).status == "active"


# --- a 500 saved under the idempotency key ------------------------------------------------------------

def _resend_like_celery(charge_id: int, tries: int) -> str | None:
    """The task's retries, then the reconciler's re-enqueues: each is one more process_charge."""
    for _ in range(tries):
        try:
            return charging.process_charge(charge_id)
        except TemporaryStripeError:
            continue
    return None


@pytest.fixture
def no_backoff(app_env):
    """The in-process gateway resends at once (its jittered backoff only slows the test down)."""
    gw = get_gateway()
    gw._sleep = lambda _seconds: None
    return gw


def test_saved_500_never_charges_twice_and_moves_on_to_a_new_key(app_env, sandbox, session_factory,
                                                                  no_backoff):
    enrol(session_factory, sandbox, "pm_card_visa")
    sandbox.control.add_fault("api_error", method="POST", path="/v1/payment_intents", count=1)
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    # The first try meets the 500, then its replay: the attempt is spent, the charge claimable again.
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id)
    assert get_charge(session_factory, charge_id).status == ChargeStatus.pending
    assert ledger_by_charge(sandbox) == {}
    assert charging.process_charge(charge_id) == "paid"
    assert ledger_by_charge(sandbox) == {str(charge_id): 1}
    with session_factory() as s:
        outcomes = s.scalars(select(Attempt.outcome).order_by(Attempt.number)).all()
        keys = s.scalars(select(Attempt.idempotency_key)).all()
    assert outcomes == ["abandoned", "succeeded"] and len(set(keys)) == 2


def test_saved_500_does_not_hold_a_charge_for_a_day(app_env, sandbox, session_factory, no_backoff):
    enrol(session_factory, sandbox, "pm_card_visa")
    sandbox.control.add_fault("api_error", method="POST", path="/v1/payment_intents", count=1)
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    # Ten task retries and a few reconciler rounds, all within the hour: Stripe is healthy again.
    result = _resend_like_celery(charge_id, 12)
    assert ledger_by_charge(sandbox)[str(charge_id)] <= 1
    assert result == "paid"


def test_key_already_used_with_other_parameters_moves_on_to_a_new_key(app_env, sandbox, session_factory):
    """A restored database (or a second installation on the account) sent another request under this
    attempt's key: Stripe refuses the key, the attempt is abandoned, the next try pays once."""
    enrol(session_factory, sandbox, "pm_card_visa")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, datetime.now(UTC), manual=False)  # then the worker dies
    with session_factory() as s:
        customer = s.scalars(select(Customer)).one().stripe_customer_id
    stripe_client(sandbox).v1.customers.update(customer, {"name": "someone else's request"},
                                               {"idempotency_key": claim.idempotency_key})
    lease_runs_out(charge_id)
    with pytest.raises(TemporaryStripeError):
        charging.process_charge(charge_id)  # resumes: nothing found by metadata, the key is refused
    assert get_charge(session_factory, charge_id).status == ChargeStatus.pending
    assert charging.process_charge(charge_id) == "paid"
    assert ledger_by_charge(sandbox) == {str(charge_id): 1}
    with session_factory() as s:
        assert s.scalars(select(Attempt.outcome).order_by(Attempt.number)).all() == ["abandoned", "succeeded"]


# --- workers killed at random moments, with a flaky Stripe --------------------------------------------

SECRET_MARKERS = ("sk_test_", "_secret_", "whsec_", "/recover/", "/setup/")


def assert_no_secrets(text: str) -> None:
    for marker in SECRET_MARKERS:
        assert marker not in text, f"{marker!r} in a log line"


def sweep_until_settled(session_factory, charge_ids: list[int], *, rounds: int = 8,
                        per_round: float = 15.0) -> dict[int, str]:
    """What beat's reconcile task does every few minutes, with the clock moved on each time."""
    for k in range(1, rounds + 1):
        deadline = time.monotonic() + per_round
        while time.monotonic() < deadline:
            st = charge_statuses(session_factory)
            if all(st.get(cid) in SETTLED for cid in charge_ids):
                return st
            time.sleep(0.3)
        reconciler.sweep(now=datetime.now(UTC) + timedelta(minutes=10 * k), enqueue=enqueue)
    return charge_statuses(session_factory)


def test_workers_killed_at_random_during_a_flaky_run_charge_each_period_once(app_env, sandbox, worker,
                                                                             session_factory):
    subs = [enrol(session_factory, sandbox, "pm_card_visa", email=f"chaos{i}@example.com") for i in range(20)]
    for fault, count in (("slow", 5), ("lose_response", 4), ("reset", 2)):
        sandbox.control.add_fault(fault, method="POST", path="/v1/payment_intents", count=count,
                                  delay_ms=2500 if fault == "slow" else None)
    sandbox.control.set_latency(150, 600)
    charge_ids = charging.run_due(enqueue=enqueue).created
    assert len(charge_ids) == len(subs)
    rng = random.Random(20260331)
    logs, unsettled_at_kill = [], []
    for _ in range(3):
        time.sleep(rng.uniform(0.5, 2.5))
        logs.append(worker.log())
        worker.kill()
        unsettled_at_kill.append(sum(st not in SETTLED for st in charge_statuses(session_factory).values()))
        worker.start()
    assert unsettled_at_kill[0] > 0  # the first kill did land in the middle of the run
    sandbox.control.clear_faults()
    sandbox.control.set_latency(0)
    final = sweep_until_settled(session_factory, charge_ids)
    logs.append(worker.log())
    assert {final[cid] for cid in charge_ids} == {"paid"}, final
    assert ledger_by_charge(sandbox) == {str(cid): 1 for cid in charge_ids}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Attempt).where(Attempt.phase == AttemptPhase.started)) == 0
        per_charge = dict(s.execute(select(Attempt.charge_id, func.count()).group_by(Attempt.charge_id)).all())
        assert per_charge == {cid: 1 for cid in charge_ids}  # resumed, never a second attempt
        assert all(c.payment_intent_id for c in s.scalars(select(Charge)))
    assert_no_secrets("\n".join(logs))


# --- Stripe pushing back: 429 storms, lock timeouts ----------------------------------------------------

def test_rate_limit_storm_and_lock_timeouts_charge_each_period_once(app_env, sandbox, worker, session_factory):
    for i in range(8):
        enrol(session_factory, sandbox, "pm_card_visa", email=f"storm{i}@example.com")
    sandbox.control.add_fault("lock_timeout", method="POST", path="/v1/payment_intents", count=3)
    sandbox.control.add_fault("rate_limit", method="POST", path="/v1/payment_intents", rate=0.5)
    charge_ids = charging.run_due(enqueue=enqueue).created
    final = sweep_until_settled(session_factory, charge_ids, per_round=25)
    assert {final[cid] for cid in charge_ids} == {"paid"}, final
    assert ledger_by_charge(sandbox) == {str(cid): 1 for cid in charge_ids}
    assert sandbox.control.requests()["faults"].get("rate_limit", 0) > 0


# --- duplicates everywhere: two runs and beat at once, every task delivered thrice, three workers -----

def test_duplicate_runs_and_deliveries_across_three_workers_charge_once(app_env, sandbox, worker_factory,
                                                                        session_factory):
    from workers.tasks import run_billing

    for _ in range(3):
        worker_factory(concurrency=3)
    for i in range(8):
        enrol(session_factory, sandbox, "pm_card_visa", email=f"dup{i}@example.com")
    sandbox.control.set_latency(200)
    opened: list[int] = []

    def run():
        opened.extend(charging.run_due(enqueue=lambda cid: [enqueue(cid) for _ in range(3)]).created)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    run_billing.delay()  # what beat sends
    for t in threads:
        t.join()
    wait_until(lambda: len(charge_statuses(session_factory)) == 8, timeout=30, message="8 charges opened")
    final = sweep_until_settled(session_factory, list(charge_statuses(session_factory)), per_round=20)
    assert set(final.values()) == {"paid"}
    ledger = ledger_by_charge(sandbox)
    assert sorted(ledger) == sorted(str(cid) for cid in final) and set(ledger.values()) == {1}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Charge)) == 8  # one charge per period


# --- the charge task and Stripe's webhooks about the same PaymentIntent --------------------------------

def _fake_sub(session_factory) -> int:
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        due = datetime.now(UTC) - timedelta(minutes=1)
        sub = factories.make_subscription(s, customer, anchor_at=due, next_charge_at=due)
        s.commit()
        return sub.id


def _pi_event(type_: str, pi_id: str, charge_id: int, status: str, error: dict | None) -> dict:
    return event(type_, {"id": pi_id, "object": "payment_intent", "amount": 1999, "currency": "eur",
                         "status": status, "client_secret": f"{pi_id}_secret_x", "payment_method": "pm_x",
                         "metadata": {"charge_id": str(charge_id)}, "last_payment_error": error})


@pytest.mark.parametrize("first", ["task", "webhook"])
def test_failure_reported_by_task_and_webhook_is_emailed_once(app_env, smtp_server, session_factory, first,
                                                              caplog):
    caplog.set_level(logging.INFO)
    _fake_sub(session_factory)
    gw = FakeGateway(script=lambda pm: declined("insufficient_funds"))
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    error = {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"}
    processed: list[str] = []

    def webhook(evt: dict) -> None:
        row = webhooks.accept(evt, enqueue=lambda _id: None).event_row_id
        try:
            processed.append(webhooks.process(row, gateway=gw))
        except webhooks.EventDeferred:
            processed.append("deferred")

    claim = charging._claim(charge_id, datetime.now(UTC), manual=False)  # the attempt holds the lease
    outcome = charging._call_stripe(gw, claim)  # Stripe has answered; its event goes out at once
    failed = _pi_event("payment_intent.payment_failed", outcome.payment_intent_id, charge_id,
                       "requires_payment_method", error)
    if first == "webhook":
        webhook(failed)  # arrives while the task is still between Stripe's answer and its commit
    assert charging._finish(claim, outcome, datetime.now(UTC)) == "requires_payment_method"
    webhook(failed)  # the retried (or first) processing, after the attempt finished
    webhook(failed)  # a duplicate delivery
    assert processed[-2:] == ["unchanged", "already_processed"]  # the state already held it
    if first == "webhook":
        assert processed[0] == "deferred"
    assert failure_rows(session_factory, charge_id) == [f"charge-{charge_id}:attempt-1:payment_failed"]
    # Two relays at once, twice over: one email reaches the customer.
    relays = [threading.Thread(target=notifications.relay_due) for _ in range(2)]
    for t in relays:
        t.start()
    for t in relays:
        t.join()
    notifications.relay_due()
    [msg] = smtp_server.wait_for(1)
    time.sleep(0.5)
    assert len(smtp_server.messages) == 1
    link = next(w for w in msg.get_body(("plain",)).get_content().split() if "/recover/" in w)
    assert link.startswith("http://billing.test/recover/")
    assert link.rsplit("/", 1)[1] not in caplog.text
    assert_no_secrets(caplog.text)
    assert gw.created() == 1


@pytest.mark.parametrize("first", ["task", "webhook"])
def test_success_webhook_racing_the_charge_task_pays_once(app_env, session_factory, first):
    _fake_sub(session_factory)
    gw = FakeGateway()
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    results = []
    claim = charging._claim(charge_id, datetime.now(UTC), manual=False)  # the attempt holds the lease
    outcome = charging._call_stripe(gw, claim)
    evt = _pi_event("payment_intent.succeeded", outcome.payment_intent_id, charge_id, "succeeded", None)
    row = webhooks.accept(evt, enqueue=lambda _id: None).event_row_id
    if first == "webhook":
        with pytest.raises(webhooks.EventDeferred):
            webhooks.process(row, gateway=gw)
    results.append(charging._finish(claim, outcome, datetime.now(UTC)))
    results.append(webhooks.process(row, gateway=gw))
    assert results == ["paid", "ignored"]
    # Redelivered task: nothing to do, nothing sent to Stripe.
    assert charging.process_charge(charge_id, gateway=gw) == "skipped:paid"
    assert gw.created() == 1 and [c[0] for c in gw.calls] == ["create"]
    assert failure_rows(session_factory) == []


# --- staff, the schedule and the customer racing for one failed charge ---------------------------------

def _failed_once(session_factory, sandbox, *, card: str = "pm_card_visa") -> tuple[int, int, str]:
    """A charge whose first attempt was declined (soft) and whose card is good again."""
    sub_id = enrol(session_factory, sandbox, card, declines_later="insufficient_funds")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == "requires_payment_method"
    with session_factory() as s:
        pm = s.get(PaymentMethod, s.get(Subscription, sub_id).payment_method_id).stripe_payment_method_id
        charge = s.get(Charge, charge_id)
        assert charge.next_retry_at is not None and charge.payment_intent_id
        charge.next_retry_at = datetime.now(UTC) - timedelta(seconds=1)  # the retry has come due
        s.commit()
    sandbox.control.decline_later(pm, None)
    return sub_id, charge_id, pm


def test_staff_retry_racing_the_scheduled_retry_charges_once(app_env, sandbox, smtp_server, worker_factory,
                                                             session_factory):
    from workers.tasks import enqueue_manual_retry

    worker_factory(concurrency=3)
    worker_factory(concurrency=3)
    sub_id, charge_id, _pm = _failed_once(session_factory, sandbox)
    sandbox.control.set_latency(300)
    for _ in range(3):
        enqueue_manual_retry(charge_id)
        charging.retry_due(enqueue=enqueue)  # beat's retry sweep, every time it ticks
    wait_until(lambda: get_charge(session_factory, charge_id).status == "paid", timeout=60,
               message="the retry to pay")
    time.sleep(1.5)  # the remaining deliveries run and find nothing to do
    assert ledger_by_charge(sandbox) == {str(charge_id): 1}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Attempt).where(Attempt.phase == AttemptPhase.started)) == 0
        assert s.get(Subscription, sub_id).status == "active"
    assert failure_rows(session_factory, charge_id) == [f"charge-{charge_id}:attempt-1:payment_failed"]
    # The failure was recorded once; by the time the relay runs the charge is paid, so the email
    # that would ask the customer to pay is dropped, not sent.
    relayed = notifications.relay_due()
    assert (relayed.sent, relayed.dropped) == (0, 1)
    assert smtp_server.messages == []


@pytest.mark.parametrize("first", ["customer", "retry"])
def test_recovery_page_paying_while_the_scheduled_retry_fires_charges_once(app_env, sandbox, session_factory,
                                                                           first, caplog, no_backoff):
    caplog.set_level(logging.INFO)
    _sub_id, charge_id, pm = _failed_once(session_factory, sandbox)
    token = recover_token(charge_id)
    page = customer_pages.open_recovery(token)
    assert page.payable
    pi_id = get_charge(session_factory, charge_id).payment_intent_id
    # The retry's confirm is processed at Stripe, its answer slow to come back.
    sandbox.control.add_fault("slow", method="POST", path="/v1/payment_intents/*/confirm", count=1,
                              delay_ms=2000)
    results: list[str] = []
    retry = threading.Thread(target=lambda: results.append(charging.process_charge(charge_id)))
    if first == "customer":
        sandbox.control.clear_faults()
        assert customer_pays_on_session(sandbox, pi_id, pm) == "succeeded"
        retry.start()
        retry.join(60)
        outcome = customer_pages.complete_recovery(token)
    else:
        retry.start()
        wait_until(lambda: get_charge(session_factory, charge_id).status == "processing", timeout=20,
                   message="the retry to start")
        customer_pays_on_session(sandbox, pi_id, pm)
        outcome = customer_pages.complete_recovery(token)
        retry.join(60)
    assert results and results[0] in ("paid", "skipped:paid")
    assert outcome.paid or outcome.busy
    assert get_charge(session_factory, charge_id).status == "paid"
    assert ledger_by_charge(sandbox) == {str(charge_id): 1}
    with pytest.raises(recovery.TokenError):  # a paid charge's link opens no payment page again
        customer_pages.open_recovery(token)
    assert token not in caplog.text and page.client_secret not in caplog.text
    assert_no_secrets(caplog.text)


# --- a card detached before its retry, and Stripe's late word on the old attempt -----------------------

def test_card_detached_before_the_retry_is_not_charged_and_asks_for_a_card(app_env, sandbox, session_factory):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", declines_later="insufficient_funds")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == "requires_payment_method"
    with session_factory() as s:
        pm_id = s.get(PaymentMethod, s.get(Subscription, sub_id).payment_method_id).stripe_payment_method_id
    sandbox.control.decline_later(pm_id, None)
    # The customer removes the card at Stripe; Stripe tells us.
    detached = stripe_client(sandbox).v1.payment_methods.detach(pm_id).to_dict()
    row = webhooks.accept(event("payment_method.detached", detached), enqueue=lambda _id: None).event_row_id
    assert webhooks.process(row) == "applied"
    retry_at = get_charge(session_factory, charge_id).next_retry_at
    confirms_before = sandbox.control.requests()["by_endpoint"].get("POST /v1/payment_intents/{id}/confirm", 0)
    assert charging.retry_due(now=retry_at, enqueue=lambda _id: None) == [charge_id]
    assert charging.process_charge(charge_id, now=retry_at) == "requires_payment_method"
    charge = get_charge(session_factory, charge_id)
    assert charge.last_error_code == "no_payment_method" and charge.next_retry_at is None
    assert sandbox.control.requests()["by_endpoint"].get("POST /v1/payment_intents/{id}/confirm", 0) \
        == confirms_before
    assert ledger_by_charge(sandbox) == {}
    # One email per failure: the decline, then "your card is gone".
    assert sorted(failure_rows(session_factory, charge_id)) == [
        f"charge-{charge_id}:attempt-1:payment_failed", f"charge-{charge_id}:attempt-2:payment_failed"]


def test_late_webhook_about_an_old_attempt_does_not_reschedule_a_card_less_charge(app_env, sandbox,
                                                                                  session_factory):
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", declines_later="insufficient_funds")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == "requires_payment_method"
    charge = get_charge(session_factory, charge_id)
    # Stripe's event about that decline, held up by an outage of our endpoint (retried for 3 days).
    pi = stripe_client(sandbox).v1.payment_intents.retrieve(charge.payment_intent_id).to_dict()
    late = event("payment_intent.payment_failed", pi)
    with session_factory() as s:
        s.get(PaymentMethod, s.get(Subscription, sub_id).payment_method_id).detached_at = datetime.now(UTC)
        s.commit()
    assert charging.process_charge(charge_id, now=charge.next_retry_at) == "requires_payment_method"
    assert get_charge(session_factory, charge_id).next_retry_at is None  # waits for a new card
    row = webhooks.accept(late, enqueue=lambda _id: None).event_row_id
    webhooks.process(row, now=charge.next_retry_at + timedelta(minutes=5))
    after = get_charge(session_factory, charge_id)
    assert after.next_retry_at is None and after.last_error_code == "no_payment_method"


# --- a subscription canceled in the middle of a run -----------------------------------------------------

def test_subscriptions_canceled_mid_run_are_charged_at_most_once(app_env, sandbox, worker_factory,
                                                                 session_factory):
    from billing import enrolment

    worker_factory(concurrency=1)  # one charge at a time: the later ones are canceled before their turn

    subs = [enrol(session_factory, sandbox, "pm_card_visa", email=f"cancel{i}@example.com") for i in range(8)]
    sandbox.control.set_latency(400)
    charge_ids = charging.run_due(enqueue=enqueue).created
    for sub_id in subs[::2]:
        enrolment.cancel_subscription(sub_id)
    final = sweep_until_settled(session_factory, charge_ids, per_round=20)
    assert set(final.values()) <= {"paid", "void"}, final
    ledger = ledger_by_charge(sandbox)
    assert set(ledger.values()) <= {1}
    assert {cid for cid in charge_ids if final[cid] == "paid"} == {int(c) for c in ledger}
    with session_factory() as s:
        by_sub = dict(s.execute(select(Charge.subscription_id, Charge.status)).all())
    assert all(by_sub[sub] == "paid" for sub in subs[1::2])  # the others were untouched
    assert "void" in final.values()
    # Canceled subscriptions open no further period, however far the clock goes.
    charging.run_due(now=datetime.now(UTC) + timedelta(days=400), enqueue=lambda _id: None)
    with session_factory() as s:
        opened = s.scalars(select(Charge.subscription_id).where(Charge.period_index > 0)).all()
    assert not set(opened) & set(subs[::2])


# --- the calendar: boundaries, month ends, leap days, catching up ---------------------------------------

def _sub_at(session_factory, anchor: datetime, interval: str = "month", **kw) -> int:
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer, anchor_at=anchor, next_charge_at=anchor, interval=interval,
                                          **kw)
        s.commit()
        return sub.id


def test_period_boundary_exactly_now_is_due_and_a_microsecond_before_is_not(session_factory):
    anchor = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    _sub_at(session_factory, anchor)
    assert charging.run_due(now=anchor - timedelta(microseconds=1), enqueue=lambda _id: None).created == []
    assert len(charging.run_due(now=anchor, enqueue=lambda _id: None).created) == 1
    assert charging.run_due(now=anchor, enqueue=lambda _id: None).created == []


def test_far_behind_subscriptions_catch_up_every_period_once_across_month_ends_and_leap_days(session_factory):
    leap = _sub_at(session_factory, datetime(2024, 2, 29, 9, 0, tzinfo=UTC), "year")
    month_end = _sub_at(session_factory, datetime(2025, 12, 31, 23, 59, tzinfo=UTC), "month")
    now = datetime(2028, 3, 1, tzinfo=UTC)  # `billing run-due --now` far ahead of the last run
    gw = FakeGateway()
    runs = 0
    while True:  # what beat does, once per tick
        created = charging.run_due(now=now, enqueue=lambda _id: None).created
        for cid in created:
            assert charging.process_charge(cid, gateway=gw, now=now) == "paid"
        if not created:
            break
        runs += 1
        assert runs < 40
    with session_factory() as s:
        rows = s.execute(select(Charge.subscription_id, Charge.period_index, Charge.period_start, Charge.period_end)
                         .order_by(Charge.subscription_id, Charge.period_index)).all()
    starts = collections.defaultdict(list)
    for sub_id, index, start, end in rows:
        assert start < end
        starts[sub_id].append((index, start.date().isoformat()))
    assert [d for _, d in starts[leap]] == ["2024-02-29", "2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29"]
    month_dates = [d for _, d in starts[month_end]]
    assert month_dates[:3] == ["2025-12-31", "2026-01-31", "2026-02-28"]
    assert "2028-02-29" in month_dates and month_dates[-1] == "2028-02-29"
    assert len(month_dates) == 27 and len(set(month_dates)) == 27
    for sub_id in (leap, month_end):  # contiguous periods: no gap, no overlap
        indices = [i for i, _ in starts[sub_id]]
        assert indices == list(range(len(indices)))
    assert gw.created() == len(rows)  # each period charged once


def test_zero_decimal_amount_through_the_api_is_charged_as_is(app_env, sandbox, smtp_server, session_factory):
    from fastapi.testclient import TestClient

    from billing.web.app import create_app
    from tests.integration.billing_helpers import api_key_headers

    with TestClient(create_app(), headers=api_key_headers()) as api:
        cus = api.post("/api/customers", json={"email": "yen@example.com", "name": "Yen", "country": "JP"})
        assert cus.status_code == 201, cus.text
        cid = cus.json()["id"]
        setup = api.post(f"/api/customers/{cid}/card-setups", json={"payment_method": "pm_card_jp"})
        assert setup.status_code == 201 and setup.json()["status"] == "succeeded", setup.text
        start = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        sub = api.post("/api/subscriptions", json={"customer_id": cid, "amount": 1500, "currency": "JPY",
                                                   "interval": "month", "start_at": start})
        assert sub.status_code == 201, sub.text
        [charge_id] = charging.run_due(enqueue=lambda _id: None).created
        assert charging.process_charge(charge_id) == "paid"
        [entry] = sandbox.control.ledger()
        assert (entry["amount"], entry["currency"]) == (1500, "jpy")
        charges = api.get(f"/api/subscriptions/{sub.json()['id']}").json()["charges"]
        assert [(c["amount"], c["currency"], c["status"]) for c in charges] == [(1500, "jpy", "paid")]
