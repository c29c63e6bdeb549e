"""Journey (a) against localstripe 1.15.10 and its own fake Stripe.js (``/js.stripe.com/v3/``).

localstripe can play: saving a 3-D Secure card with ``confirmCardSetup`` and a card element (its
element has five inputs; its 3DS is a modal with "Complete authentication"), the off-session charge
that needs authentication (localstripe answers it 200 ``requires_action`` rather than Stripe's 402,
which the worker counts as ``authentication_required``), and authenticating that PaymentIntent with
``confirmCardPayment`` on the recovery page (its fake calls the private ``_authenticate`` route),
with ``payment_intent.*`` webhooks to the app.

What it cannot play, and so stays on the sandbox only (``test_journeys.py``):

* journey (b), a new card on ``/recover``: its fake ``confirmCardPayment`` ignores ``payment_method``
  and ``setup_future_usage`` altogether and only authenticates a PaymentIntent already in
  ``requires_action``; a declined card's PaymentIntent is ``requires_payment_method``, which it
  refuses (400). It has no way to decline a card after setup either.
* the server-side setup left in ``requires_action`` finished on ``/setup``: its fake Stripe.js has no
  ``handleNextAction``, and ``confirmCardSetup(secret)`` without data throws in it.
* "exactly once in the ledger": localstripe has no ledger; the PaymentIntent's charges are counted
  instead.
"""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from billing import charging, notifications
from billing.models import Charge, PaymentMethod
from tests.e2e.conftest import (
    PUBLISHABLE_KEY,
    WEBHOOK_SECRET,
    Stack,
    assert_no_secrets,
    free_port,
    product_env,
    recovery_link,
    start_web,
    stop_web,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("clean_db")


@pytest.fixture
def localstripe_stack(app_env, localstripe_process, worker_factory, tmp_path):
    port = free_port()
    extra = {"BILLING_PUBLIC_URL": f"http://127.0.0.1:{port}", "BILLING_STRIPE_API_BASE": localstripe_process.url,
             "BILLING_STRIPE_API_KEY": "sk_test_e2e_localstripe", "BILLING_STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
             "BILLING_STRIPE_JS_URL": f"{localstripe_process.url}/js.stripe.com/v3/",
             "BILLING_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    with product_env(app_env, extra) as env:
        web = start_web(env, port, tmp_path)
        try:
            httpx.post(f"{localstripe_process.url}/_config/webhooks/e2e",
                       data={"url": f"{web.url}/webhooks/stripe", "secret": WEBHOOK_SECRET}).raise_for_status()
            yield Stack(web=web, worker=worker_factory(), stripe_url=localstripe_process.url)
        finally:
            httpx.delete(f"{localstripe_process.url}/_config/webhooks/e2e")
            stop_web(web)


def enqueue(charge_id: int) -> None:
    from workers.tasks import enqueue_charge

    enqueue_charge(charge_id)


def test_3ds_card_then_authentication_on_recover_with_localstripe(localstripe_stack, smtp_server, browser_page,
                                                                  session_factory):
    api = localstripe_stack.web.api()
    page = browser_page.page
    customer_id = api.post("/api/customers", json={"email": "lin@example.com", "name": "Lin"}).json()["id"]
    setup = api.post(f"/api/customers/{customer_id}/card-setups", json={}).json()

    page.goto(setup["setup_url"])
    card = page.locator("#card-element")
    card.get_by_placeholder("number").fill("4000002760003184")
    card.get_by_placeholder("exp_month").fill("12")
    card.get_by_placeholder("exp_year").fill("34")
    card.get_by_placeholder("cvc").fill("123")
    card.get_by_placeholder("postal_code").fill("10115")
    page.locator("#save-card").click()
    page.get_by_role("button", name="Complete authentication").click()
    page.locator("#result.ok").wait_for()
    assert "ending in 3184 is saved" in page.locator("#result").inner_text()
    with session_factory() as s:
        assert s.scalars(select(PaymentMethod.last4)).one() == "3184"

    sub = api.post("/api/subscriptions", json={"customer_id": customer_id, "amount": 2500, "currency": "eur",
                                               "interval": "month"}).json()
    [charge_id] = charging.run_due(enqueue=enqueue).created

    def failed():
        with session_factory() as s:
            charge = s.get(Charge, charge_id)
            return charge if charge.status not in ("pending", "processing") else None

    charge = wait_until(failed, timeout=60, message="the off-session charge to settle")
    assert charge.status == "authentication_required"

    assert notifications.relay_due().sent >= 1
    [message] = smtp_server.wait_for(1)
    page.goto(recovery_link(message, localstripe_stack.web.url))
    assert page.locator("#amount").inner_text() == "€25.00"
    page.locator("#pay-saved").click()
    page.get_by_role("button", name="Complete authentication").click()
    page.locator("#result.ok").wait_for()

    assert api.get(f"/api/subscriptions/{sub['id']}").json()["status"] == "active"
    with httpx.Client(base_url=localstripe_stack.stripe_url, auth=("sk_test_e2e_localstripe", "")) as ls:
        pi = ls.get(f"/v1/payment_intents/{charge.payment_intent_id}").json()
        assert pi["status"] == "succeeded"
        charges = [c for c in pi["charges"]["data"] if c["status"] == "succeeded"]
        assert len(charges) == 1
    with session_factory() as s:
        assert s.get(Charge, charge_id).status == "paid"
    assert_no_secrets(browser_page.urls, localstripe_stack.logs())
