"""/setup and /recover without a browser: every bad link, configuration gaps, OpenAPI, and the page's
return racing the webhook, a worker and itself (exactly one state change, on the sandbox)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from billing import charging, customer_pages, enrolment, recovery
from billing.models import CardSetup, Charge, Notification, RecoveryToken, Subscription
from tests import factories
from tests.integration.conftest import _reset_process_caches

pytestmark = pytest.mark.usefixtures("clean_db")

PK = "pk_test_pages"


@pytest.fixture
def pages_env(monkeypatch, app_env, sandbox):
    monkeypatch.setenv("BILLING_STRIPE_PUBLISHABLE_KEY", PK)
    monkeypatch.setenv("BILLING_STRIPE_JS_URL", f"{sandbox.url}/js/v3/stripe.js")
    _reset_process_caches()
    yield
    monkeypatch.undo()
    _reset_process_caches()


@pytest.fixture
def client(pages_env):
    from billing.web.app import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def links(session_factory):
    """A charge waiting on the customer, and one link of each kind and state."""
    now = datetime.now(UTC)
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer)
        charge = factories.make_charge(s, sub, status="authentication_required", payment_intent_id="pi_unused")
        setup = CardSetup(customer_id=customer.id, setup_intent_id="seti_pages", status="requires_payment_method")
        s.add(setup)
        s.flush()
        out = {
            "recover": recovery.issue_token(s, customer_id=customer.id, purpose="recover", charge_id=charge.id),
            "setup": recovery.issue_token(s, customer_id=customer.id, purpose="setup", card_setup_id=setup.id),
            "expired_recover": recovery.issue_token(s, customer_id=customer.id, purpose="recover", charge_id=charge.id,
                                                    ttl=timedelta(seconds=1), now=now - timedelta(days=1)),
            "expired_setup": recovery.issue_token(s, customer_id=customer.id, purpose="setup", card_setup_id=setup.id,
                                                  ttl=timedelta(seconds=1), now=now - timedelta(days=1)),
            "used_recover": recovery.issue_token(s, customer_id=customer.id, purpose="recover", charge_id=charge.id),
            "used_setup": recovery.issue_token(s, customer_id=customer.id, purpose="setup", card_setup_id=setup.id),
        }
        for name in ("used_recover", "used_setup"):
            recovery.consume(s, recovery.verify(s, out[name], name.split("_")[1]))
        s.commit()
        out["charge_id"] = charge.id
        return out


BAD = [
    # (page, token name or literal, status, code, heading)
    ("recover", "nope", 404, "link_not_found", "not valid"),
    ("recover", "A" * 43, 404, "link_not_found", "not valid"),
    ("recover", "x" * 500, 404, "link_not_found", "not valid"),
    ("recover", "setup", 404, "link_not_found", "not valid"),  # a setup link on the recovery page
    ("recover", "expired_recover", 410, "link_expired", "expired"),
    ("recover", "used_recover", 410, "link_used", "already been used"),
    ("setup", "nope", 404, "link_not_found", "not valid"),
    ("setup", "recover", 404, "link_not_found", "not valid"),  # a recovery link on the setup page
    ("setup", "expired_setup", 410, "link_expired", "expired"),
    ("setup", "used_setup", 410, "link_used", "already been used"),
]


@pytest.mark.parametrize("page,token,status,code,heading", BAD)
def test_bad_links_get_a_clear_page_and_change_nothing(client, links, session_factory, page, token, status, code,
                                                       heading):
    raw = links.get(token, token)
    before = _token_rows(session_factory)
    resp = client.get(f"/{page}/{raw}")
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("text/html")
    assert heading in resp.text
    assert resp.headers["referrer-policy"] == "no-referrer" and resp.headers["cache-control"] == "no-store"
    assert "client_secret" not in resp.text and "Stripe(" not in resp.text

    resp = client.post(f"/{page}/{raw}/complete", json={})
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code
    assert _token_rows(session_factory) == before  # not opened, not used, nothing else
    with session_factory() as s:
        assert s.get(Charge, links["charge_id"]).status == "authentication_required"


def _token_rows(session_factory):
    with session_factory() as s:
        return sorted((r.id, r.opened_at, r.used_at) for r in s.scalars(select(RecoveryToken)))


def test_complete_refuses_a_body_with_fields(client, links):
    resp = client.post(f"/recover/{links['recover']}/complete", json={"paid": True})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_request"


def test_settled_charge_has_nothing_to_pay(client, links, session_factory):
    with session_factory() as s:
        s.get(Charge, links["charge_id"]).status = "void"
        s.commit()
    resp = client.get(f"/recover/{links['recover']}")
    assert resp.status_code == 410 and "Nothing to pay" in resp.text


def test_without_a_publishable_key_the_pages_say_so(app_env, links, monkeypatch):
    from billing.web.app import create_app

    monkeypatch.delenv("BILLING_STRIPE_PUBLISHABLE_KEY", raising=False)
    _reset_process_caches()
    with TestClient(create_app()) as c:
        for page in ("setup", "recover"):
            resp = c.get(f"/{page}/{links[page]}")
            assert resp.status_code == 503 and "unavailable" in resp.text


def test_openapi_describes_the_pages(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for page in ("setup", "recover"):
        get = paths[f"/{page}/{{token}}"]["get"]
        assert "text/html" in get["responses"]["200"]["content"]
        assert {"404", "410", "503"} <= set(get["responses"])
        post = paths[f"/{page}/{{token}}/complete"]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" in str(post["responses"]["200"]["content"]["application/json"]["schema"])
        for status in ("404", "410", "503"):
            schema = post["responses"][status]["content"]["application/json"]["schema"]
            assert schema["$ref"] == "#/components/schemas/ErrorBody"
    schemas = spec["components"]["schemas"]
    assert {"SetupCompleteOut", "RecoveryCompleteOut", "CompleteIn"} <= set(schemas)


# --- the page's return against the sandbox ---------------------------------------------------------

def _waiting_charge(sandbox, card: str) -> tuple[int, str]:
    """A customer with ``card`` saved (3DS completed) whose first period failed off-session."""
    customer = enrolment.create_customer("pages@example.com", "Pages")
    view = enrolment.create_card_setup(customer.id, card)
    if view.setup.status == "requires_action":
        sandbox.control.complete_3ds(view.setup.setup_intent_id)
        enrolment.refresh_card_setup(view.setup.setup_intent_id)
    enrolment.create_subscription(customer.id, 2500, "eur", "month", start_at=datetime.now(UTC) - timedelta(minutes=1))
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    charging.process_charge(charge_id)
    with charging_session() as s:
        sub_customer = s.get(Subscription, s.get(Charge, charge_id).subscription_id).customer_id
        token = recovery.issue_token(s, customer_id=sub_customer, purpose="recover", charge_id=charge_id)
        s.commit()
    return charge_id, token


def charging_session():
    from billing.db import _session_factory

    return _session_factory()()


def _pay_in_browser(sandbox, page: customer_pages.RecoveryPage) -> None:
    """What Stripe.js does for the saved-card option: confirm with the publishable key, pass 3DS."""
    pi_id = page.client_secret.split("_secret_")[0]
    resp = httpx.post(f"{sandbox.url}/v1/payment_intents/{pi_id}/confirm", data={
        "key": PK, "client_secret": page.client_secret, "payment_method": page.saved_payment_method})
    assert resp.status_code == 200, resp.text
    if resp.json()["status"] == "requires_action":
        sandbox.control.complete_3ds(pi_id)


def test_concurrent_page_returns_and_a_staff_retry_apply_the_payment_once(pages_env, sandbox, session_factory):
    charge_id, token = _waiting_charge(sandbox, "pm_card_authenticationRequired")
    page = customer_pages.open_recovery(token)
    assert page.charge_status == "authentication_required" and page.payable
    _pay_in_browser(sandbox, page)

    results: list = []

    def complete():
        results.append(customer_pages.complete_recovery(token))

    threads = [threading.Thread(target=complete) for _ in range(4)]
    # A staff "retry now" at the same moment: it must not charge again nor undo the payment.
    threads.append(threading.Thread(target=lambda: results.append(charging.process_charge(charge_id, manual=True))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes = [r for r in results if isinstance(r, customer_pages.RecoveryOutcome)]
    assert len(outcomes) == 4
    assert any(o.paid for o in outcomes)
    assert all(o.paid or o.busy for o in outcomes)
    # Whatever ran last, the charge is paid once: one successful charge, the links used up.
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        assert charge.status == "paid" and charge.paid_at is not None
        assert all(r.used_at for r in s.scalars(select(RecoveryToken).where(RecoveryToken.charge_id == charge_id)))
        kinds = [n.kind for n in s.scalars(select(Notification).where(Notification.charge_id == charge_id,
                                                                      Notification.status != "dropped"))]
    assert kinds == ["authentication_required"]
    assert [e["payment_intent"] for e in sandbox.control.ledger()] == [charge.payment_intent_id]
    # The page's return after that still reports the payment (the link was used up by it).
    again = customer_pages.complete_recovery(token)
    assert again.paid and again.charge_status == "paid"
    # And opening the link now is a used link.
    with pytest.raises(recovery.TokenError):
        customer_pages.open_recovery(token)


def test_page_return_leaves_a_busy_charge_to_the_webhook(pages_env, sandbox, session_factory):
    charge_id, token = _waiting_charge(sandbox, "pm_card_authenticationRequired")
    _pay_in_browser(sandbox, customer_pages.open_recovery(token))
    with charging.lease(charge_id) as ours:
        assert ours
        out = customer_pages.complete_recovery(token)
    assert out.busy and not out.paid
    with session_factory() as s:
        assert s.get(Charge, charge_id).status == "authentication_required"
    assert customer_pages.complete_recovery(token).paid


def test_failed_authentication_is_shown_and_changes_nothing(pages_env, sandbox, session_factory):
    charge_id, token = _waiting_charge(sandbox, "pm_card_authenticationRequired")
    page = customer_pages.open_recovery(token)
    pi_id = page.client_secret.split("_secret_")[0]
    httpx.post(f"{sandbox.url}/v1/payment_intents/{pi_id}/confirm", data={
        "key": PK, "client_secret": page.client_secret, "payment_method": page.saved_payment_method})
    sandbox.control.fail_3ds(pi_id)
    out = customer_pages.complete_recovery(token)
    assert not out.paid and out.error_code == "payment_intent_authentication_failure"
    with session_factory() as s:
        assert s.get(Charge, charge_id).status == "authentication_required"
        row = s.scalars(select(RecoveryToken).where(RecoveryToken.charge_id == charge_id)).one()
        assert row.used_at is None and row.opened_at is not None
    # The customer can try again on the same page.
    assert customer_pages.open_recovery(token).payable


def test_new_card_paid_on_the_page_becomes_default_through_the_webhook_alone(pages_env, sandbox, session_factory):
    """The customer pays with a new card and closes the tab: the page never reports back, and the
    payment_intent.succeeded webhook must both settle the charge and make that card the default."""
    from billing import webhooks
    from billing.models import Customer, PaymentMethod
    from tests.stripe_events import event

    charge_id, token = _waiting_charge(sandbox, "pm_card_authenticationRequired")
    page = customer_pages.open_recovery(token)
    pi_id = page.client_secret.split("_secret_")[0]
    resp = httpx.post(f"{sandbox.url}/v1/payment_intents/{pi_id}/confirm", data={
        "key": PK, "client_secret": page.client_secret, "payment_method": "pm_card_visa",
        "setup_future_usage": "off_session"})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    paid_with = resp.json()["payment_method"]

    row = webhooks.accept(event("payment_intent.succeeded", resp.json()), enqueue=lambda _id: None).event_row_id
    assert webhooks.process(row) == "applied"
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        customer = s.get(Customer, s.get(Subscription, charge.subscription_id).customer_id)
        default = s.get(PaymentMethod, customer.default_payment_method_id)
        sub = s.get(Subscription, charge.subscription_id)
        assert charge.status == "paid"
        assert default.stripe_payment_method_id == paid_with and sub.payment_method_id == default.id
    # The same event again changes nothing (the card is the default already).
    assert webhooks.process(row) == "already_processed"
