"""Attacks on the running product, written down: each test is one thing an attacker tries.

The app is the real one (``billing.web.app.create_app``) on the real PostgreSQL, Redis, Stripe sandbox
and SMTP server; two tests start a real ``billing web`` (uvicorn) for what only a socket can do
(stalled bodies). Every test asserts the *safe* answer: an attack the product withstands is a passing
guard against regressions; one that gets through fails until it is fixed. Tests that try many variants
collect every variant that got through and report them together.

Areas, in order:

- **auth**: every route of the app walked for what answers without a key; HEAD/OPTIONS and other
  methods, trailing slashes and path tricks; key format tricks (casing, whitespace, length, non-ASCII,
  two headers, the hash or prefix instead of the key, a key in the query string); a ``read`` key
  writing through method-override headers; a revoked key; keys and ``client_secret`` in logs or URLs;
  ``/metrics``, ``/docs`` and the console's routes; CORS; the Host header in redirects.
- **escaping**: hostile values from customers (name, email), from Stripe (card brand, last four,
  decline codes), from the merchant's settings (name, publishable key), into pages, JSON data blocks,
  emails and the console's CSV export (formula injection); header injection into emails (To, From,
  Subject, RFC 2047 encoded-words, long display names) and HTTP responses (CRLF); browser headers on
  every kind of response (404/405/413/422/500, console error pages, static files); the pages' scripts.
- **input**: oversized and odd values in every field, Unicode tricks (bidi controls, zero-width,
  IDN and non-ASCII addresses), NUL in paths, headers, cookies and JSON keys, non-ASCII tokens,
  numbers and dates in every disguise, duplicate keys, deep nesting, bodies just over the caps,
  stalled bodies on a real server, content-type tricks, webhooks signed but odd, replayed or out of
  tolerance.
- **login**: concurrent guessing from one and from many addresses (``X-Forwarded-For`` with and
  without ``BILLING_TRUSTED_PROXIES``), account enumeration by message, status, cookies, slow-down or
  time, session fixation, logged-out cookies, CSRF on every console POST, open redirects after login.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import re
import socket
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from billing import apikeys, finance, recovery, staff
from billing.db import unit_of_work
from billing.models import AuditEntry, CardSetup, Charge, Customer, Notification, PaymentMethod, Subscription
from billing.notifications import relay_due
from billing.web import limits
from tests import factories, stripe_events
from tests.finance import support
from tests.integration.billing_helpers import api_key_headers
from tests.integration.conftest import SmtpSink, free_port
from tests.integration.test_input_edge import _rss, web_server
from tests.integration.test_notifications import make_charge, put
from tests.integration.test_outbox_failures import serving

pytestmark = pytest.mark.usefixtures("clean_db")

SCRIPT = "<script>alert(1)</script>"
BREAKOUT = "</script><script>alert(1)</script>\u2028\u2029<!--"
ATTRIBUTE = '"><img src=x onerror=alert(1)>'
PK = "pk_test_attacks"
PUBLIC_URL = "http://billing.test"
JSON = {"Content-Type": "application/json"}
# Routes that answer without an API key or a staff session by design (SPEC "HTTP"): the webhook (its
# signature), the customer pages and their static files (their token), health, the OpenAPI document.
PUBLIC_BY_DESIGN = {
    ("GET", "/openapi.json"), ("POST", "/webhooks/stripe"), ("GET", "/setup/{token}"),
    ("POST", "/setup/{token}/complete"), ("GET", "/recover/{token}"), ("POST", "/recover/{token}/complete"),
    ("GET", "/static/{name}"), ("GET", "/healthz"),
}
# Guarded by something other than the API key, with tests of their own below.
GUARDED_ELSEWHERE = {("GET", "/metrics")}
CONSOLE_PUBLIC = {("GET", "/finance/login"), ("POST", "/finance/login"), ("GET", "/finance/static/finance.css")}
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


# --- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture
def env(app_env, sandbox):
    """The product's environment for these tests (applied to this process)."""
    from tests.conftest import environ_applied

    values = {**app_env, "BILLING_STRIPE_PUBLISHABLE_KEY": PK, "BILLING_STRIPE_WEBHOOK_SECRET": stripe_events.SECRET,
              "BILLING_STRIPE_JS_URL": f"{sandbox.url}/js/v3/stripe.js", "BILLING_PUBLIC_URL": PUBLIC_URL}
    with environ_applied(values):
        yield values


@pytest.fixture
def accounts(env, database_url):
    """The console's two accounts (an operator and a viewer), no failed sign-ins on record."""
    support.truncate_staff(database_url)
    support.add_accounts()


class Enqueued(list):
    """Webhook events handed on for processing (instead of to Celery)."""

    def __call__(self, row_id: int) -> None:
        self.append(row_id)


@pytest.fixture
def enqueued() -> Enqueued:
    return Enqueued()


def make_app(enqueued: Enqueued | None = None):
    from billing.web import webhooks as webhook_routes
    from billing.web.app import create_app

    app = create_app()
    recorder = enqueued if enqueued is not None else Enqueued()
    app.dependency_overrides[webhook_routes.get_webhook_enqueue] = lambda: recorder
    return app


@pytest.fixture
def app(env, enqueued):
    return make_app(enqueued)


def client_for(app, host: str = "testclient", **kw) -> TestClient:
    return TestClient(app, raise_server_exceptions=False, base_url=PUBLIC_URL, client=(host, 40000), **kw)


@pytest.fixture
def web(app):
    """An anonymous client: no key, no session."""
    with client_for(app) as client:
        yield client


@pytest.fixture
def write_key(env) -> dict[str, str]:
    return api_key_headers("write")


@pytest.fixture
def read_key(env) -> dict[str, str]:
    return api_key_headers("read")


@pytest.fixture
def world(web, write_key, session_factory) -> dict:
    """A customer (made through the API) with a saved card, a subscription and a declined charge in the
    retry queue: something real behind every id an attacker might guess."""
    customer = web.post("/api/customers", json={"email": "ada@example.com", "name": "Ada Lovelace"}, headers=write_key)
    assert customer.status_code == 201, customer.text
    cid = customer.json()["id"]
    setup = web.post(f"/api/customers/{cid}/card-setups", json={"payment_method": "pm_card_visa"}, headers=write_key)
    assert setup.status_code == 201 and setup.json()["status"] == "succeeded", setup.text
    sub = web.post("/api/subscriptions", headers=write_key,
                   json={"customer_id": cid, "amount": 1999, "currency": "eur", "interval": "month"})
    assert sub.status_code == 201, sub.text
    with session_factory() as s:
        charge = factories.make_charge(s, s.get(Subscription, sub.json()["id"]), status="requires_payment_method",
                                       attempts=1, last_error_code="card_declined",
                                       last_decline_code="insufficient_funds", first_failed_at=datetime.now(UTC),
                                       next_retry_at=datetime.now(UTC) + timedelta(days=1))
        s.commit()
        charge_id = charge.id
    return {"customer_id": cid, "subscription_id": sub.json()["id"], "setup_intent_id": setup.json()["setup_intent_id"],
            "charge_id": charge_id, "token": "x" * 43, "name": "setup.js", "action": "void"}


def fingerprint() -> dict[str, str]:
    """Every product table's content as one digest each (keys and staff tables aside: a request may
    record a key's last use or a failed sign-in)."""
    skip = {"api_keys", "staff_sessions", "login_failures", "alembic_version"}
    with unit_of_work() as uow:
        names = uow.session.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).all()
        return {name: uow.session.scalar(text(
            "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
            f'FROM "{name}" t')) for name in sorted(names) if name not in skip}


def routes_of(app) -> list[tuple[str, str]]:
    """``(method, full path template)`` of every route: included routers and mounted apps walked too."""
    found: list[tuple[str, str]] = []

    def walk(routes, prefix: str = "") -> None:
        for route in routes:
            if hasattr(route, "effective_candidates"):
                walk(route.effective_candidates(), prefix)
            elif getattr(route, "methods", None):
                found.extend((m, prefix + route.path) for m in route.methods if m != "HEAD")
            elif hasattr(route, "routes") and hasattr(route, "path"):  # a Mount
                walk(route.routes, prefix + route.path)

    walk(app.routes)
    return sorted(set(found))


def fill(path: str, world: dict) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: str(world.get(m.group(1), 1)), path)


def signed_in(app, email: str = support.OPERATOR, host: str = "testclient") -> TestClient:
    client = client_for(app, host)
    assert support.login(client, email).status_code == 303
    return client


def logged(caplog) -> str:
    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        lines.append(repr(record.__dict__))
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(lines)


def where(resp) -> str:
    return f"{resp.request.method} {resp.request.url.raw_path.decode('latin-1')} → {resp.status_code}"


# ======================================================================================================
# auth
# ======================================================================================================

def test_auth_no_route_answers_without_a_key_or_session_unless_public_by_design(app):
    """A route added under another router, or a new mount, must be classified here or this fails."""
    routes = routes_of(app)
    unexpected = [(m, p) for m, p in routes
                  if not p.startswith(("/api/", "/finance/")) and (m, p) not in PUBLIC_BY_DESIGN | GUARDED_ELSEWHERE]
    assert not unexpected, unexpected
    assert len([r for r in routes if r[1].startswith("/api/")]) >= 7


def test_auth_every_api_path_refuses_every_method_without_a_key(app, web, world):
    before = fingerprint()
    got_through = []
    for path in sorted({p for _m, p in routes_of(app) if p.startswith("/api/")}):
        for method in ALL_METHODS:
            resp = web.request(method, fill(path, world), json={} if method in ("POST", "PUT", "PATCH") else None,
                               follow_redirects=False)
            refused = resp.status_code == 405 or (
                resp.status_code == 401 and resp.headers.get("www-authenticate") == "Bearer"
                and resp.json()["error"]["code"] == "unauthorized")
            if not refused or "ada@example.com" in resp.text:
                got_through.append(where(resp))
    assert not got_through, got_through
    assert fingerprint() == before


def test_auth_path_tricks_never_reach_a_subscription_without_a_key(web, world):
    sub = world["subscription_id"]
    tricks = [f"/api/subscriptions/{sub}/", f"//api/subscriptions/{sub}", f"/API/subscriptions/{sub}",
              f"/api%2Fsubscriptions%2F{sub}", f"/api/./subscriptions/{sub}",
              f"/api/subscriptions/../subscriptions/{sub}",
              f"/api/subscriptions/{sub}%00", f"/api/subscriptions/{sub};x=1", f"/api/subscriptions/{sub}%20",
              f"/finance/../api/subscriptions/{sub}", f"/finance/%2e%2e/api/subscriptions/{sub}",
              f"/static/../api/subscriptions/{sub}", f"/setup/..%2Fapi%2Fsubscriptions%2F{sub}",
              f"/api/subscriptions/%7B{sub}%7D", f"/api/subscriptions/{sub}?_method=GET", f"/%61pi/subscriptions/{sub}"]
    got_through = []
    for path in tricks:
        resp = web.get(path, follow_redirects=True)
        if resp.status_code not in (401, 404, 405, 422) or '"next_charge_at"' in resp.text:
            got_through.append(where(resp))
    assert not got_through, got_through


def test_auth_malformed_or_lookalike_keys_are_401(web, world, write_key):
    key = write_key["Authorization"].removeprefix("Bearer ")
    basic = base64.b64encode(f"x:{key}".encode()).decode()
    headers = ["", "Bearer", "Bearer ", f"Bearer {key}x", f"Bearer {key[:-1]}", f"Bearer {key.upper()}",
               f"Basic {basic}", f"Token {key}", key, f"Bearer {apikeys.hash_key(key)}",
               f"Bearer {key[:apikeys.DISPLAY_PREFIX_LENGTH]}", f"Bearer\t{key}", f"Bearer {key},Bearer {key}",
               "Bearer bk_" + "A" * 100_000, "Bearer bk_" + "A" * 43, f"Bearer {key[:10]}\x00{key[11:]}",
               f"Bearer {key[:10]}\u0410{key[11:]}", f"Bearer {key[:10]}\u00e9{key[11:]}", f"Bearer {key}\x00",
               f"Bearer bk_{key[3:]}==", f"Bearer {key.replace('-', '+').replace('_', '/')}"]
    got_through = []
    for header in headers:
        resp = web.get(f"/api/subscriptions/{world['subscription_id']}", headers={"Authorization": header.encode()})
        if resp.status_code != 401 or resp.headers.get("www-authenticate") != "Bearer" or key in resp.text:
            got_through.append((header[:40], resp.status_code))
    assert not got_through, got_through


def test_auth_scheme_casing_and_surrounding_blanks_are_the_same_key_not_a_bypass(web, world, read_key):
    key = read_key["Authorization"].removeprefix("Bearer ")
    sub = world["subscription_id"]
    for header in (f"bearer {key}", f"BEARER {key}", f"Bearer  {key}", f"Bearer {key} "):
        assert web.get(f"/api/subscriptions/{sub}", headers={"Authorization": header}).status_code == 200
        # ... and still the read key it is: no write through a spelling.
        assert web.post(f"/api/subscriptions/{sub}/cancel", headers={"Authorization": header}).status_code == 403


def test_auth_a_second_authorization_header_cannot_upgrade_a_read_key(app, world, read_key, write_key):
    before = fingerprint()
    path = f"/api/subscriptions/{world['subscription_id']}/cancel"
    for first, second in ((read_key, write_key), ({"Authorization": "Bearer nope"}, write_key)):
        with client_for(app) as client:
            resp = client.post(path, headers=[("Authorization", first["Authorization"]),
                                              ("Authorization", second["Authorization"])])
        assert resp.status_code in (401, 403), resp.status_code
    assert fingerprint() == before


def test_auth_a_read_key_cannot_write_through_method_overrides(web, world, read_key):
    before = fingerprint()
    sub = world["subscription_id"]
    for extra in ({"X-HTTP-Method-Override": "GET"}, {"X-HTTP-Method": "GET"}, {"X-Method-Override": "GET"},
                  {"X-Original-Method": "GET"}):
        assert web.post(f"/api/subscriptions/{sub}/cancel", headers={**read_key, **extra}).status_code == 403, extra
        assert web.post("/api/customers", json={"email": "m@example.com", "name": "M"},
                        headers={**read_key, **extra}).status_code == 403, extra
    assert web.post(f"/api/subscriptions/{sub}/cancel?_method=GET", headers=read_key).status_code == 403
    # HEAD and OPTIONS are reads: on a write route they are refused as methods, never run.
    for method in ("HEAD", "OPTIONS"):
        assert web.request(method, f"/api/subscriptions/{sub}/cancel", headers=read_key).status_code == 405
    assert fingerprint() == before
    assert web.get(f"/api/subscriptions/{sub}", headers=read_key).json()["status"] == "active"


def test_auth_a_revoked_key_stops_on_the_next_request_on_every_route(app, web, world, write_key):
    key = write_key["Authorization"].removeprefix("Bearer ")
    name = next(k.name for k in apikeys.list_keys() if k.prefix == key[:apikeys.DISPLAY_PREFIX_LENGTH])
    assert web.get(f"/api/subscriptions/{world['subscription_id']}", headers=write_key).status_code == 200
    apikeys.revoke(name)
    before = fingerprint()
    for method, path in routes_of(app):
        if path.startswith("/api/"):
            resp = web.request(method, fill(path, world), headers=write_key, json={} if method == "POST" else None)
            assert resp.status_code == 401, where(resp)
    assert fingerprint() == before


def test_auth_a_key_in_the_query_string_is_not_accepted(web, world, write_key):
    """RFC 6750 allows ``?access_token=``; accepting it would put keys into URLs (and proxies' logs)."""
    key = write_key["Authorization"].removeprefix("Bearer ")
    for param in ("access_token", "api_key", "key", "token", "authorization"):
        resp = web.get(f"/api/subscriptions/{world['subscription_id']}", params={param: key})
        assert resp.status_code == 401, param


def test_auth_keys_and_client_secrets_reach_no_log_line_and_no_url(web, world, write_key, caplog):
    caplog.set_level(logging.DEBUG)
    key = write_key["Authorization"].removeprefix("Bearer ")
    wrong = "bk_" + "Z" * 43
    created = web.post(f"/api/customers/{world['customer_id']}/card-setups",
                       json={"payment_method": "pm_card_authenticationRequired"}, headers=write_key)
    assert created.status_code == 201 and created.json()["status"] == "requires_action", created.text
    secret, setup_url = created.json()["client_secret"], created.json()["setup_url"]
    assert secret and secret not in setup_url and key not in setup_url and "secret" not in urlsplit(setup_url).query
    assert web.get(f"/api/card-setups/{created.json()['setup_intent_id']}", headers=write_key).status_code == 200
    assert web.get("/api/subscriptions/1", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    page = web.get(urlsplit(setup_url).path)
    assert page.status_code == 200 and secret in page.text  # in the page body, for Stripe.js: by design
    token = urlsplit(setup_url).path.rsplit("/", 1)[-1]
    ours = [r for r in caplog.records if r.name.startswith(("billing", "uvicorn", "stripe", "sqlalchemy", "workers"))]
    assert ours, "expected the access log at least"
    text_logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in ours)
    leaked = [needle[:12] for needle in (key, wrong, secret, token) if needle in text_logged]
    assert not leaked, leaked


def test_auth_metrics_are_not_public_and_an_api_key_does_not_open_them(app, write_key, monkeypatch):
    from tests.conftest import reset_process_caches

    remote, local = client_for(app, "203.0.113.9"), client_for(app, "127.0.0.1")
    assert remote.get("/metrics").status_code == 404
    assert remote.get("/metrics", headers=write_key).status_code == 404
    for spoof in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}):
        assert remote.get("/metrics", headers=spoof).status_code == 404, spoof
    # A proxy on this machine makes every visitor local: a forwarded request is not a local scraper.
    assert local.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 404
    assert local.get("/metrics").status_code == 200
    token = "m" * 32
    monkeypatch.setenv("BILLING_METRICS_TOKEN", token)
    reset_process_caches()
    with client_for(make_app(), "203.0.113.9") as c:
        for value in ("", f"Bearer {token[:-1]}", f"Bearer {token}x", f"Basic {token}", token,
                      write_key["Authorization"], f"Bearer {token.upper()}", f"Bearer {token}\u00e9"):
            resp = c.get("/metrics", headers={"Authorization": value.encode()})
            assert resp.status_code == 401, (value[:20], resp.status_code)
        assert c.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/metrics", params={"token": token}).status_code == 401


def test_auth_docs_are_off_and_load_nothing_from_a_cdn(web):
    for path in ("/docs", "/docs/", "/redoc", "/docs/oauth2-redirect", "/docs/assets/swagger-ui-bundle.js", "/swagger",
                 "/openapi.yaml"):
        assert web.get(path).status_code == 404, path
    spec = web.get("/openapi.json")
    assert spec.status_code == 200 and "cdn" not in spec.text.lower()


def test_auth_every_console_route_needs_a_session(app, accounts, world):
    before = fingerprint()
    anonymous = client_for(app)
    got_through = []
    for method, path in routes_of(app):
        if not path.startswith("/finance/") or (method, path) in CONSOLE_PUBLIC:
            continue
        resp = anonymous.request(method, fill(path, world), data={"csrf_token": "x", "reason": "r"},
                                 follow_redirects=False)
        to_login = resp.status_code == 303 and resp.headers["location"].startswith("/finance/login?next=")
        if not (to_login or resp.status_code == 403) or "ada@example.com" in resp.text:
            got_through.append(where(resp))
    assert not got_through, got_through
    # The session cookie is signed: a made-up one, or one with a forged signature, is no session.
    for cookie in ("x", "x.y", "." * 10, staff.sign("guess")[:-1] + "0", "a" * 4096):
        forged = client_for(app, cookies={"finance_session": cookie})
        assert forged.get("/finance/queue", follow_redirects=False).status_code == 303, cookie
    assert fingerprint() == before


def test_auth_no_cors_for_other_origins(web, world, write_key):
    for method in ("GET", "OPTIONS"):
        resp = web.request(method, f"/api/subscriptions/{world['subscription_id']}", headers={
            **write_key, "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in resp.headers
        assert "access-control-allow-credentials" not in resp.headers


def test_auth_links_handed_out_follow_the_public_url_not_the_host_header(web, world, write_key):
    """Password-reset poisoning, here: a setup link built from ``Host`` would send the customer's card to
    whoever named the host."""
    for headers in ({"Host": "evil.example"}, {"X-Forwarded-Host": "evil.example"}, {"Forwarded": "host=evil.example"}):
        resp = web.post(f"/api/customers/{world['customer_id']}/card-setups", json={},
                        headers={**write_key, **headers})
        assert resp.status_code == 201, resp.text
        assert resp.json()["setup_url"].startswith(f"{PUBLIC_URL}/setup/"), (headers, resp.json()["setup_url"])


def test_auth_redirects_never_point_at_the_host_the_request_named(web):
    """The Host header is the client's word. A redirect built from it sends whoever follows it (or a cache
    that stored it) to another site: ``Host: evil.example`` → ``Location: http://evil.example/finance/``."""
    elsewhere = []
    for path in ("/finance", "/finance/queue/", "/api/customers/", "/webhooks/stripe/", "/healthz/"):
        resp = web.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        target = urlsplit(urljoin(f"{PUBLIC_URL}{path}", resp.headers.get("location", "")))
        if resp.is_redirect and target.netloc != "billing.test":
            elsewhere.append((path, resp.headers["location"]))
    assert not elsewhere, elsewhere


# ======================================================================================================
# escaping
# ======================================================================================================

def assert_inert(html: str, *payloads: str) -> None:
    for payload in payloads:
        assert payload not in html, f"{payload!r} unescaped"
    assert re.search(r"<img\b", html) is None and re.search(r"<[^>]*\son\w+=", html) is None


def recovery_token_for(charge_id: int, customer_id: int) -> str:
    with unit_of_work() as uow:
        token = recovery.issue_token(uow.session, customer_id=customer_id, purpose="recover", charge_id=charge_id)
        uow.commit()
    return token


def test_escaping_stripe_supplied_card_and_decline_fields_are_text_everywhere(app, accounts, world, session_factory,
                                                                           smtp_server):
    """Brand, last four, country and decline codes come from Stripe's JSON (webhooks, intents): data."""
    with session_factory() as s:
        pm = s.get(PaymentMethod, s.get(Customer, world["customer_id"]).default_payment_method_id)
        pm.brand, pm.last4, pm.country = SCRIPT, "<b>1", "<i"
        setup = s.scalars(select(CardSetup).where(CardSetup.setup_intent_id == world["setup_intent_id"])).one()
        setup.last_error_code, setup.last_error_message = "card_declined", BREAKOUT + ATTRIBUTE
        charge = s.get(Charge, world["charge_id"])
        charge.status, charge.last_error_code = "authentication_required", "authentication_required"
        charge.last_decline_code, charge.last_advice_code = SCRIPT, ATTRIBUTE
        s.commit()
    console = signed_in(app)
    for path in (f"/finance/charges/{world['charge_id']}", "/finance/queue", "/finance/overview",
                 f"/finance/queue?decline_code={SCRIPT}"):
        page = console.get(path)
        assert page.status_code == 200, path
        assert_inert(page.text, SCRIPT, ATTRIBUTE, "<b>1")
    page = client_for(app).get(f"/recover/{recovery_token_for(world['charge_id'], world['customer_id'])}")
    assert page.status_code == 200, page.text[:300]
    assert_inert(page.text, SCRIPT, ATTRIBUTE, "<b>1")
    put(session_factory, world["charge_id"], kind="authentication_required")
    relay_due(now=datetime.now(UTC) + timedelta(seconds=1), smtp_url=smtp_server.url, session_factory=session_factory)
    [message] = smtp_server.wait_for(1)
    assert_inert(message.get_body(preferencelist=("html",)).get_content(), SCRIPT, ATTRIBUTE, "<b>1")


def test_escaping_json_data_blocks_cannot_be_closed_from_inside(env, world, monkeypatch):
    """The customer pages' ``<script type="application/json">`` holds values from settings and Stripe:
    ``</script>``, ``<!--`` and U+2028/2029 must not end it (or a JavaScript line) early."""
    from tests.conftest import reset_process_caches

    monkeypatch.setenv("BILLING_STRIPE_PUBLISHABLE_KEY", "pk_" + BREAKOUT)
    monkeypatch.setenv("BILLING_MERCHANT_NAME", BREAKOUT + ATTRIBUTE)
    reset_process_caches()
    page = client_for(make_app()).get(f"/recover/{recovery_token_for(world['charge_id'], world['customer_id'])}")
    assert page.status_code == 200, page.text[:300]
    blocks = re.findall(r'<script type="application/json" id="page-data">(.*?)</script>', page.text, re.S)
    assert len(blocks) == 1, "the data block was closed early"
    assert not [c for c in ("<", ">", "\u2028", "\u2029") if c in blocks[0]]
    assert json.loads(blocks[0])["publishable_key"] == "pk_" + BREAKOUT
    assert page.text.count("<script") == 3, "a script element more than the page's own three"
    assert_inert(page.text, "<script>alert(1)</script>", ATTRIBUTE)
    assert _header_problems(page, html=True) == []  # the page holds a client_secret: no-store, no framing


def test_escaping_the_pages_scripts_write_text_never_markup():
    """DOM XSS: what the pages' scripts receive (Stripe's error messages among it) goes in as text."""
    folder = Path(__file__).resolve().parents[2] / "billing" / "web" / "static"
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", ".html(",
             "location.href =", "location =", "setTimeout(\"")
    found = [(s.name, sink) for s in folder.glob("*.js") for sink in sinks if sink in s.read_text()]
    assert not found, found


FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1+1)*cmd|' /C calc'!A0", '=HYPERLINK("http://evil.example","x")']


def _queue_charge_for(session_factory, customer_id: int) -> None:
    with session_factory() as s:
        customer = s.get(Customer, customer_id)
        factories.make_payment_method(s, customer, country="DE")
        sub = factories.make_subscription(s, customer)
        factories.make_charge(s, sub, status="requires_payment_method", attempts=1, last_error_code="card_declined",
                              last_decline_code="insufficient_funds", next_retry_at=datetime.now(UTC))
        s.commit()


def _csv_cells(console: TestClient) -> list[str]:
    resp = console.get("/finance/queue.csv")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    return [cell for row in csv.reader(io.StringIO(resp.text)) for cell in row]


def _formulas(cells: list[str]) -> list[str]:
    return [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_escaping_formula_names_and_emails_reach_the_csv_export_neutralised(app, accounts, web, write_key,
                                                                           session_factory):
    for n, name in enumerate(FORMULAS):
        created = web.post("/api/customers", json={"email": f"=cmd{n}@example.com", "name": name}, headers=write_key)
        assert created.status_code == 201, created.text
        _queue_charge_for(session_factory, created.json()["id"])
    cells = _csv_cells(signed_in(app))
    assert all(any(name in cell for cell in cells) for name in FORMULAS), "a name is missing from the export"
    live = _formulas(cells)
    assert not live, f"cells a spreadsheet would run: {live}"


def test_escaping_formula_names_with_a_leading_tab_or_cr_are_neutralised_too(app, accounts, session_factory):
    """OWASP "CSV Injection": tab (0x09) and carriage return (0x0D) also start a formula in some
    spreadsheets. The API refuses them now, but rows stored before (imports, older versions) exist."""
    for name in ("\t=1+1+cmd|' /C calc'!A0", "\r=1+1+cmd|' /C calc'!A0"):
        with session_factory() as s:
            customer = factories.make_customer(s, name=name)
            s.commit()
            customer_id = customer.id
        _queue_charge_for(session_factory, customer_id)
    live = _formulas(_csv_cells(signed_in(app)))
    assert not live, f"cells a spreadsheet would run: {live}"


class EnvelopeSink(SmtpSink):
    """Keeps each message's envelope recipients and raw bytes, as the receiving server saw them."""

    def __init__(self, smtputf8: bool = True):
        super().__init__("127.0.0.1", free_port())
        self.envelopes: list[tuple[list[str], bytes]] = []
        self.smtputf8 = smtputf8

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # aiosmtpd hook
        session.host_name = hostname
        return [r for r in responses if self.smtputf8 or "SMTPUTF8" not in r.upper()]

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((list(envelope.rcpt_tos), envelope.original_content or envelope.content))
        return await super().handle_DATA(server, session, envelope)


def header_fields(raw: bytes) -> list[str]:
    """The raw header fields as a receiving server splits them (on CRLF or LF), folding undone."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields: list[str] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def addresses_in(field: str) -> list[str]:
    """The mailboxes a mail client reads in an address field's raw value."""
    from email.utils import getaddresses

    return [addr for _name, addr in getaddresses([field.split(":", 1)[1]]) if addr]


def relay_to(session_factory, sink) -> None:
    with serving(sink):
        relay_due(now=datetime.now(UTC) + timedelta(seconds=1), smtp_url=sink.url, session_factory=session_factory)


def mail_one(session_factory, email: str, name: str) -> int:
    charge_id, _ = make_charge(session_factory, email=email)
    with session_factory() as s:  # past the API's validation (an import, an older row): the mailer's own defence
        s.execute(text("UPDATE customers SET name = :n WHERE email = :e"), {"n": name, "e": email})
        s.commit()
    put(session_factory, charge_id)
    return charge_id


def assert_one_clean_recipient(sink, expected: list[str]) -> None:
    assert sorted(r for rcpts, _ in sink.envelopes for r in rcpts) == sorted(expected)
    problems = []
    for rcpts, raw in sink.envelopes:
        fields = header_fields(raw)
        names = [f.split(":", 1)[0].strip().lower() for f in fields]
        if names.count("to") != 1 or {"reply-to", "x-injected", "bcc", "cc"} & set(names):
            problems.append((rcpts, "extra headers", fields))
        if [f for f in fields if ":" not in f]:
            problems.append((rcpts, "a line that is no header", fields))
        for field in fields:
            if field.lower().startswith(("to:", "from:")):
                shown = addresses_in(field)
                if len(shown) != 1 or "evil.example" in shown[0]:
                    problems.append((rcpts, "a mail client reads these addresses", shown, field[:160]))
        body = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].lstrip()
        if not body.startswith(b"--"):  # the body is ours: it opens with the first MIME boundary
            problems.append((rcpts, "injected body", body[:120]))
    assert not problems, problems


ENCODED_WORD_NAMES = [
    # RFC 2047 encoded-words: Python's email package decodes them when it folds the header, and writes
    # the decoded CR LF, addresses and commas into the header as they are.
    "=?utf-8?q?=0D=0AReply-To:_attacker@evil.example=0D=0AX-Injected:_yes?=",
    "=?utf-8?q?=0D=0A=0D=0AYour_card_was_blocked:_http://evil.example/pay?=",
    "=?utf-8?b?" + base64.b64encode(b"Support, help@evil.example, ").decode() + "?=",
]


def test_escaping_an_encoded_word_name_cannot_add_headers_recipients_or_a_body(web, write_key, session_factory):
    """Accepted by the API (no control characters in it), then the To display name of every email."""
    for n, name in enumerate(ENCODED_WORD_NAMES):
        assert web.post("/api/customers", json={"email": f"probe{n}@example.com", "name": name},
                        headers=write_key).status_code in (201, 422)
        mail_one(session_factory, f"eve{n}@example.com", name)
    mail_one(session_factory, "bob@example.com", "Bob")
    sink = EnvelopeSink()
    relay_to(session_factory, sink)
    eves = [f"eve{n}@example.com" for n in range(len(ENCODED_WORD_NAMES))]
    assert_one_clean_recipient(sink, ["bob@example.com", *eves])


def test_escaping_a_short_display_name_with_address_syntax_stays_one_recipient(session_factory):
    names = ["Bob <attacker@evil.example>, Eve", 'a"b\\', "Eve\r\nBcc: x@evil.example", "x@evil.example",
             '"quoted" <x@evil.example>;', "Eve\u2028Cc: x@evil.example", "Eve\x1b[2J\x7fx@evil.example"]
    for n, name in enumerate(names):
        mail_one(session_factory, f"c{n}@example.com", name)
    sink = EnvelopeSink()
    relay_to(session_factory, sink)
    assert_one_clean_recipient(sink, [f"c{n}@example.com" for n in range(len(names))])


def test_escaping_a_long_display_name_keeps_its_quotes_when_the_header_is_folded(session_factory):
    """Past 78 characters the header is folded, and Python's folder drops the quotes around the display
    name: ``To: Bob <attacker@evil.example>, Eve … <c@example.com>`` names the attacker to mail clients
    (and to "reply all"). Names up to 200 characters are accepted by the API."""
    name = "Bob <attacker@evil.example>, Eve " + "x" * 60
    mail_one(session_factory, "long@example.com", name)
    sink = EnvelopeSink()
    relay_to(session_factory, sink)
    assert_one_clean_recipient(sink, ["long@example.com"])


def test_escaping_a_hostile_merchant_name_setting_stays_text_in_pages_and_headers(env, world, session_factory,
                                                                                  monkeypatch):
    from tests.conftest import reset_process_caches

    monkeypatch.setenv("BILLING_MERCHANT_NAME", "Evil\r\nBcc: x@evil.example\r\n" + SCRIPT + ATTRIBUTE)
    reset_process_caches()
    hostile = client_for(make_app())
    for path in (f"/recover/{recovery_token_for(world['charge_id'], world['customer_id'])}", "/setup/nope"):
        assert_inert(hostile.get(path).text, SCRIPT, ATTRIBUTE)
    put(session_factory, world["charge_id"])
    sink = EnvelopeSink()
    relay_to(session_factory, sink)
    assert_one_clean_recipient(sink, ["ada@example.com"])
    [message] = sink.messages
    assert "\n" not in str(message["Subject"]) and "\r" not in str(message["Subject"])
    assert_inert(message.get_body(preferencelist=("html",)).get_content(), SCRIPT, ATTRIBUTE)


def test_escaping_crlf_never_splits_a_response_header(web):
    split = []
    for query in ("next=%0d%0aSet-Cookie:%20pwned=1", "x=%0d%0aSet-Cookie:%20pwned=1",
                  "next=/finance/queue%0d%0aSet-Cookie:%20pwned=1",
                  "next=/finance/%E5%98%8A%E5%98%8DSet-Cookie:pwned=1"):
        for path in ("/finance/login", "/finance/queue", "/finance/overview", "/finance/charges/1"):
            resp = web.get(f"{path}?{query}", follow_redirects=False)
            for name, value in resp.headers.multi_items():
                if "\r" in value or "\n" in value or name.lower() == "pwned" or "pwned=1" in resp.headers.get(
                        "set-cookie", ""):
                    split.append((path, query, name, value))
    assert not split, split


def _header_problems(resp, *, html: bool | None = None, cacheable: bool = False) -> list[str]:
    h, problems = resp.headers, []
    if h.get("x-content-type-options") != "nosniff":
        problems.append("nosniff")
    if h.get("referrer-policy") != "no-referrer":
        problems.append("referrer-policy")
    if not cacheable and h.get("cache-control") != "no-store":
        problems.append("cache-control")
    is_html = h.get("content-type", "").startswith("text/html")
    if html is not None and is_html != html:
        problems.append(f"content-type {h.get('content-type')}")
    if is_html:
        csp = h.get("content-security-policy", "")
        if "frame-ancestors 'none'" not in csp or "script-src 'self'" not in csp or "unsafe-inline" in csp:
            problems.append("csp")
        if h.get("x-frame-options") != "DENY":
            problems.append("x-frame-options")
    return [f"{where(resp)}: {p}" for p in problems]


def test_escaping_every_kind_of_response_carries_the_browser_headers(app, accounts, web, world, write_key,
                                                                   monkeypatch):
    from billing import enrolment

    cases = [
        (web.get("/nope"), False), (web.delete("/api/customers"), False),
        (web.post("/api/customers", json={"email": "x"}, headers=write_key), False),
        (web.post("/api/customers", content=b"{", headers={**write_key, **JSON}), False),
        (web.post("/api/customers", content=b" " * (65 * 1024), headers={**write_key, **JSON}), False),
        (web.post("/webhooks/stripe", content=b"x" * (limits.WEBHOOK_BODY_LIMIT + 1)), False),
        (web.get("/api/customers/", follow_redirects=False), None), (web.get("/finance/nope"), True),
        (web.get("/finance/logout"), True), (web.get("/finance/queue", follow_redirects=False), None),
        (web.get("/setup/nope"), True), (web.post("/finance/login", data={"csrf_token": "x"}), True),
        (web.post("/finance/login", content=b"a=" + b"b" * 70_000,
                  headers={"Content-Type": "application/x-www-form-urlencoded"}), None),
    ]
    console = signed_in(app)
    cases += [(console.get("/finance/charges/999999"), True), (console.get("/finance/queue?country=<x>"), True),
              (console.post(f"/finance/charges/{world['charge_id']}/actions/void", data={"csrf_token": "x"}), True)]

    def broken(*_a, **_kw):
        raise RuntimeError("ada@example.com broke it")

    monkeypatch.setattr(enrolment, "create_customer", broken)
    monkeypatch.setattr(finance, "overview", broken)
    cases += [(web.post("/api/customers", json={"email": "a@example.com", "name": "A"}, headers=write_key), False),
              (console.get("/finance/overview"), None)]
    problems = [p for resp, html in cases for p in _header_problems(resp, html=html)]
    problems += [where(resp) + ": leaks the error" for resp, _ in cases if "broke it" in resp.text]
    for path in ("/static/setup.js", "/static/recover.js", "/static/pages.css", "/finance/static/finance.css"):
        problems += _header_problems(web.get(path), html=False, cacheable=True)
    assert not problems, problems


def test_escaping_a_console_error_logs_no_customer_data(app, accounts, world, monkeypatch, caplog):
    def broken(*_a, **_kw):
        raise RuntimeError("could not read Ada Lovelace <ada@example.com>")

    monkeypatch.setattr(finance, "charge_detail", broken)
    console = signed_in(app)
    caplog.set_level(logging.DEBUG)
    resp = console.get(f"/finance/charges/{world['charge_id']}")
    assert resp.status_code == 500 and "ada@example.com" not in resp.text
    assert "ada@example.com" not in logged(caplog) and "Lovelace" not in logged(caplog)


# ======================================================================================================
# input
# ======================================================================================================

def test_input_odd_and_oversized_customer_fields_are_4xx_and_change_nothing(web, write_key):
    ok = {"email": "a@example.com", "name": "A"}
    bodies = [
        {"email": "a" * 310 + "@example.com", "name": "A"}, {"email": "a@" + "b" * 300 + ".com", "name": "A"},
        {**ok, "name": "A" * 201}, {**ok, "name": "A" * 60_000}, {**ok, "country": "D" * 65},
        {**ok, "locale": "x" * 36},
        {**ok, "country": "DEU"}, {**ok, "name": "A\u0301" * 150}, {**ok, "name": "   "}, {**ok, "name": ""},
        {**ok, "email": ""}, {**ok, "name": ["A"]}, {**ok, "name": {"$ne": 1}}, {**ok, "name": None},
        {"email": "a@x.de"},
        {**ok, "email": 1}, {**ok, "id": 1}, {**ok, "stripe_customer_id": "cus_x"}, {**ok, "locale": "../../etc"},
        {**ok, "locale": "en_US.UTF-8"}, {**ok, "country": "Ü1"}, [ok], "a@example.com",
    ]
    before = fingerprint()
    accepted = []
    for body in bodies:
        resp = web.post("/api/customers", json=body, headers=write_key)
        code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None
        if resp.status_code not in (400, 422) or code not in ("invalid_request", "invalid_input"):
            accepted.append((json.dumps(body)[:60], resp.status_code))
    assert not accepted, accepted
    assert fingerprint() == before


def test_input_emails_with_syntax_tricks_are_refused(web, write_key):
    emails = ['"a@b"@example.com', '"a\\"b"@example.com', "a@[127.0.0.1]", "a@localhost", "a@b@example.com",
              "a@example.com.", "a..b@example.com", ".a@example.com", "a@-example.com", "a@example..com",
              "a\u200b@example.com", "a\u202e@example.com", "a@ex\u200dample.com", "<a@example.com>",
              "A <a@example.com>",
              "a@example.com,b@example.com", "mailto:a@example.com", "a@example.com (comment)", "a(c)@example.com",
              "a@xn--.com", "a@example.com\\"]
    before = fingerprint()
    accepted = []
    for email in emails:
        resp = web.post("/api/customers", json={"email": email, "name": "A"}, headers=write_key)
        if resp.status_code != 422:
            accepted.append((email, resp.status_code))
    assert not accepted, accepted
    assert fingerprint() == before


def _one_failure_email(session_factory, customer_id: int) -> None:
    with session_factory() as s:
        customer = s.get(Customer, customer_id)
        factories.make_payment_method(s, customer)
        charge = factories.make_charge(s, factories.make_subscription(s, customer), status="requires_payment_method")
        s.commit()
        charge_id = charge.id
    put(session_factory, charge_id)


def test_input_an_email_no_message_can_be_built_for_is_refused_at_the_edge(web, write_key, session_factory):
    """SPEC: bad input is refused and loses nothing. An address accepted by the API that the outbox
    cannot put in a header (a non-ASCII local part) loses every email to that customer, silently."""
    lost = []
    for email in ("用户@example.com", "ÄDA@example.com", "ＡＤＡ@example.com"):
        resp = web.post("/api/customers", json={"email": email, "name": "Wang"}, headers=write_key)
        if resp.status_code == 422:
            continue
        assert resp.status_code == 201, resp.text
        _one_failure_email(session_factory, resp.json()["id"])
        sink = EnvelopeSink()
        relay_to(session_factory, sink)
        if not sink.envelopes:
            lost.append(email)
    assert not lost, f"accepted at the API, but no email can be sent to: {lost}"


def test_input_an_idn_domain_is_mailed_even_by_a_server_without_smtputf8(web, write_key, session_factory):
    """``ada@bücher.example`` has an ASCII form (``ada@xn--bcher-kva.example``) every server takes; sent in
    Unicode it needs SMTPUTF8, which many relays do not offer: the row fails until it is dead."""
    resp = web.post("/api/customers", json={"email": "ada@bücher.example", "name": "Ada"}, headers=write_key)
    assert resp.status_code in (201, 422)
    if resp.status_code == 422:
        return
    _one_failure_email(session_factory, resp.json()["id"])
    mail_one(session_factory, "plain@example.com", "Plain")  # the server itself delivers: control
    sink = EnvelopeSink(smtputf8=False)
    relay_to(session_factory, sink)
    assert sorted(r for rcpts, _ in sink.envelopes for r in rcpts) == ["ada@xn--bcher-kva.example", "plain@example.com"]


BIDI_CONTROLS = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]


def test_input_bidi_controls_in_a_name_are_refused(web, write_key):
    """A name is shown to staff next to other text (``Ada · ada@example.com`` on the charge page, the
    greeting in emails): a right-to-left override in it turns what follows around, so the email or
    amount an operator reads is not the one stored. API key names already refuse these (billing.apikeys)."""
    before = fingerprint()
    accepted = []
    for char in BIDI_CONTROLS:
        resp = web.post("/api/customers", json={"email": "rtl@example.com", "name": f"Ada {char}moc.live@"},
                        headers=write_key)
        if resp.status_code != 422:
            accepted.append(f"U+{ord(char):04X}")
    assert not accepted, accepted
    assert fingerprint() == before


def test_input_real_names_with_joiners_and_other_scripts_are_accepted(web, write_key):
    """The other side of the line above: zero-width (non-)joiners belong to Persian and Indic names."""
    for name in ("می\u200cخواهم", "क्\u200dष", "José", "Zoë Ĳssel", "李小龍", "O'Brien-Smith", "שרה כהן", "Ωmega ∞"):
        resp = web.post("/api/customers", json={"email": "n@example.com", "name": name}, headers=write_key)
        assert resp.status_code == 201, (name, resp.text)
        with unit_of_work() as uow:
            assert uow.session.get(Customer, resp.json()["id"]).name == name


def test_input_nul_anywhere_is_4xx_and_never_500(app, accounts, web, world, write_key):
    sub, cid, charge = world["subscription_id"], world["customer_id"], world["charge_id"]
    console = signed_in(app)
    cases = [
        web.get(f"/api/subscriptions/{sub}%00", headers=write_key),
        web.get("/api/card-setups/seti_%00", headers=write_key),
        web.post(f"/api/customers/{cid}%00/card-setups", json={}, headers=write_key),
        web.get("/setup/%00"), web.get("/recover/abc%00def"), web.post("/recover/%00/complete", json={}),
        web.post("/setup/%00/complete", json={}), web.get("/static/setup.js%00"),
        web.get("/finance/static/finance.css%00"),
        web.post("/api/customers", content='{"email": "a@example.com", "name": "A", "\\u0000": 1}',
                 headers={**write_key, **JSON}),
        web.post("/api/customers", content='{"email\\u0000": "a@example.com", "name": "A"}',
                 headers={**write_key, **JSON}),
        web.post("/api/customers", content=b'{"email": "a@example.com", "name": "A\x00"}',
                 headers={**write_key, **JSON}),
        web.post(f"/api/customers/{cid}/card-setups", json={"payment_method": "pm_\u0000"}, headers=write_key),
        web.get(f"/api/subscriptions/{sub}", headers={"Authorization": b"Bearer \x00"}),
        web.post("/webhooks/stripe", content=b"{}", headers={"Stripe-Signature": b"t=1,v1=\x00"}),
        web.post("/webhooks/stripe", content=b"{}", headers={"Stripe-Signature": b"t=\x00,v1=00"}),
        console.get("/finance/charges/%00"), console.get("/finance/queue?status=%00"),
        console.get("/finance/queue?decline_code=%00"), console.get("/finance/queue.csv?decline_code=%00"),
        console.post(f"/finance/charges/{charge}/actions/void%00", data={"csrf_token": "x", "reason": "r"}),
        web.post("/finance/login", data={"email": "\x00", "password": "\x00", "csrf_token": "\x00"}),
    ]
    not_4xx = [where(resp) for resp in cases if not 400 <= resp.status_code < 500]
    assert not not_4xx, not_4xx


def test_input_non_ascii_csrf_tokens_and_cookies_are_refused_not_500(app, accounts, world):
    """``hmac.compare_digest`` raises TypeError on ``str`` with non-ASCII characters: a client-sent token
    compared as it came turns into a 500 (and a cookie set by a sibling subdomain takes the console down
    for that browser until its cookies are cleared)."""
    answers = []
    login = client_for(app)
    login.get("/finance/login")
    resp = login.post("/finance/login", data={"email": support.OPERATOR, "password": support.PASSWORD,
                                              "csrf_token": "é"})
    answers.append((where(resp), resp.status_code == 403))
    for cookie in ("finance_session=abc.\xe9", "finance_login_csrf=abc.\xe9", "finance_session=\xe9"):
        for path in ("/finance/queue", "/finance/login"):
            resp = client_for(app).get(path, headers={"Cookie": cookie.encode("latin-1")}, follow_redirects=False)
            answers.append((f"{where(resp)} with {cookie!r}", resp.status_code in (200, 303)))
    console = signed_in(app)
    before = fingerprint()
    for path, data in ((f"/finance/charges/{world['charge_id']}/actions/void", {"csrf_token": "ü" * 43, "reason": "r"}),
                       ("/finance/logout", {"csrf_token": "ü"})):
        resp = console.post(path, data=data, follow_redirects=False)
        answers.append((where(resp), resp.status_code == 403))
    failed = [w for w, ok in answers if not ok]
    assert not failed, failed
    assert fingerprint() == before


def test_input_numbers_and_dates_in_every_disguise_are_refused(web, world, write_key):
    variants = [
        ("amount", 1999.0), ("amount", 1999.5), ("amount", True), ("amount", "1999"), ("amount", 10**30),
        ("amount", -1999), ("amount", 0), ("amount", None), ("amount", [1999]), ("amount", "1e3"), ("amount", 1),
        ("customer_id", "1"), ("customer_id", 1.0), ("customer_id", True), ("customer_id", 10**30), ("customer_id", -1),
        ("customer_id", 0), ("interval_count", 10**20), ("interval_count", 0), ("interval_count", 1.5),
        ("interval_count", False), ("interval_count", 37), ("interval", "DAY"), ("interval", "hour"),
        ("interval", ["day"]), ("currency", "EUR "), ("currency", "€"), ("currency", "xyz"), ("currency", "eu"),
        ("currency", "eurr"), ("currency", "ｅｕｒ"), ("currency", "xts"), ("start_at", 0), ("start_at", 1.7e9),
        ("start_at", "2030-01-01"), ("start_at", "2030-01-01T00:00:00"), ("start_at", "1970-01-01T00:00:00Z"),
        ("start_at", "9999-12-31T23:59:59Z"), ("start_at", "2030-01-01T00:00:00+99:00"), ("start_at", "now"),
        ("start_at", "2030-02-30T00:00:00Z"), ("start_at", "２０３０-01-01T00:00:00Z"),
        ("start_at", "2030-01-01 00:00Z"),
        ("start_at", (datetime.now(UTC) - timedelta(days=2)).isoformat()),
    ]
    before = fingerprint()
    accepted = []
    for field, value in variants:
        body = {"customer_id": world["customer_id"], "amount": 1999, "currency": "eur", "interval": "month",
                field: value}
        resp = web.post("/api/subscriptions", json=body, headers=write_key)
        if resp.status_code not in (404, 422):
            accepted.append((field, value, resp.status_code))
    assert not accepted, accepted
    assert fingerprint() == before


def test_input_path_ids_in_every_disguise_are_4xx_or_the_same_row(app, accounts, web, world, write_key):
    """``+1``, ``1.0`` or ``0001`` may be read as 1 (the same row), but never as another row, and never a 500."""
    odd = []
    console = signed_in(app)
    assert world["charge_id"] == 1
    for path_id in ("١", "1.0", "+1", "0x1", " 1", "1e2", "9" * 40, "-1", "0", str(2**63), "1_000", "0001", "1 ",
                    "%2B1"):
        for resp in (web.get(f"/api/subscriptions/{path_id}", headers=write_key),
                     web.post(f"/api/subscriptions/{path_id}/cancel", headers=write_key)):
            if resp.status_code not in (404, 422) and not (resp.status_code == 200 and _reads_as_one(path_id)):
                odd.append(where(resp))
        resp = console.get(f"/finance/charges/{path_id}")
        if resp.status_code not in (404, 422) and not (resp.status_code == 200 and _reads_as_one(path_id)):
            odd.append(where(resp))
    assert not odd, odd


def _reads_as_one(path_id: str) -> bool:
    try:
        return float(path_id.replace("%2B", "+").strip()) == 1
    except ValueError:
        return False


def test_input_duplicate_json_keys_store_what_was_validated(web, world, write_key):
    """Python's parser keeps the last duplicate: the value validated is the value stored, never the other."""
    cid = world["customer_id"]
    raw = (f'{{"customer_id": {cid}, "amount": 1, "amount": 1999, "currency": "xyz", "currency": "eur", '
           '"interval": "month"}')
    resp = web.post("/api/subscriptions", content=raw, headers={**write_key, **JSON})
    assert resp.status_code == 201, resp.text
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, resp.json()["id"])
        assert (sub.amount, sub.currency) == (1999, "eur")
    raw = f'{{"customer_id": {cid}, "amount": 1999, "amount": 1, "currency": "eur", "interval": "month"}}'
    assert web.post("/api/subscriptions", content=raw, headers={**write_key, **JSON}).status_code == 422


def test_input_deep_nesting_is_4xx_on_the_api_and_the_webhook(web, write_key, enqueued):
    deep = "[" * 30_000 + "]" * 30_000
    api = web.post("/api/customers", content='{"email": "a@example.com", "name": ' + deep + "}",
                   headers={**write_key, **JSON})
    nested = "[" * 20_000 + "]" * 20_000
    body = (f'{{"id": "evt_deep", "type": "payment_intent.succeeded", "created": {int(time.time())}, '
            f'"data": {{"object": {{"id": "pi_x", "x": {nested}}}}}}}').encode()
    hook = web.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": stripe_events.signature(body)})
    not_4xx = [where(r) for r in (api, hook) if not 400 <= r.status_code < 500]
    assert not not_4xx, not_4xx


def test_input_content_type_tricks_on_json_routes_create_nothing(web, write_key):
    cases = [
        ("application/x-www-form-urlencoded", b"email=f%40example.com&name=F"),
        ("text/plain", b'{"email": "t@example.com", "name": "T"}'),
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="email"\r\n\r\nm@example.com\r\n--x--\r\n'),
        ("application/xml", b"<customer><email>x@example.com</email></customer>"),
        ("application/json", '{"email": "l@example.com", "name": "J\xe9"}'.encode("latin-1")),
        ("application/json", b'\xff\xfe{"email": "b@example.com", "name": "B"}'),
        ("application/json", b""), ("application/json", b"null"), ("application/json", b"[]"),
    ]
    before = fingerprint()
    for content_type, body in cases:
        resp = web.post("/api/customers", content=body, headers={**write_key, "Content-Type": content_type})
        assert resp.status_code in (400, 415, 422), (content_type, body[:30], resp.status_code)
    assert fingerprint() == before


def _chunks(total: int, size: int = 16 * 1024):
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b" " * piece


def test_input_chunked_bodies_just_over_the_caps_are_413(web, write_key):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path, cap, headers in (("/api/customers", limits.API_BODY_LIMIT, {**write_key, **JSON}),
                               ("/webhooks/stripe", limits.WEBHOOK_BODY_LIMIT, {"Stripe-Signature": "t=1,v1=00"}),
                               ("/finance/login", limits.DEFAULT_BODY_LIMIT, form),
                               ("/recover/x/complete", limits.DEFAULT_BODY_LIMIT, JSON)):
        over = web.post(path, content=_chunks(cap + 1), headers=headers)
        assert over.status_code == 413 and over.json()["error"]["code"] == "payload_too_large", path
        assert web.post(path, content=_chunks(cap), headers=headers).status_code != 413, path
        lying = web.post(path, content=b" " * (cap + 1), headers={**headers, "Content-Length": "10"})
        assert lying.status_code in (400, 403, 413, 422), (path, lying.status_code)


def test_input_a_signed_webhook_at_the_cap_is_taken_and_one_byte_more_is_not(web, enqueued):
    event = stripe_events.event("payment_intent.succeeded", {"id": "pi_big", "object": "payment_intent"})
    event["padding"] = ""
    event["padding"] = "x" * (limits.WEBHOOK_BODY_LIMIT - len(json.dumps(event).encode()))
    body = json.dumps(event).encode()
    assert len(body) == limits.WEBHOOK_BODY_LIMIT
    resp = web.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": stripe_events.signature(body)})
    assert resp.status_code == 200, resp.text[:200]
    body = body[:-1] + b" }"
    resp = web.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": stripe_events.signature(body)})
    assert resp.status_code == 413


def test_input_signed_webhooks_that_are_not_events_are_400(web, enqueued):
    now = int(time.time())
    payloads = [[], "event", None, 1, {"id": 1, "type": "x", "created": now, "data": {"object": {}}},
                {"id": "evt_1", "type": "x", "created": True, "data": {"object": {}}},
                {"id": "evt_1", "type": "x", "created": now, "data": []},
                {"id": "evt_" + "1" * 100, "type": "x", "created": now, "data": {"object": {}}},
                {"id": "evt_1", "type": "x", "created": now, "data": {"object": {"id": ["pi"]}}},
                {"id": "evt_1", "type": ["x"], "created": now, "data": {"object": {}}},
                {"id": "evt_1", "type": "x", "created": "1", "data": {"object": {}}}]
    accepted = []
    for payload in payloads:
        body = json.dumps(payload).encode()
        resp = web.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": stripe_events.signature(body)})
        if resp.status_code != 400:
            accepted.append((json.dumps(payload)[:50], resp.status_code))
    assert not accepted and not enqueued, (accepted, enqueued)


def test_input_a_signed_event_that_cannot_be_stored_is_refused_as_4xx_not_5xx(web, enqueued, caplog):
    """PostgreSQL refuses NUL in ``text`` and ``\\u0000`` in ``jsonb``; a lone surrogate cannot be encoded.
    Such a delivery is bad input, not an outage: a 503 ("will be delivered again") has Stripe redeliver
    it for three days, each time logged as an error with a traceback."""
    caplog.set_level(logging.DEBUG)
    answers = []
    for label in ("NUL in the object", "NUL in the event id", "lone surrogate"):
        obj = {"id": "pi_odd", "object": "payment_intent", "description": "x"}
        event = stripe_events.event("payment_intent.succeeded", obj)
        if label == "NUL in the object":
            obj["description"] = "Ada\u0000Lovelace"
        elif label == "NUL in the event id":
            event["id"] = "evt_\u0000"
        else:
            obj["description"] = "Ada\ud800Lovelace"
        body = json.dumps(event).encode()
        resp = web.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": stripe_events.signature(body)})
        answers.append((label, resp.status_code))
    not_4xx = [a for a in answers if not 400 <= a[1] < 500]
    assert not not_4xx, not_4xx
    assert "Lovelace" not in logged(caplog)


def test_input_replayed_and_out_of_tolerance_webhooks(web, enqueued):
    event = stripe_events.event("payment_intent.succeeded", {"id": "pi_replay", "object": "payment_intent"})
    body, headers = stripe_events.signed(event)
    assert web.post("/webhooks/stripe", content=body, headers=headers).json() == {"received": True, "duplicate": False}
    again = web.post("/webhooks/stripe", content=body, headers=headers)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    with unit_of_work() as uow:
        rows = uow.session.scalars(text("SELECT id FROM webhook_events WHERE stripe_event_id = :i"),
                                   {"i": event["id"]}).all()
    assert len(rows) == 1 and set(enqueued) == set(rows)  # re-enqueued while unprocessed: processing dedupes
    now = int(time.time())
    other = json.dumps(stripe_events.event("payment_intent.succeeded", {"id": "pi_old"})).encode()
    for t, code in ((now - 301, "timestamp_too_old"), (now + 301, "timestamp_in_future"),
                    (now - 10**9, "timestamp_too_old")):
        resp = web.post("/webhooks/stripe", content=other,
                        headers={"Stripe-Signature": stripe_events.signature(other, timestamp=t)})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == code, t
    # A captured signature is bound to its timestamp and its exact bytes.
    sig = stripe_events.signature(other, timestamp=now - 400)
    attempts = [(other, sig.replace(f"t={now - 400}", f"t={now}")), (other + b" ", stripe_events.signature(other)),
                (other, f"{sig},t={now}"), (other, "v0=" + sig.split("v1=")[1] + f",t={now}"),
                (other, f"t={now}," + ",".join(["v1=" + "0" * 64] * 100)), (other, f"t={now},v1={sig.split('v1=')[1]}")]
    for content, header in attempts:
        assert web.post("/webhooks/stripe", content=content, headers={"Stripe-Signature": header}).status_code == 400
    assert set(enqueued) == set(rows)


def test_input_many_stalled_requests_do_not_stop_others_and_memory_stays_flat(env, tmp_path, write_key):
    with web_server(env, tmp_path / "web.log") as (url, process):
        port = int(url.rsplit(":", 1)[1])
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        baseline = _rss(process)
        stalled = []
        try:
            for n in range(200):
                sock = socket.create_connection(("127.0.0.1", port))
                if n % 2:
                    sock.sendall((f"POST /api/customers HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                  f"{write_key['Authorization']}\r\nContent-Type: application/json\r\n"
                                  "Content-Length: 65000\r\n\r\n{").encode())
                else:
                    sock.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b'4\r\n{"a"\r\n')
                stalled.append(sock)
            started = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - started < 5
            grown = _rss(process) - baseline
            assert grown < 40 * 1024 * 1024, f"grew {grown / 2**20:.1f} MiB for 200 stalled requests"
        finally:
            for sock in stalled:
                sock.close()


BODY_STALL_SECONDS = 12


def test_input_a_request_whose_body_stalls_is_dropped_after_a_timeout(env, tmp_path, write_key):
    """A body that stops arriving holds its connection (and its task) open for ever: enough of them use
    up the server's sockets. The server must answer (408) or close within a bounded time."""
    with web_server(env, tmp_path / "web.log") as (url, _process):
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        try:
            sock.sendall((f"POST /api/customers HTTP/1.1\r\nHost: x\r\nAuthorization: {write_key['Authorization']}\r\n"
                          'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"email"').encode())
            sock.settimeout(BODY_STALL_SECONDS)
            try:
                answer = sock.recv(1000)
            except TimeoutError:
                answer = None
            assert answer is not None, f"the stalled request was still open after {BODY_STALL_SECONDS}s"
            assert answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400", b"HTTP/1.1 413"))
        finally:
            sock.close()


# ======================================================================================================
# login
# ======================================================================================================

WRONG = "not the password at all"


@pytest.fixture
def verified(accounts, monkeypatch) -> list[str]:
    """Every password actually checked (each one is a guess the attacker got)."""
    calls: list[str] = []
    lock = threading.Lock()
    real = staff._verify

    def counting(account, password):
        with lock:
            calls.append(password)
        return real(account, password)

    monkeypatch.setattr(staff, "_verify", counting)
    return calls


def guess(app, host: str, forwarded: str | None = None, email: str = support.OPERATOR) -> int:
    client = client_for(app, host)
    page = client.get("/finance/login")
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    resp = client.post("/finance/login", headers=headers, follow_redirects=False,
                       data={"email": email, "password": WRONG, "csrf_token": support.hidden(page.text)})
    return resp.status_code


def concurrently(n: int, attempt) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        status = attempt(i)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def test_login_concurrent_guesses_with_spoofed_forwarded_for_count_as_one_address(app, verified):
    statuses = concurrently(16, lambda i: guess(app, "198.51.100.20", f"203.0.113.{i + 1}"))
    assert set(statuses) <= {401, 429} and len(statuses) == 16
    assert len(verified) <= staff.ADDRESS_FAILURES_ALLOWED, f"{len(verified)} of 16 guesses were checked"


def test_login_behind_a_trusted_proxy_the_client_cannot_choose_its_address(env, verified, monkeypatch):
    from tests.conftest import reset_process_caches

    monkeypatch.setenv("BILLING_TRUSTED_PROXIES", "10.0.0.0/8")
    reset_process_caches()
    proxied = make_app()
    # The proxy appends the address it saw; whatever the client wrote before it is the client's word.
    statuses = concurrently(14, lambda i: guess(proxied, "10.0.0.2", f"203.0.113.{i + 1}, 198.51.100.30"))
    assert set(statuses) <= {401, 429}
    assert len(verified) <= staff.ADDRESS_FAILURES_ALLOWED, f"{len(verified)} of 14 guesses were checked"
    # A client reaching the app directly (not through the proxy) is not believed at all.
    verified.clear()
    concurrently(8, lambda i: guess(proxied, "198.51.100.31", f"10.0.0.{i + 1}"))
    assert len(verified) <= staff.ADDRESS_FAILURES_ALLOWED


def test_login_guessing_from_many_real_addresses_is_capped_per_account(app, verified):
    statuses = concurrently(26, lambda i: guess(app, f"198.51.100.{i + 100}"))
    assert set(statuses) <= {401, 429}
    assert len(verified) <= staff.ACCOUNT_FAILURES_ALLOWED, f"{len(verified)} of 26 guesses were checked"
    # ... and that is per account: another account at one of those addresses still signs in.
    with client_for(app, "198.51.100.100") as other:
        assert support.login(other, support.VIEWER).status_code == 303


def _error_text(html: str) -> str:
    match = re.search(r'class="[^"]*\berror\b[^"]*"[^>]*>(.*?)<', html, re.S)
    return match.group(1).strip() if match else ""


def test_login_unknown_accounts_and_wrong_passwords_answer_alike(app, accounts):
    """Account enumeration by message, status, cookies, slow-down or time."""

    def attempt(email: str, host: str) -> tuple[httpx.Response, float]:
        client = client_for(app, host)
        page = client.get("/finance/login")
        started = time.perf_counter()
        resp = client.post("/finance/login", follow_redirects=False,
                           data={"email": email, "password": WRONG, "csrf_token": support.hidden(page.text)})
        return resp, time.perf_counter() - started

    known, unknown = [], []
    for i in range(4):
        known.append(attempt(support.OPERATOR, f"198.51.100.{200 + i}"))
        unknown.append(attempt(f"nobody{i}@example.com", f"198.51.100.{220 + i}"))
    for (k, _), (u, _) in zip(known, unknown, strict=True):
        assert (k.status_code, _error_text(k.text)) == (u.status_code, _error_text(u.text)) != (401, "")
        assert sorted(c.split("=")[0] for c in k.headers.get_list("set-cookie")) == \
            sorted(c.split("=")[0] for c in u.headers.get_list("set-cookie"))
    ratio = statistics.median(t for _, t in known) / statistics.median(t for _, t in unknown)
    # Both verify one argon2 hash; skipping it for unknown accounts would show as a ratio far above 3.
    assert 1 / 3 < ratio < 3, f"a known account answers {ratio:.2f}× as slow as an unknown one"
    # The slow-down starts after as many failures for both.
    runs = staff.ADDRESS_FAILURES_ALLOWED + 1
    assert [guess(app, "198.51.100.240") for _ in range(runs)] == \
        [guess(app, "198.51.100.240", email="ghost@example.com") for _ in range(runs)]


def test_login_a_huge_password_costs_no_more_than_a_short_one(app, accounts):
    """argon2 pre-hashes the password: 60 KB of password must not buy an attacker a slower server."""
    client = client_for(app, "198.51.100.250")
    timings = []
    for password in ("short", "p" * 60_000):
        page = client.get("/finance/login")
        started = time.perf_counter()
        resp = client.post("/finance/login", follow_redirects=False,
                           data={"email": support.OPERATOR, "password": password,
                                 "csrf_token": support.hidden(page.text)})
        timings.append(time.perf_counter() - started)
        assert resp.status_code == 401
    assert timings[1] < 3 * timings[0] + 0.2, timings


def test_login_session_fixation_a_planted_session_is_never_upgraded(app, accounts, world):
    attacker = signed_in(app, support.VIEWER)
    planted = attacker.cookies.get("finance_session")
    victim = client_for(app)
    victim.cookies.set("finance_session", planted, domain="billing.test", path="/finance")
    fresh = client_for(app).get("/finance/login")
    resp = victim.post("/finance/login", follow_redirects=False,
                       cookies={"finance_login_csrf": fresh.cookies.get("finance_login_csrf")},
                       data={"email": support.OPERATOR, "password": support.PASSWORD,
                             "csrf_token": support.hidden(fresh.text)})
    assert resp.status_code in (303, 403)
    issued = resp.cookies.get("finance_session")
    assert issued != planted
    # Whatever happened, the planted cookie is still the attacker's viewer session: it cannot act.
    before = fingerprint()
    resp = attacker.post(f"/finance/charges/{world['charge_id']}/actions/void",
                         data={"csrf_token": support.hidden(attacker.get("/finance/queue").text), "reason": "r"})
    assert resp.status_code == 403
    assert fingerprint() == before


def test_login_a_logged_out_or_revoked_cookie_is_dead(app, accounts):
    console = signed_in(app)
    cookie = console.cookies.get("finance_session")
    page = console.get("/finance/queue")
    assert console.post("/finance/logout", data={"csrf_token": support.hidden(page.text)},
                        follow_redirects=False).status_code == 303
    assert client_for(app, cookies={"finance_session": cookie}).get("/finance/queue",
                                                                    follow_redirects=False).status_code == 303
    other = signed_in(app, support.VIEWER)
    staff.revoke_sessions(support.VIEWER)
    assert other.get("/finance/queue", follow_redirects=False).status_code == 303


def test_login_csrf_every_console_post_refuses_missing_wrong_and_foreign_tokens(app, accounts, world):
    operator = signed_in(app)
    staff.add_staff("oscar.operator@example.com", support.PASSWORD, "operator")
    other = signed_in(app, "oscar.operator@example.com")
    charge_page = f"/finance/charges/{world['charge_id']}"
    foreign, own = support.hidden(other.get(charge_page).text), support.hidden(operator.get(charge_page).text)
    login_token = support.hidden(client_for(app).get("/finance/login").text)
    posts = sorted({p for m, p in routes_of(app) if m == "POST" and p.startswith("/finance/")} - {"/finance/login"})
    assert posts == ["/finance/charges/{charge_id}/actions/{action}", "/finance/logout"]
    before = fingerprint()
    got_through = []
    targets = [f"/finance/charges/{world['charge_id']}/actions/{a.value}" for a in finance.Action] + ["/finance/logout"]
    for path in targets:
        for token in (None, "", own[:-1], foreign, login_token, own.upper(), own + " ", " " + own):
            data = {"reason": "customer asked"} | ({} if token is None else {"csrf_token": token})
            resp = operator.post(path, data=data, follow_redirects=False)
            if resp.status_code != 403:
                got_through.append((path, token and token[:6], resp.status_code))
        # The token in a JSON body or in the query string is no form token.
        for resp in (operator.post(path, json={"csrf_token": own, "reason": "r"}, follow_redirects=False),
                     operator.post(f"{path}?csrf_token={own}", data={"reason": "r"}, follow_redirects=False)):
            if resp.status_code != 403:
                got_through.append(where(resp))
    assert not got_through, got_through
    assert fingerprint() == before
    with unit_of_work() as uow:
        assert uow.session.scalar(select(AuditEntry.id).limit(1)) is None
    assert operator.get("/finance/queue").status_code == 200  # still signed in: the logouts were refused too
    # The login form's token is bound to its own cookie, not to any other visitor's.
    stranger = client_for(app)
    stranger.get("/finance/login")
    for data in ({"csrf_token": login_token}, {}):
        resp = stranger.post("/finance/login", follow_redirects=False,
                             data={"email": support.OPERATOR, "password": support.PASSWORD, **data})
        assert resp.status_code == 403


def test_login_next_never_leaves_this_origin(app, accounts):
    targets = ["/finance/..//evil.example", "/finance//evil.example", "/finance/%2F%2Fevil.example",
               "/finance/../../\\evil.example", "/finance@evil.example", "/finance/\u3002evil.example",
               "//evil.example/finance/", "/finance/\t/evil.example", "https:/evil.example/finance/",
               "/finance/queue#@evil.example", "\\\\evil.example/finance/", "/finance/%0d%0a", "/finance/\u2028evil",
               "/\x00/evil.example", "/finance/\x00", "http://billing.test@evil.example/finance/", "/finance/\\evil"]
    client = client_for(app)
    escaped = []
    for target in targets:
        page = client.get("/finance/login", params={"next": target}, follow_redirects=False)
        if page.status_code == 200:
            resp = client.post("/finance/login", follow_redirects=False, data={
                "email": support.OPERATOR, "password": support.PASSWORD, "csrf_token": support.hidden(page.text),
                "next": target})
        else:  # already signed in: the login page sends the visitor on by itself
            resp = page
        assert resp.status_code == 303, (target, resp.status_code)
        location = resp.headers["location"]
        resolved = urlsplit(urljoin(f"{PUBLIC_URL}/finance/login", location))
        elsewhere = (resolved.scheme, resolved.netloc) != ("http", "billing.test")
        if elsewhere or "\\" in location or not location.isprintable():
            escaped.append((target, location))
    assert not escaped, escaped


def test_login_the_database_holds_no_usable_session_link_or_secret(app, accounts, world, session_factory):
    """Whoever reads the database (a backup, a replica) finds hashes and display data, not a way in."""
    console = signed_in(app)
    token = staff.unsign(console.cookies.get("finance_session"))
    put(session_factory, world["charge_id"])
    with unit_of_work() as uow:
        stored_sessions = uow.session.scalars(text("SELECT token_hash FROM staff_sessions")).all()
        row = uow.session.scalars(select(Notification)).one()
        keys = uow.session.scalars(text("SELECT key_hash FROM api_keys")).all()
    assert token not in stored_sessions and hashlib.sha256(token.encode()).hexdigest() in stored_sessions
    dumped = json.dumps(row.context)
    assert "/recover/" not in dumped and "secret" not in dumped.lower() and "token" not in dumped.lower()
    assert keys and all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
