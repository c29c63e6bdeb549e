"""A Stripe object moves one of our charges only when it is provably ours, on the real sandbox.

Every PaymentIntent here is a real one made in the sandbox, and every event is the sandbox's own,
delivered signed to the product's webhook endpoint (processed inline). Foreign ones name our charge
in their metadata, as another installation on the same Stripe account or a restored database's twin
would: other installation, other customer, amount, currency, an attempt we never made. None may mark
the charge paid, use up its links or email anyone, and each is counted. Two installations share one
sandbox account with colliding ids, each with its own database; a restored database repeats ids, and
the recovery page still takes a payment after its earlier PaymentIntent was canceled.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import stripe
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from billing import charging, customer_pages, enrolment, notifications, reconciler, recovery, webhooks
from billing.db import unit_of_work
from billing.installation import installation_id
from billing.models import (
    Attempt,
    AttemptPhase,
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    RecoveryToken,
    Subscription,
)
from billing.settings import ConfigError, load
from billing.web.webhooks import get_webhook_enqueue, get_webhook_secret
from tests import factories
from tests.conftest import TEST_DATA_DIR, environ_applied
from tests.integration.billing_helpers import enrol, lease_runs_out
from tests.stripe_events import SECRET, signed

pytestmark = pytest.mark.usefixtures("clean_db")


# --- the sandbox, as Stripe.js, a bank and other installations would use it ------------------------

def client(sandbox) -> stripe.StripeClient:
    return stripe.StripeClient(sandbox.api_key, base_addresses={"api": sandbox.url}, max_network_retries=0)


def stripe_customer(sandbox, name: str = "Someone else") -> str:
    return client(sandbox).v1.customers.create({"email": f"{uuid.uuid4().hex[:8]}@example.org", "name": name}).id


def paid_elsewhere(sandbox, *, customer: str, metadata: dict, amount: int = 2500, currency: str = "eur",
                   card: str = "pm_card_visa") -> str:
    """A PaymentIntent someone else's code made and confirmed on the account (a decline card fails it)."""
    c = client(sandbox)
    pi = c.v1.payment_intents.create({"amount": amount, "currency": currency, "customer": customer,
                                      "payment_method_types": ["card"], "metadata": metadata})
    try:
        c.v1.payment_intents.confirm(pi.id, {"payment_method": card, "off_session": True})
    except stripe.CardError:
        pass
    return pi.id


def pays_on_page(sandbox, pi_id: str, card: str = "pm_card_visa") -> str:
    """What Stripe.js does when the customer pays on the recovery page."""
    return client(sandbox).v1.payment_intents.confirm(pi_id, {"payment_method": card}).status


HANDLED = ("payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.processing",
           "payment_intent.canceled", "payment_intent.requires_action")


def events_about(sandbox, *pi_ids: str) -> list[dict]:
    """The sandbox's events about these PaymentIntents that the product handles, oldest first."""
    data = client(sandbox).v1.events.list({"type": "payment_intent.*", "limit": 100}).data
    return [e.to_dict() for e in reversed(data) if e.data.object.id in pi_ids and e.type in HANDLED]


# --- the product's side -------------------------------------------------------------------------------

@contextlib.contextmanager
def endpoint() -> Iterator:
    """This installation's ``POST /webhooks/stripe``, each delivery processed inline; ``deliver(event)``
    posts it signed and returns what processing recorded for it."""
    from billing.web.app import create_app

    def enqueue(row_id: int) -> None:
        try:
            webhooks.process(row_id)
        except webhooks.EventDeferred:
            pass

    app = create_app()
    app.dependency_overrides[get_webhook_enqueue] = lambda: enqueue
    app.dependency_overrides[get_webhook_secret] = lambda: SECRET
    with TestClient(app) as http:
        def deliver(evt: dict) -> str | None:
            body, headers = signed(evt)
            assert http.post("/webhooks/stripe", content=body, headers=headers).status_code == 200
            with unit_of_work() as uow:
                return uow.session.scalar(select(webhooks.WebhookEvent.outcome)
                                          .where(webhooks.WebhookEvent.stripe_event_id == evt["id"]))
        yield deliver


def foreign_count(source: str, reason: str) -> float:
    return REGISTRY.get_sample_value("billing_foreign_objects_total", {"source": source, "reason": reason}) or 0.0


def get_charge(charge_id: int) -> Charge:
    with unit_of_work() as uow:
        row = uow.session.get(Charge, charge_id)
        uow.session.expunge(row)
        return row


def notification_count() -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.count()).select_from(Notification))


def unused_links(charge_id: int) -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.count()).select_from(RecoveryToken).where(
            RecoveryToken.charge_id == charge_id, RecoveryToken.used_at.is_(None)))


def recovery_link(charge_id: int) -> str:
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        customer_id = uow.session.get(Subscription, charge.subscription_id).customer_id
        token = recovery.issue_token(uow.session, customer_id=customer_id, purpose="recover", charge_id=charge_id)
        uow.commit()
    return token


def stripe_customer_of(charge_id: int) -> str:
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        sub = uow.session.get(Subscription, charge.subscription_id)
        return uow.session.get(Customer, sub.customer_id).stripe_customer_id


def failed_without_a_card(session_factory, sandbox, **kw) -> int:
    """A charge due while the customer has no card: failed (no PaymentIntent), waiting on the page."""
    enrol(session_factory, sandbox, "pm_card_visa", with_card=False, **kw)
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    assert charging.process_charge(charge_id) == ChargeStatus.requires_payment_method
    assert get_charge(charge_id).payment_intent_id is None
    return charge_id


# --- foreign PaymentIntents that name our charge ------------------------------------------------------

def test_foreign_successes_naming_our_charge_change_nothing_and_ours_still_pays(app_env, sandbox, smtp_server,
                                                                                 session_factory):
    charge_id = failed_without_a_card(session_factory, sandbox)
    link = recovery_link(charge_id)
    notifications.relay_due()  # the failure email, with its own link
    emails, rows = len(smtp_server.wait_for(1)), notification_count()
    ours, other = stripe_customer_of(charge_id), stripe_customer(sandbox)
    with unit_of_work() as uow:
        attempt = uow.session.scalars(select(Attempt).where(Attempt.charge_id == charge_id)).one()
        attempt_id, attempt_key = str(attempt.id), attempt.idempotency_key
    tag = {"charge_id": str(charge_id), "installation": installation_id()}
    twin = {**tag, "attempt_id": attempt_id, "attempt_key": attempt_key}
    foreign = {
        "installation": paid_elsewhere(sandbox, customer=other, metadata={
            **twin, "installation": "inst_staging"}),
        "customer": paid_elsewhere(sandbox, customer=other, metadata=twin),
        "amount": paid_elsewhere(sandbox, customer=ours, metadata=twin, amount=99),
        "currency": paid_elsewhere(sandbox, customer=ours, metadata=twin, currency="usd"),
        # A restored database's twin: the same charge and attempt ids, another attempt key.
        "attempt": paid_elsewhere(sandbox, customer=ours, metadata={**twin, "attempt_key": f"attempt-{attempt_id}-0"}),
    }
    before = {reason: foreign_count("webhook", reason) for reason in foreign}

    with endpoint() as deliver:
        outcomes = {reason: [deliver(e) for e in events_about(sandbox, pi)] for reason, pi in foreign.items()}
        assert outcomes == {reason: ["foreign"] for reason in foreign}  # one payment_intent.succeeded each
        charge = get_charge(charge_id)
        assert (charge.status, charge.payment_intent_id, charge.paid_at) == ("requires_payment_method", None, None)
        assert unused_links(charge_id) == 2  # ours and the email's
        assert notification_count() == rows
        notifications.relay_due()
        assert len(smtp_server.messages) == emails
        assert {reason: foreign_count("webhook", reason) - before[reason] for reason in foreign} == {
            reason: 1 for reason in foreign}

        # Ours: the page's PaymentIntent, paid while its id was lost on the way to our row.
        page = customer_pages.open_recovery(link)
        assert page.payable
        mine = get_charge(charge_id).payment_intent_id
        with unit_of_work() as uow:
            uow.session.get(Charge, charge_id).payment_intent_id = None
            uow.commit()
        assert pays_on_page(sandbox, mine) == "succeeded"
        assert [deliver(e) for e in events_about(sandbox, mine)][-1] == "applied"
    charge = get_charge(charge_id)
    assert (charge.status, charge.payment_intent_id) == ("paid", mine)
    assert unused_links(charge_id) == 0


def test_foreign_failures_email_nobody_and_ours_still_settles(app_env, sandbox, smtp_server, session_factory):
    enrol(session_factory, sandbox, "pm_card_visa")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created  # pending: not attempted yet
    ours, other = stripe_customer_of(charge_id), stripe_customer(sandbox)
    tag = {"charge_id": str(charge_id), "attempt_id": "1", "attempt_key": "attempt-1-000000000000"}
    declined = [
        paid_elsewhere(sandbox, customer=other, card="pm_card_chargeCustomerFail",
                       metadata={**tag, "installation": "inst_production"}),
        paid_elsewhere(sandbox, customer=ours, card="pm_card_chargeCustomerFail",
                       metadata={**tag, "installation": installation_id()}),
    ]
    before = foreign_count("webhook", "installation") + foreign_count("webhook", "attempt")
    with endpoint() as deliver:
        failures = [evt for evt in events_about(sandbox, *declined) if evt["type"] == "payment_intent.payment_failed"]
        assert len(failures) == 2
        assert [deliver(evt) for evt in failures] == ["foreign", "foreign"]
        assert foreign_count("webhook", "installation") + foreign_count("webhook", "attempt") == before + 2
        assert get_charge(charge_id).status == ChargeStatus.pending and notification_count() == 0
        notifications.relay_due()
        assert smtp_server.messages == []

        assert charging.process_charge(charge_id) == ChargeStatus.paid
        mine = get_charge(charge_id).payment_intent_id
        assert set(deliver(e) for e in events_about(sandbox, mine)) <= {"unchanged", "ignored"}
    assert get_charge(charge_id).status == ChargeStatus.paid


def test_a_payment_intent_of_ours_changed_at_stripe_settles_nothing(app_env, sandbox, session_factory):
    """The charge's own PaymentIntent, its amount lowered by someone with the API key and then paid:
    neither its webhook nor the recovery page records the charge as paid."""
    charge_id = failed_without_a_card(session_factory, sandbox)
    link = recovery_link(charge_id)
    assert customer_pages.open_recovery(link).payable
    mine = get_charge(charge_id).payment_intent_id
    client(sandbox).v1.payment_intents.update(mine, {"amount": 100})
    assert pays_on_page(sandbox, mine) == "succeeded"
    before = foreign_count("webhook", "amount")
    with endpoint() as deliver:
        assert [deliver(e) for e in events_about(sandbox, mine)] == ["foreign"]
    assert foreign_count("webhook", "amount") == before + 1
    with pytest.raises(customer_pages.CannotPayOnline):
        customer_pages.complete_recovery(link)
    assert get_charge(charge_id).status == ChargeStatus.requires_payment_method
    assert unused_links(charge_id) == 1


def test_a_resumed_attempt_ignores_a_restored_twin_and_charges_once(app_env, sandbox, session_factory):
    """The worker died after claiming; a PaymentIntent with this attempt's ids but another attempt key
    (a restored database's twin) is on the account. The resumed attempt does not take it for its own."""
    enrol(session_factory, sandbox, "pm_card_visa")
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    claim = charging._claim(charge_id, datetime.now(UTC), manual=False)
    twin = paid_elsewhere(sandbox, customer=claim.stripe_customer_id, amount=claim.amount, metadata={
        **claim.metadata, "attempt_key": f"attempt-{claim.attempt_id}-ffffffffffff"})
    # The lookup itself passes the twin over (another attempt_key), so it never reaches the resume's check.
    before = foreign_count("search", "attempt")
    lease_runs_out(charge_id)
    assert charging.process_charge(charge_id) == ChargeStatus.paid
    assert foreign_count("search", "attempt") >= before + 1
    charge = get_charge(charge_id)
    assert charge.payment_intent_id not in (None, twin)
    ledger = [e for e in sandbox.control.ledger() if e["metadata"].get("charge_id") == str(charge_id)]
    assert sorted(e["payment_intent"] for e in ledger) == sorted([twin, charge.payment_intent_id])


def test_an_attempt_from_before_tagging_is_still_recognised(app_env, sandbox, session_factory):
    """An attempt started before this installation tagged its objects sent ``charge_id`` and
    ``attempt_id`` only: its PaymentIntent, whose id never reached us, is still adopted. The same
    untagged metadata naming a newer attempt proves nothing."""
    charge_id = failed_without_a_card(session_factory, sandbox)
    now = datetime.now(UTC)
    with unit_of_work() as uow:
        old = uow.session.scalars(select(Attempt).where(Attempt.charge_id == charge_id)).one()
        old.started_at = datetime(2020, 1, 1, tzinfo=UTC)
        newer = Attempt(charge_id=charge_id, number=2, idempotency_key=f"attempt-{charge_id}-newer",
                        phase=AttemptPhase.finished, outcome="invalid_request", started_at=now, finished_at=now)
        uow.session.add(newer)
        uow.session.get(Charge, charge_id).attempts = 2
        uow.session.flush()
        ids = str(old.id), str(newer.id)
        uow.commit()
    customer = stripe_customer_of(charge_id)
    untagged_newer = paid_elsewhere(sandbox, customer=customer, metadata={"charge_id": str(charge_id),
                                                                          "attempt_id": ids[1]})
    untagged_old = paid_elsewhere(sandbox, customer=customer, metadata={"charge_id": str(charge_id),
                                                                        "attempt_id": ids[0]})
    with endpoint() as deliver:
        assert [deliver(e) for e in events_about(sandbox, untagged_newer)] == ["foreign"]
        assert get_charge(charge_id).status == ChargeStatus.requires_payment_method
        assert [deliver(e) for e in events_about(sandbox, untagged_old)] == ["applied"]
    charge = get_charge(charge_id)
    assert (charge.status, charge.payment_intent_id) == ("paid", untagged_old)


# --- the recovery page's key ------------------------------------------------------------------------

@pytest.mark.parametrize("backup", ["taken_before_the_key", "taken_after_the_key"])
def test_after_a_restore_the_page_takes_a_payment_though_its_earlier_payment_intent_was_canceled(
        app_env, sandbox, session_factory, backup):
    charge_id = failed_without_a_card(session_factory, sandbox)
    link = recovery_link(charge_id)
    assert customer_pages.open_recovery(link).payable
    first, first_key = get_charge(charge_id).payment_intent_id, get_charge(charge_id).recovery_key
    assert first_key.startswith(f"recover-charge-{charge_id}-")
    client(sandbox).v1.payment_intents.cancel(first)
    # The database comes back from a backup taken before the PaymentIntent's id was written: the same
    # charge id, with (or without) the key it was created under.
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        charge.payment_intent_id = None
        if backup == "taken_before_the_key":
            charge.recovery_key = None
        uow.commit()

    page = customer_pages.open_recovery(link)
    assert page.payable and page.intent_status == "requires_payment_method"
    charge = get_charge(charge_id)
    assert charge.payment_intent_id not in (None, first) and charge.recovery_key not in (None, first_key)
    assert pays_on_page(sandbox, charge.payment_intent_id) == "succeeded"
    assert customer_pages.complete_recovery(link).paid
    assert get_charge(charge_id).status == ChargeStatus.paid


def test_a_canceled_recovery_payment_intent_is_replaced_not_replayed(app_env, sandbox, session_factory):
    charge_id = failed_without_a_card(session_factory, sandbox)
    link = recovery_link(charge_id)
    customer_pages.open_recovery(link)
    first, first_key = get_charge(charge_id).payment_intent_id, get_charge(charge_id).recovery_key
    client(sandbox).v1.payment_intents.cancel(first)
    page = customer_pages.open_recovery(link)
    assert page.payable
    charge = get_charge(charge_id)
    assert charge.payment_intent_id != first and charge.recovery_key != first_key
    meta = client(sandbox).v1.payment_intents.retrieve(charge.payment_intent_id).metadata.to_dict()
    assert meta == {"charge_id": str(charge_id), "installation": installation_id(),
                    "recovery_key": charge.recovery_key}
    assert customer_pages.open_recovery(link).client_secret == page.client_secret  # a reload: the same one


# --- two installations on one Stripe account -------------------------------------------------------------

@pytest.fixture
def second_installation(app_env) -> Iterator[dict[str, str]]:
    """Another installation's environment: its own freshly migrated database (so its own generated
    installation id and its own ids from 1), the same Stripe account, SMTP and Redis."""
    from billing import embedded, migrate

    name = f"billing_other_{uuid.uuid4().hex[:8]}"
    server = os.environ.get("TEST_DATABASE_URL")
    if server:
        admin = server.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    else:
        url = embedded.database_url(TEST_DATA_DIR, database=name)
        admin = url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    migrate.upgrade(url)
    yield {**app_env, "BILLING_DATABASE_URL": url}
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _customer_with_subscription(email: str, card: str | None) -> tuple[int, str]:
    """Through the product's own enrolment: the Stripe customer (keyed by our row), a card if any, a
    subscription due now, its first period opened and attempted."""
    customer = enrolment.create_customer(email, "Same Id")
    assert customer.stripe_customer_id, "the Stripe customer was not created"
    if card:
        assert enrolment.create_card_setup(customer.id, card).setup.status == "succeeded"
    now = datetime.now(UTC)
    with unit_of_work() as uow:
        row = uow.session.get(Customer, customer.id)
        factories.make_subscription(uow.session, row, amount=2500, anchor_at=now, next_charge_at=now)
        uow.commit()
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    charging.process_charge(charge_id)
    return charge_id, customer.stripe_customer_id


def test_two_installations_sharing_an_account_each_settle_only_their_own(app_env, sandbox, second_installation):
    # Production (this test's database) and staging (another), ids from 1 in both.
    charge_a, cus_a = _customer_with_subscription("prod@example.com", card=None)
    link_a = recovery_link(charge_a)
    inst_a = installation_id()
    with environ_applied(second_installation):
        charge_b, cus_b = _customer_with_subscription("staging@example.com", card="pm_card_visa")
        inst_b = installation_id()
        pi_b = get_charge(charge_b).payment_intent_id
        assert get_charge(charge_b).status == ChargeStatus.paid
    assert charge_a == charge_b == 1 and inst_a != inst_b and cus_a != cus_b
    assert get_charge(charge_a).status == ChargeStatus.requires_payment_method

    # Stripe sends every event of the account to every endpoint on it.
    everything = events_about(sandbox, pi_b)
    with endpoint() as deliver:
        assert {deliver(e) for e in everything} == {"foreign"}
        assert get_charge(charge_a).status == ChargeStatus.requires_payment_method and unused_links(charge_a) == 1
        # Production's customer pays on production's page: a PaymentIntent of its own, not staging's.
        page = customer_pages.open_recovery(link_a)
        pi_a = get_charge(charge_a).payment_intent_id
        assert page.payable and pi_a != pi_b
        assert pays_on_page(sandbox, pi_a) == "succeeded"
        assert "applied" in [deliver(e) for e in events_about(sandbox, pi_a)]
    assert get_charge(charge_a).status == ChargeStatus.paid
    with environ_applied(second_installation):
        with endpoint() as deliver:
            assert {deliver(e) for e in events_about(sandbox, pi_a)} == {"foreign"}
            assert {deliver(e) for e in everything} <= {"unchanged", "ignored"}
        charge = get_charge(charge_b)
        assert (charge.status, charge.payment_intent_id) == ("paid", pi_b)
        with unit_of_work() as uow:
            assert uow.session.scalar(select(func.count()).select_from(Charge)) == 1
    ledger = {e["payment_intent"]: e["metadata"] for e in sandbox.control.ledger()}
    assert ledger[pi_a]["installation"] == inst_a and ledger[pi_b]["installation"] == inst_b


def test_the_reconciler_does_not_take_a_changed_payment_intent_for_the_charges_payment(app_env, sandbox,
                                                                                      session_factory):
    """Asked before giving a charge up, Stripe says its PaymentIntent succeeded, for another amount
    (changed at Stripe since): not recorded as this charge's payment."""
    charge_id = failed_without_a_card(session_factory, sandbox)
    assert customer_pages.open_recovery(recovery_link(charge_id)).payable
    mine = get_charge(charge_id).payment_intent_id
    client(sandbox).v1.payment_intents.update(mine, {"amount": 100})
    assert pays_on_page(sandbox, mine) == "succeeded"
    now = datetime.now(UTC)
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, charge_id)
        charge.first_failed_at, charge.give_up_at = now - timedelta(days=365), now - timedelta(days=351)
        uow.commit()
    before = foreign_count("reconciler", "amount")
    reconciler.give_up_overdue(now=now)
    assert foreign_count("reconciler", "amount") == before + 1
    charge = get_charge(charge_id)
    assert charge.status != ChargeStatus.paid and charge.paid_at is None


def test_installation_id_is_the_setting_else_the_stored_one(app_env):
    stored = installation_id()
    assert stored.startswith("inst_") and len(stored) == 21
    with environ_applied({"BILLING_INSTALLATION_ID": "staging-eu_1"}):
        assert installation_id() == "staging-eu_1"
    assert installation_id() == stored
    for bad in ("has space", "x" * 41, "ünïcode", "semi;colon"):
        with environ_applied({"BILLING_INSTALLATION_ID": bad}), pytest.raises(ConfigError) as err:
            load()
        assert str(err.value).startswith("BILLING_INSTALLATION_ID is invalid")
