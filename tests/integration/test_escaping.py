"""Markup typed by customers or staff arrives as text, on every page and in every HTML email, and every
HTML response carries the browser headers (CSP, no framing, nosniff, no referrer, no caching).

Two layers: each template rendered on its own with hostile values in every field a person can type
(the list of templates is read from the template folders, so a new template without a case here fails
``test_every_template_has_a_case``); then the real pages over HTTP, with a customer whose name is a
script, staff reasons and filter fields that are scripts, and the login's ``next``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import quote, urlencode

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from billing import charging, customer_pages, enrolment, finance, recovery, templating
from billing import queue as queue_mod
from billing.models import Charge, Customer, PaymentMethod, Subscription
from billing.web import charts, security
from tests import factories
from tests.finance import support
from tests.integration.billing_helpers import api_key_headers

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror=alert(1)>'
PAYLOADS = (SCRIPT, ATTRIBUTE)
# Included by the others (extends / import), so rendered with each of them.
PARTIALS = {"email/_layout.html.j2", "email/_macros.html.j2", "pages/_layout.html.j2", "finance/base.html.j2"}
NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


# --- what "escaped" means --------------------------------------------------------------------------

class _Elements(HTMLParser):
    """Every start tag and its attributes, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_inert(html: str, *, must_show: tuple[str, ...] = PAYLOADS) -> None:
    """No payload as markup: no inline script, no event-handler attribute, no ``<img>`` at all; and each
    payload in ``must_show`` present in its escaped form (the field was rendered, as text)."""
    for payload in PAYLOADS:
        assert payload not in html, f"unescaped {payload!r} in:\n{_around(html, payload)}"
    parser = _Elements()
    parser.feed(html)
    for tag, attrs in parser.tags:
        assert tag != "img", attrs
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        if tag == "script":
            assert attrs.get("src") or attrs.get("type") == "application/json", f"inline script: {attrs}"
    for payload in must_show:
        assert str(escape(payload)) in html, f"{payload!r} was not rendered (escaped) at all"


def _around(text: str, needle: str) -> str:
    i = text.find(needle)
    return text[max(0, i - 300):i + 300]


# --- every template, on its own --------------------------------------------------------------------

def _hostile_filter() -> queue_mod.QueueFilter:
    return queue_mod.QueueFilter(decline_code=SCRIPT + ATTRIBUTE)


def _queue_row(**kw) -> queue_mod.QueueRow:
    values = dict(charge_id=7, subscription_id=3, customer_email=ATTRIBUTE + "@example.com", amount=2500,
                  currency="eur", status="requires_payment_method", attempts=2, last_error_code="card_declined",
                  last_decline_code=SCRIPT, next_retry_at=NOW, retry_paused=False, notified_at=NOW,
                  customer_name=SCRIPT + ATTRIBUTE, explanation=ATTRIBUTE, last_emailed_at=NOW,
                  recovery_opened_at=NOW, card_country="DE", previous_authorization=True, created_at=NOW,
                  subscription_status="past_due")
    return queue_mod.QueueRow(**{**values, **kw})


def _charge_detail() -> finance.ChargeDetail:
    customer = Customer(id=1, email=ATTRIBUTE + "@example.com", name=SCRIPT + ATTRIBUTE, country="DE",
                        stripe_customer_id="cus_" + ATTRIBUTE)
    sub = Subscription(id=3, customer_id=1, amount=2500, currency="eur", interval="month", status="past_due")
    charge = Charge(id=7, subscription_id=3, amount=2500, currency="eur", status="requires_payment_method",
                    period_start=NOW, period_end=NOW + timedelta(days=30), attempts=2, retry_paused=True,
                    last_error_code="card_declined", last_decline_code=SCRIPT, last_advice_code=ATTRIBUTE,
                    next_retry_at=NOW, notified_at=NOW, payment_intent_id="pi_" + SCRIPT)
    card = PaymentMethod(id=4, customer_id=1, stripe_payment_method_id="pm_x", brand=SCRIPT, last4="4242",
                         country="DE", mandate_id=None, previous_authorization=True, saved_at=NOW)
    events = [finance.Event(NOW, "staff", "Voided by " + ATTRIBUTE, "reason: " + SCRIPT + ATTRIBUTE,
                            ids=(SCRIPT,))]
    actions = {action: (ATTRIBUTE if action == finance.Action.void else None) for action in finance.Action}
    return finance.ChargeDetail(charge=charge, subscription=sub, customer=customer, card=card, attempts=[],
                                events=events, explanation=SCRIPT, actions=actions)


def _overview() -> finance.Overview:
    outcomes = {"recovered": 1, "waiting": 2, "lost": 1}
    return finance.Overview(totals=[("requires_payment_method", "eur", 3, 7500)],
                            weekly=[(NOW, 4, 1)], by_decline=[(SCRIPT + ATTRIBUTE, outcomes)],
                            by_country=[(ATTRIBUTE, outcomes)], previous_authorization=[("eur", 1, 2500)],
                            previous_authorization_failed=1)


def _signed_in():
    staff_user = SimpleNamespace(email=ATTRIBUTE + "@example.com", role="operator", can_act=True)
    return SimpleNamespace(staff=staff_user, csrf_token=ATTRIBUTE, session_id=1)


def _finance(**values):
    return {"me": _signed_in(), "prefix": "/finance", "active": None, "action_labels": finance.ACTION_LABELS,
            **values}


def _email(**values):
    return {"customer_name": SCRIPT + ATTRIBUTE, "merchant_name": ATTRIBUTE, "amount": 2500, "currency": "eur",
            "last4": "4242", "card_brand": SCRIPT, "decline_explanation": SCRIPT + ATTRIBUTE,
            "period_start": "2026-03-01", "period_end": "2026-04-01", "charge_status": "requires_payment_method",
            "subscription_status": "past_due", "link": "https://billing.test/recover/abc", **values}


def _recovery_page(**kw) -> customer_pages.RecoveryPage:
    values = dict(charge_id=7, charge_status="authentication_required", customer_name=SCRIPT + ATTRIBUTE,
                  merchant_name=ATTRIBUTE, amount=2500, currency="eur", amount_display="€25.00",
                  period_start="2026-03-01", period_end="2026-04-01",
                  saved_card=customer_pages.CardView(SCRIPT, "4242"), saved_payment_method="pm_x",
                  reason=SCRIPT + ATTRIBUTE, intent_status="requires_payment_method", client_secret="pi_x_secret_y")
    return customer_pages.RecoveryPage(**{**values, **kw})


def _setup_page(**kw) -> customer_pages.SetupPage:
    values = dict(customer_name=SCRIPT + ATTRIBUTE, status="requires_payment_method", client_secret="seti_x_secret_y",
                  card=None, error_code="card_declined", error_message=SCRIPT + ATTRIBUTE)
    return customer_pages.SetupPage(**{**values, **kw})


def _page_data() -> dict:
    # Values a customer can influence reach the script through JSON: they must not close the block.
    return {"publishable_key": "pk_test_x", "client_secret": "pi_x_secret_y", "amount_display": SCRIPT + ATTRIBUTE,
            "saved_payment_method": "pm_x", "status": "requires_payment_method"}


def _pages(**values):
    return {"merchant_name": ATTRIBUTE, "stripe_js_url": "https://js.stripe.com/v3/", "data": _page_data(), **values}


def _cases() -> dict[str, list[dict]]:
    """Template → contexts to render it with (several where branches show different fields)."""
    flt = _hostile_filter()
    result = queue_mod.QueuePage(rows=[_queue_row(), _queue_row(charge_id=8, retry_paused=True)], total=120, page=2,
                                 page_size=50, filter=flt)
    form = {"status": "", "decline_code": SCRIPT + ATTRIBUTE, "country": ATTRIBUTE, "date_from": SCRIPT,
            "date_to": ATTRIBUTE}
    queue_common = dict(statuses=queue_mod.QUEUE_STATUSES, sorts=queue_mod.SORTS, form=form, filter=flt,
                        urlencode=urlencode)
    overview = _overview()
    emails = {}
    for kind in ("authentication_required", "final_notice", "payment_failed", "payment_succeeded", "reminder"):
        emails[f"email/{kind}.html.j2"] = [_email()]
        emails[f"email/{kind}.txt.j2"] = [_email()]
    return {
        **emails,
        "finance/login.html.j2": [_finance(me=None, csrf_token="t", error=SCRIPT + ATTRIBUTE,
                                           email=SCRIPT + ATTRIBUTE, next="/finance/" + SCRIPT + ATTRIBUTE)],
        "finance/error.html.j2": [_finance(title=SCRIPT + ATTRIBUTE, message=SCRIPT + ATTRIBUTE)],
        "finance/queue.html.j2": [
            _finance(**queue_common, result=result, params=flt.as_params(), error=None),
            _finance(**queue_common, result=None, params={}, error="date from must look like 2025-01-31: "
                     + SCRIPT + ATTRIBUTE)],
        "finance/charge.html.j2": [_finance(d=_charge_detail(), notice=SCRIPT + ATTRIBUTE, error=SCRIPT + ATTRIBUTE,
                                            reason=SCRIPT + ATTRIBUTE)],
        "finance/overview.html.j2": [_finance(
            o=overview, dead_emails=2, weekly_chart=charts.recovery_rate(overview.weekly),
            decline_chart=charts.outcome_bars(overview.by_decline, label=SCRIPT + ATTRIBUTE),
            country_chart=charts.outcome_bars(overview.by_country, label=ATTRIBUTE))],
        "pages/error.html.j2": [_pages(heading=SCRIPT + ATTRIBUTE, message=SCRIPT + ATTRIBUTE)],
        "pages/recover.html.j2": [_pages(page=_recovery_page()), _pages(page=_recovery_page(saved_card=None))],
        "pages/setup.html.j2": [
            _pages(page=_setup_page()),
            _pages(page=_setup_page(status="requires_action")),
            _pages(page=_setup_page(status="succeeded", client_secret=None,
                                    card=customer_pages.CardView(SCRIPT + ATTRIBUTE, "4242")), must_show=(SCRIPT,))],
        "docs/swagger.html.j2": [{"title": SCRIPT + ATTRIBUTE, "openapi_url": "/openapi.json", "assets": "/docs/x"}],
    }


CASES = _cases()


def test_every_template_has_a_case():
    assert set(templating.template_names()) == set(CASES) | PARTIALS


@pytest.mark.parametrize("name", sorted(n for n in CASES if not n.endswith(".txt.j2")))
def test_html_template_escapes_what_people_type(name):
    for context in CASES[name]:
        must_show = context.pop("must_show", PAYLOADS)
        html = templating.render(name, context)
        assert_inert(html, must_show=must_show)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.endswith(".txt.j2")))
def test_text_email_parts_are_plain_text(name):
    # A text/plain part is never parsed as HTML: escaping it would only garble a customer's name.
    text = templating.render(name, CASES[name][0])
    assert SCRIPT in text and "&lt;" not in text


def test_recovery_page_data_block_cannot_be_closed_from_inside():
    html = templating.render("pages/recover.html.j2", _pages(page=_recovery_page()))
    block = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in block and ">" not in block  # tojson writes \u003c, \u003e


def test_subjects_stay_plain_text():
    from billing import notifications

    email = notifications.render("payment_failed", {"amount": 100, "currency": "eur"}, link="https://x/recover/t")
    assert "&amp;" not in email.subject and "&lt;" not in email.subject


def test_charts_escape_every_text_they_embed():
    svg = str(charts.outcome_bars([(SCRIPT + ATTRIBUTE, {"recovered": 1, "lost": 2})], label=SCRIPT + ATTRIBUTE))
    assert_inert(svg)
    assert_inert(str(charts.recovery_rate([(NOW, 3, 1)])), must_show=())


# --- the real pages over HTTP --------------------------------------------------------------------------

PK = "pk_test_escaping"


@pytest.fixture
def web(app_env, sandbox, clean_db, database_url, monkeypatch):
    from tests.conftest import reset_process_caches

    monkeypatch.setenv("BILLING_STRIPE_PUBLISHABLE_KEY", PK)
    monkeypatch.setenv("BILLING_STRIPE_JS_URL", f"{sandbox.url}/js/v3/stripe.js")
    reset_process_caches()
    support.truncate_staff(database_url)
    support.add_accounts()
    from billing.web.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client
    monkeypatch.undo()
    reset_process_caches()


@pytest.fixture
def hostile_charge(session_factory) -> int:
    """A customer named and addressed with markup (as if stored before any validation), whose charge
    was declined and voided by an operator with a reason that is markup too."""
    with session_factory() as s:
        customer = factories.make_customer(s, name=SCRIPT + ATTRIBUTE, email=ATTRIBUTE + "@example.com")
        factories.make_payment_method(s, customer, country="DE")
        sub = factories.make_subscription(s, customer)
        charge = factories.make_charge(s, sub, status="requires_payment_method", attempts=1,
                                       last_error_code="card_declined", last_decline_code="insufficient_funds",
                                       first_failed_at=datetime.now(UTC), next_retry_at=datetime.now(UTC))
        s.commit()
        return charge.id


def _signed_in(web):
    assert support.login(web).status_code == 303


def _queue_text(web, **params) -> str:
    resp = web.get("/finance/queue", params=params)
    assert resp.status_code in (200, 400), resp.text
    return resp.text


def test_console_shows_a_script_named_customer_as_text(web, hostile_charge):
    _signed_in(web)
    queue = web.get("/finance/queue")
    assert queue.status_code == 200
    assert_inert(queue.text, must_show=(SCRIPT, ATTRIBUTE + "@example.com"))

    reason = "customer asked: " + SCRIPT + ATTRIBUTE
    assert support.act(web, hostile_charge, "void", reason=reason).status_code == 303
    charge = web.get(f"/finance/charges/{hostile_charge}")
    assert charge.status_code == 200
    assert_inert(charge.text)
    assert str(escape(reason)) in charge.text  # the audit entry, in the timeline

    overview = web.get("/finance/overview")
    assert overview.status_code == 200
    assert_inert(overview.text, must_show=())


def test_filter_fields_are_reflected_as_text(web, hostile_charge):
    _signed_in(web)
    # A decline code is free text: kept in the form and the links, as text.
    assert_inert(_queue_text(web, decline_code=SCRIPT + ATTRIBUTE))
    # Refused filters come back in the form with the error.
    for field in ("country", "date_from", "date_to", "sort", "direction", "status"):
        text = _queue_text(web, **{field: SCRIPT + ATTRIBUTE})
        assert_inert(text, must_show=(SCRIPT,) if field in ("country", "date_from", "date_to") else ())


def test_login_reflects_next_and_email_as_text(web):
    page = web.get("/finance/login", params={"next": "/finance/queue" + ATTRIBUTE + SCRIPT})
    assert page.status_code == 200
    assert_inert(page.text, must_show=(ATTRIBUTE,))
    csrf = support.hidden(page.text)
    wrong = web.post("/finance/login", data={"email": SCRIPT + ATTRIBUTE, "password": "nope", "csrf_token": csrf,
                                             "next": "/finance/" + SCRIPT})
    assert wrong.status_code in (401, 422, 429)
    assert_inert(wrong.text, must_show=())


@pytest.mark.parametrize("target", ["javascript:alert(1)", "//evil.example/", "/\\evil.example", "https://evil.example/",
                                    "/finance/\nx", "/elsewhere", " /finance/queue", "/finance/%0d%0aSet-Cookie:x"])
def test_login_next_goes_nowhere_but_the_console(web, target):
    inside = target.startswith("/finance/") and target.isprintable()
    page = web.get("/finance/login", params={"next": target})
    assert support.hidden(page.text, "next") == (target if inside else "/finance/queue")
    resp = web.post("/finance/login", data={"email": support.OPERATOR, "password": support.PASSWORD,
                                            "csrf_token": support.hidden(page.text), "next": target},
                    follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["location"] == (target if inside else "/finance/queue")


def test_recovery_page_shows_a_script_named_customer_as_text(web, sandbox):
    created = web.post("/api/customers", json={"email": "xss@example.com", "name": SCRIPT + ATTRIBUTE},
                       headers=api_key_headers())
    assert created.status_code == 201, created.text
    customer_id = created.json()["id"]
    setup = enrolment.create_card_setup(customer_id, "pm_card_authenticationRequired")
    if setup.setup.status == "requires_action":
        sandbox.control.complete_3ds(setup.setup.setup_intent_id)
        enrolment.refresh_card_setup(setup.setup.setup_intent_id)
    enrolment.create_subscription(customer_id, 2500, "eur", "month", start_at=datetime.now(UTC) - timedelta(minutes=1))
    [charge_id] = charging.run_due(enqueue=lambda _id: None).created
    charging.process_charge(charge_id)
    from billing.db import unit_of_work

    with unit_of_work() as uow:
        assert uow.session.get(Charge, charge_id).status == "authentication_required"
        token = recovery.issue_token(uow.session, customer_id=customer_id, purpose="recover", charge_id=charge_id)
        uow.commit()
    page = web.get(f"/recover/{token}")
    assert page.status_code == 200, page.text
    assert_inert(page.text, must_show=(SCRIPT,))
    assert f'<script src="{sandbox.url}/js/v3/stripe.js">' in page.text
    csp = _directives(page.headers["content-security-policy"])
    assert csp["script-src"] == ["'self'", sandbox.url] and sandbox.url in csp["frame-src"]


# --- headers --------------------------------------------------------------------------------------------

def _directives(policy: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in policy.split(";")) if d}


def assert_browser_headers(resp, *, stripe_origin: str | None = None) -> None:
    h = resp.headers
    assert h["content-type"].startswith("text/html"), (resp.url, h["content-type"])
    csp = _directives(h["content-security-policy"])
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"] and csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] + ([stripe_origin] if stripe_origin else []), csp["script-src"]
    assert "'unsafe-inline'" not in h["content-security-policy"] and "'unsafe-eval'" not in h["content-security-policy"]
    assert csp["style-src"] == ["'self'"]
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["cache-control"] == "no-store"
    assert h["x-frame-options"] == "DENY"


def test_every_html_route_sends_the_browser_headers(web, hostile_charge, sandbox):
    for path in ("/finance/login", "/finance/nothing-here"):
        assert_browser_headers(web.get(path))
    _signed_in(web)
    for path in ("/finance/queue", "/finance/queue?country=Germany", f"/finance/charges/{hostile_charge}",
                 "/finance/overview", "/finance/charges/999999"):
        assert_browser_headers(web.get(path))
    forged = web.post(f"/finance/charges/{hostile_charge}/actions/void", data={"csrf_token": "x", "reason": "r"})
    assert forged.status_code == 403
    assert_browser_headers(forged)
    # Customer pages, including their error pages: Stripe.js's origin is allowed there, and only there.
    for path in ("/recover/nope", "/setup/nope"):
        resp = web.get(path)
        assert resp.status_code == 404
        assert_browser_headers(resp, stripe_origin=sandbox.url)


def test_json_and_static_responses_are_not_sniffed(web):
    for path in ("/healthz", "/openapi.json", "/api/nothing-here"):
        resp = web.get(path)
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["cache-control"] == "no-store"
        assert "content-security-policy" not in resp.headers
    for path, kind in (("/static/setup.js", "text/javascript"), ("/static/recover.js", "text/javascript"),
                       ("/static/pages.css", "text/css"), ("/finance/static/finance.css", "text/css")):
        resp = web.get(path)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind), path
        assert resp.headers["x-content-type-options"] == "nosniff"
    assert web.get("/static/../settings.py").status_code == 404
    assert web.get("/static/" + quote("../app.py", safe="")).status_code == 404


def test_stripe_js_policy_follows_stripes_guidance():
    policy = _directives(security.customer_page_csp("https://js.stripe.com/v3/"))
    assert policy["script-src"] == ["'self'", "https://js.stripe.com"]
    assert set(policy["frame-src"]) == {"https://js.stripe.com", "https://*.js.stripe.com", "https://hooks.stripe.com"}
    assert policy["connect-src"] == ["'self'", "https://api.stripe.com"]
    stand_in = _directives(security.customer_page_csp("http://127.0.0.1:8420/js.stripe.com/v3/"))
    assert stand_in["script-src"] == stand_in["connect-src"] == ["'self'", "http://127.0.0.1:8420"]
    assert stand_in["frame-src"] == ["http://127.0.0.1:8420"]


def test_docs_are_off_by_default(web):
    for path in ("/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"):
        assert web.get(path).status_code == 404
    assert web.get("/openapi.json").status_code == 200


def test_docs_when_asked_for_are_served_from_the_package(app_env, monkeypatch):
    from billing.web import docs
    from tests.conftest import reset_process_caches

    if docs.swagger_ui_dir() is None:
        pytest.skip("swagger-ui-py is not installed")
    monkeypatch.setenv("BILLING_API_DOCS", "true")
    reset_process_caches()
    try:
        from billing.web.app import create_app

        with TestClient(create_app()) as client:
            page = client.get("/docs")
            assert page.status_code == 200
            assert_browser_headers(page)
            sources = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page.text)
            assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
            for source in sources:
                assert client.get(source).status_code == 200, source
            assert client.get("/redoc").status_code == 404
    finally:
        monkeypatch.undo()
        reset_process_caches()


# --- helpers kept honest ----------------------------------------------------------------------------------

def test_hostile_values_really_are_hostile():
    # The check above would catch each payload if a template printed it raw.
    for payload in PAYLOADS:
        with pytest.raises(AssertionError):
            assert_inert(f"<p>{payload}</p>")
