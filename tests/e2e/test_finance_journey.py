"""The finance console in headless Chromium: sign in, filter the queue, open a charge, retry it with
a reason, see it paid (real ``billing web``, real worker, the sandbox). Screenshots of the queue and
the overview go to the test artifacts directory (``TEST_ARTIFACTS_DIR``, default
``.billing/test-artifacts``); with ``FINANCE_DOCS_SCREENSHOTS=1`` they also replace the ones in docs/."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from billing import charging, staff
from billing.db import unit_of_work
from billing.models import Charge, PaymentMethod, Subscription
from tests.e2e.conftest import UI_TIMEOUT_MS
from tests.finance import support
from tests.integration.conftest import ROOT, wait_until
from tests.integration.test_billing_e2e import enrol

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / ".billing" / "test-artifacts"))
DOCS = ROOT / "docs"


def _enqueue(charge_id: int) -> None:
    from workers.tasks import enqueue_charge

    enqueue_charge(charge_id)


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("FINANCE_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)
    return path


def test_finance_staff_retry_a_declined_charge_in_the_browser(sandbox_stack, sandbox, session_factory, browser,
                                                              clean_db, database_url):
    # A demo-like queue, plus one real customer whose card the issuer declines for now.
    support.truncate_staff(database_url)
    staff.add_staff(support.OPERATOR, support.PASSWORD, "operator")
    with unit_of_work() as uow:
        support.seed_queue(uow.session)
        uow.commit()
    sub_id = enrol(session_factory, sandbox, "pm_card_visa", email="zoe.zhang@example.com", amount=3900,
                   declines_later="insufficient_funds")
    charging.run_due(enqueue=_enqueue)

    def charge() -> Charge:
        with unit_of_work() as uow:
            return uow.session.scalars(select(Charge).where(Charge.subscription_id == sub_id)).one()

    wait_until(lambda: charge().status == "requires_payment_method", 60, message="the first attempt declined")
    charge_id = charge().id

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        url = sandbox_stack.web.url
        page.goto(f"{url}/finance/queue")
        assert "/finance/login" in page.url
        page.fill("input[name=email]", support.OPERATOR)
        page.fill("input[name=password]", support.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/finance/queue"))
        assert page.locator("table.queue tbody tr").count() >= 9
        queue_shot = _screenshot(page, "finance-queue.png")

        page.select_option("select[name=status]", "requires_payment_method")
        page.fill("input[name=decline_code]", "insufficient_funds")
        page.click("#filters button[type=submit]")
        page.wait_for_url(re.compile(r"decline_code=insufficient_funds"))
        rows = page.locator("table.queue tbody tr")
        assert rows.count() == 2  # Zoe, and Ada from the seeded queue
        assert "zoe.zhang@example.com" in page.content()

        page.click(f"a[href='/finance/charges/{charge_id}']")
        page.wait_for_url(re.compile(rf"/finance/charges/{charge_id}$"))
        assert page.locator("#charge-status").inner_text() == "requires payment method"

        with unit_of_work() as uow:
            sub = uow.session.get(Subscription, sub_id)
            pm = uow.session.get(PaymentMethod, sub.payment_method_id).stripe_payment_method_id
        sandbox.control.decline_later(pm, None)
        page.fill("textarea[name=reason]", "customer topped up the account; asked us to try again")
        page.click("button[value=retry_now]")
        page.wait_for_url(re.compile(r"done=retry_now"))
        assert "A retry is on its way" in page.content()

        deadline = time.monotonic() + 60
        while page.locator("#charge-status").inner_text() != "paid":
            assert time.monotonic() < deadline, "the charge never showed as paid"
            time.sleep(0.5)
            page.reload()
        timeline = page.locator("ol.timeline").inner_text()
        assert "Retry now — by olga.operator@example.com" in timeline and "Attempt 2: succeeded" in timeline

        page.click("nav a[href='/finance/overview']")
        page.wait_for_url(re.compile(r"/finance/overview"))
        assert page.locator("svg.chart").count() == 3
        overview_shot = _screenshot(page, "finance-overview.png")
        page.goto(f"{url}/finance/queue")
        _screenshot(page, "finance-queue.png")
        assert queue_shot.stat().st_size > 10_000 and overview_shot.stat().st_size > 10_000
    finally:
        context.close()
