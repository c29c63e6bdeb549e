"""Markup in a customer's name, in a real browser: the console shows it as text and runs nothing, and
the pages work under their Content-Security-Policy (no violation reported by Chromium)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from billing import staff
from billing.db import unit_of_work
from tests import factories
from tests.e2e.conftest import free_port, product_env, start_web, stop_web
from tests.finance import support

pytestmark = pytest.mark.usefixtures("clean_db")

NAME = '<script>window.__xss = 1</script>"><img src=x onerror="window.__xss = 2">'


class Watch:
    """What the page did that it must not: dialogs opened, CSP violations reported."""

    def __init__(self, page):
        self.dialogs: list[str] = []
        self.violations: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: "Content Security Policy" in m.text and self.violations.append(m.text))

    def assert_quiet(self, page) -> None:
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert not self.dialogs and not self.violations, (self.dialogs, self.violations)


def test_a_script_named_customer_in_the_queue_runs_nothing(sandbox_stack, browser, database_url):
    support.truncate_staff(database_url)
    staff.add_staff(support.OPERATOR, support.PASSWORD, "operator")
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session, name=NAME, email="xss@example.com")
        factories.make_payment_method(uow.session, customer)
        sub = factories.make_subscription(uow.session, customer)
        charge = factories.make_charge(uow.session, sub, status="requires_payment_method", attempts=1,
                                       last_error_code="card_declined", last_decline_code="insufficient_funds",
                                       first_failed_at=datetime.now(UTC))
        uow.commit()
        charge_id = charge.id

    context = browser.new_context()
    page = context.new_page()
    watch = Watch(page)
    try:
        page.goto(f"{sandbox_stack.web.url}/finance/queue")
        page.fill("input[name=email]", support.OPERATOR)
        page.fill("input[name=password]", support.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/finance/queue"))
        assert NAME in page.locator("table.queue tbody").inner_text()
        assert page.locator("table.queue img").count() == 0
        page.goto(f"{sandbox_stack.web.url}/finance/charges/{charge_id}")
        assert NAME in page.locator("main").inner_text()
        page.goto(f"{sandbox_stack.web.url}/finance/overview")
        watch.assert_quiet(page)
    finally:
        context.close()


def test_the_setup_page_works_under_its_policy(sandbox_stack, browser_page):
    api = sandbox_stack.web.api()
    customer = api.post("/api/customers", json={"email": "ada@example.com", "name": NAME})
    assert customer.status_code == 201, customer.text
    setup = api.post(f"/api/customers/{customer.json()['id']}/card-setups", json={}).json()
    page = browser_page.page
    watch = Watch(page)
    page.goto(setup["setup_url"])
    assert NAME in page.locator("main").inner_text()
    page.locator("#card-element input").fill("4242 4242 4242 4242")
    page.locator("#save-card").click()
    page.locator("#result.ok").wait_for()
    watch.assert_quiet(page)


def test_api_docs_render_from_bundled_files_under_the_policy(app_env, browser_page, tmp_path):
    from billing.web import docs

    if docs.swagger_ui_dir() is None:
        pytest.skip("swagger-ui-py is not installed")
    port = free_port()
    with product_env(app_env, {"BILLING_API_DOCS": "true"}) as env:
        web = start_web(env, port, tmp_path)
        try:
            page = browser_page.page
            watch = Watch(page)
            page.goto(f"{web.url}/docs")
            page.locator("#swagger-ui .info .title").wait_for()
            assert "Billing" in page.locator("#swagger-ui .info .title").inner_text()
            watch.assert_quiet(page)
            outside = [u for u in browser_page.urls if not u.startswith(web.url)]
            assert not outside, outside
        finally:
            stop_web(web)
