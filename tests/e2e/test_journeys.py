"""The customer journeys in a real browser, against the sandbox: saving a 3-D Secure card on /setup,
an off-session failure, the emailed link, and paying on /recover (authenticating, or a new card).

What is asserted is what the customer and finance see: the page's result, the charge and
subscription statuses, the saved card, and the sandbox's ledger of successful charges (where "charged
twice" would show). No client secret may appear in a URL the browser requested or in a log line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from billing import charging, notifications
from billing.models import Charge, Customer, Notification, PaymentMethod, RecoveryToken, Subscription, WebhookEvent
from tests.e2e.conftest import UI_TIMEOUT_MS, assert_no_secrets, recovery_link, wait_until

pytestmark = pytest.mark.usefixtures("clean_db")

DOCS = Path(__file__).resolve().parents[2] / "docs"
FRAME = "iframe[name=__sandboxStripe3DS]"


def enqueue(charge_id: int) -> None:
    from workers.tasks import enqueue_charge

    enqueue_charge(charge_id)


def new_customer(api, email: str) -> int:
    resp = api.post("/api/customers", json={"email": email, "name": "Ada Lovelace", "country": "DE"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def subscribe(api, customer_id: int, amount: int = 2500, currency: str = "eur") -> int:
    resp = api.post("/api/subscriptions", json={"customer_id": customer_id, "amount": amount, "currency": currency,
                                                "interval": "month"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def charge_fails(session_factory, status: str) -> Charge:
    """Run billing now (a real worker charges off-session) and wait for the expected failure."""
    [charge_id] = charging.run_due(enqueue=enqueue).created

    def settled():
        with session_factory() as s:
            charge = s.get(Charge, charge_id)
            return charge if charge.status not in ("pending", "processing") else None

    charge = wait_until(settled, timeout=60, message="the off-session charge to settle")
    assert charge.status == status, charge.last_error_code
    return charge


def emailed_link(smtp_server, web_url: str) -> str:
    assert notifications.relay_due().sent >= 1
    [message] = smtp_server.wait_for(1)
    return recovery_link(message, web_url)


def three_d_secure(page, outcome: str = "complete") -> None:
    page.frame_locator(FRAME).locator(f"#{outcome}").click()


def settle_webhooks(session_factory, payment_intent_id: str) -> None:
    """Wait until the worker has processed the payment_intent.succeeded webhook (the other path)."""
    def processed():
        with session_factory() as s:
            rows = s.scalars(select(WebhookEvent).where(WebhookEvent.object_id == payment_intent_id,
                                                        WebhookEvent.type == "payment_intent.succeeded")).all()
            return rows and all(r.processed_at is not None for r in rows)

    wait_until(processed, timeout=60, message="the payment_intent.succeeded webhook to be processed")


def test_3ds_card_saved_then_authentication_required_then_authenticated_on_recover(
        sandbox_stack, sandbox, smtp_server, browser_page, session_factory):
    api = sandbox_stack.web.api()
    page = browser_page.page
    customer_id = new_customer(api, "ada@example.com")

    # 1. The customer saves a card that always wants 3-D Secure, on the hosted setup page.
    setup = api.post(f"/api/customers/{customer_id}/card-setups", json={})
    assert setup.status_code == 201, setup.text
    setup = setup.json()
    assert setup["status"] == "requires_payment_method" and setup["client_secret"]
    assert setup["setup_url"].startswith(f"{sandbox_stack.web.url}/setup/")
    page.goto(setup["setup_url"])
    page.locator("#card-element input").fill("4000 0027 6000 3184")
    page.locator("#save-card").click()
    three_d_secure(page)
    page.locator("#result.ok").wait_for()
    assert "ending in 3184 is saved" in page.locator("#result").inner_text()
    card = api.get(f"/api/card-setups/{setup['setup_intent_id']}").json()
    assert card["status"] == "succeeded" and card["payment_method"]["last4"] == "3184"
    # The same link cannot be used again.
    assert api.get(setup["setup_url"].removeprefix(sandbox_stack.web.url)).status_code == 410

    # 2. The subscription falls due; off-session, the issuer wants authentication.
    sub_id = subscribe(api, customer_id)
    charge = charge_fails(session_factory, "authentication_required")
    assert charge.last_error_code == "authentication_required"
    assert api.get(f"/api/subscriptions/{sub_id}").json()["status"] == "past_due"

    # 3. The emailed link opens the recovery page: amount, period, merchant, the saved card.
    link = emailed_link(smtp_server, sandbox_stack.web.url)
    page.goto(link)
    page.locator("#pay-saved").wait_for()
    assert page.locator("#amount").inner_text() == "€25.00"
    assert "Acme Streaming" in page.locator(".merchant").inner_text()
    assert charge.period_start.date().isoformat() in page.locator("#period").inner_text()
    assert "ending in 3184" in page.locator("#saved-card").inner_text()
    with session_factory() as s:
        assert s.scalars(select(RecoveryToken.opened_at).where(RecoveryToken.charge_id == charge.id)).one()
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "recover.png"), full_page=True)

    # 4. The customer authenticates that same PaymentIntent with the saved card.
    page.locator("#pay-saved").click()
    three_d_secure(page)
    page.locator("#result.ok").wait_for()
    assert "payment of €25.00 is complete" in page.locator("#result").inner_text()

    settle_webhooks(session_factory, charge.payment_intent_id)
    subscription = api.get(f"/api/subscriptions/{sub_id}").json()
    assert subscription["status"] == "active"
    [paid] = subscription["charges"]
    assert paid["status"] == "paid" and paid["payment_intent_id"] == charge.payment_intent_id
    # Exactly one successful charge in Stripe, for that PaymentIntent.
    assert [e["payment_intent"] for e in sandbox.control.ledger()] == [charge.payment_intent_id]
    assert_one_email_then_quiet(session_factory, charge.id)
    with session_factory() as s:
        assert s.scalars(select(RecoveryToken.used_at).where(RecoveryToken.charge_id == charge.id)).one()
    # The used link now gets a clear page and a 4xx.
    page.goto(link)
    assert "already been used" in page.locator("#error-heading").inner_text()
    assert api.get(link.removeprefix(sandbox_stack.web.url)).status_code == 410

    assert_no_secrets(browser_page.urls, sandbox_stack.logs())


def test_declined_card_replaced_on_recover_by_a_new_card_that_becomes_the_default(
        sandbox_stack, sandbox, smtp_server, browser_page, session_factory):
    api = sandbox_stack.web.api()
    page = browser_page.page
    customer_id = new_customer(api, "grace@example.com")
    # A card saved fine (server-side) whose issuer declines it later.
    setup = api.post(f"/api/customers/{customer_id}/card-setups", json={"payment_method": "pm_card_visa"}).json()
    assert setup["status"] == "succeeded"
    old_pm = api.get(f"/api/card-setups/{setup['setup_intent_id']}").json()["payment_method"]["id"]
    sandbox.control.decline_later(old_pm, "insufficient_funds")
    sub_id = subscribe(api, customer_id, amount=1500, currency="jpy")
    charge = charge_fails(session_factory, "requires_payment_method")
    assert charge.last_decline_code == "insufficient_funds"

    page.goto(emailed_link(smtp_server, sandbox_stack.web.url))
    page.locator("#pay-new").wait_for()
    assert page.locator("#amount").inner_text() == "¥1,500"  # zero-decimal currency
    assert page.locator("#reason").is_visible()
    # A new card that asks for 3-D Secure on-session; saved for off-session use while paying.
    page.locator("#card-element input").fill("4000002500003155")
    page.locator("#pay-new").click()
    three_d_secure(page)
    page.locator("#result.ok").wait_for(timeout=UI_TIMEOUT_MS)
    result = page.locator("#result").inner_text()
    assert "¥1,500 is complete" in result and "ending in 3155 is saved" in result

    settle_webhooks(session_factory, charge.payment_intent_id)
    subscription = api.get(f"/api/subscriptions/{sub_id}").json()
    assert subscription["status"] == "active"
    assert [c["status"] for c in subscription["charges"]] == ["paid"]
    ledger = sandbox.control.ledger()
    assert len(ledger) == 1 and ledger[0]["payment_intent"] == charge.payment_intent_id
    assert_one_email_then_quiet(session_factory, charge.id)
    new_pm = ledger[0]["payment_method"]
    assert new_pm != old_pm
    with session_factory() as s:
        customer = s.get(Customer, customer_id)
        default = s.get(PaymentMethod, customer.default_payment_method_id)
        assert (default.stripe_payment_method_id, default.last4) == (new_pm, "3155")
        assert s.get(Subscription, sub_id).payment_method_id == default.id
    # The new card now works off-session (it was set up for it): the next period is charged.
    with session_factory() as s:
        s.get(Subscription, sub_id).next_charge_at = s.get(Subscription, sub_id).next_charge_at.replace(year=2000)
        s.commit()
    [next_charge] = charging.run_due(enqueue=enqueue).created
    wait_until(lambda: _status(session_factory, next_charge) == "paid", timeout=60, message="the next period paid")

    assert_no_secrets(browser_page.urls, sandbox_stack.logs())


def assert_one_email_then_quiet(session_factory, charge_id: int) -> None:
    """The failure email went once; paying dropped the scheduled reminders; nothing else was written
    (no second failure email, no duplicate from the page and the webhook both applying)."""
    with session_factory() as s:
        rows = s.execute(select(Notification.kind, Notification.status)
                         .where(Notification.charge_id == charge_id)).all()
    sent = [kind for kind, status in rows if status == "sent"]
    assert len(sent) == 1 and sent[0] in ("authentication_required", "payment_failed"), rows
    assert all(status == "dropped" for kind, status in rows if kind == "reminder"), rows
    assert not [kind for kind, status in rows if status == "pending"], rows


def _status(session_factory, charge_id: int) -> str:
    with session_factory() as s:
        return s.get(Charge, charge_id).status
