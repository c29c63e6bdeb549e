"""Input refused at the edge: hostile values get a 4xx and change nothing, anywhere a request can carry them.

- NUL, CR, LF, DEL and U+2028 in every field of every JSON API body → 422 ``invalid_request`` naming the
  field; in every path id and query parameter (read from the OpenAPI document, so a new route is covered
  by itself), in the customer pages' tokens and in the finance console's filters, forms and ids → 4xx.
  Nothing is written to the database and nothing is created at Stripe.
- Ids beyond BIGINT, zero or negative → 404.
- ``start_at``: a zoned ISO 8601 string inside its window, nothing else.
- Currency and amount by Stripe's rules: EUR 1 refused naming the minimum, JPY 50 accepted, KWD in
  steps of 10, an unsupported currency refused.
- A 50 MiB chunked body to a real ``billing web`` (uvicorn) answers 413 while the process's memory stays
  flat.
- Neither a refused body nor an unexpected error writes the customer's email or name into a log line.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from billing.db import unit_of_work
from billing.models import AuditEntry, Charge, Subscription
from tests import factories, stripe_events
from tests.finance import support
from tests.integration.billing_helpers import api_key_headers
from tests.integration.cycle import web_server_process

pytestmark = pytest.mark.usefixtures("clean_db")

HOSTILE = {"NUL": "\x00", "CR": "\r", "LF": "\n", "DEL": "\x7f", "LINE SEPARATOR": "\u2028"}
WATCHED_TABLES = ("customers", "card_setups", "payment_methods", "subscriptions", "charges", "attempts",
                  "recovery_tokens", "notifications", "audit_log")
MIB = 1024 * 1024


@pytest.fixture
def web_env(app_env, sandbox):
    from tests.conftest import environ_applied

    env = {**app_env, "BILLING_STRIPE_PUBLISHABLE_KEY": "pk_test_edge",
           "BILLING_STRIPE_JS_URL": f"{sandbox.url}/js/v3/stripe.js",
           "BILLING_STRIPE_WEBHOOK_SECRET": stripe_events.SECRET}
    with environ_applied(env):
        yield env


@pytest.fixture
def client(web_env):
    from billing.web.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False, headers=api_key_headers()) as c:
        yield c


def counts() -> dict[str, int]:
    with unit_of_work() as uow:
        return {t: uow.session.scalar(text(f"SELECT count(*) FROM {t}")) for t in WATCHED_TABLES}


def soon(**delta) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def customer_id(client) -> int:
    resp = client.post("/api/customers", json={"email": "ada@example.com", "name": "Ada Lovelace"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def error_of(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if code:
        assert err["code"] == code, err
    return err


# --- NUL and friends in every body field ---------------------------------------------------------------

def _bodies(cid: int) -> list[tuple[str, str, dict]]:
    """A valid body for every JSON API route that takes one."""
    return [
        ("POST", "/api/customers", {"email": "grace@example.com", "name": "Grace Hopper", "country": "US",
                                    "locale": "en-US"}),
        ("POST", f"/api/customers/{cid}/card-setups", {"payment_method": "pm_card_visa"}),
        ("POST", f"/api/customers/{cid}/payment-methods/import",
         {"payment_method": "pm_card_visa", "saved_at": "2020-06-01T00:00:00+00:00"}),
        ("POST", "/api/subscriptions", {"customer_id": cid, "amount": 1999, "currency": "eur", "interval": "month",
                                        "interval_count": 1, "start_at": soon(minutes=5)}),
    ]


def _tainted(value, char: str) -> str:
    text_value = str(value)
    return text_value[:1] + char + text_value[1:]


def test_every_body_field_is_covered(client):
    """Each request body property in the OpenAPI document appears in :func:`_bodies` (a new field must)."""
    spec = client.get("/openapi.json").json()
    covered = {(method, path.replace("/1/", "/{customer_id}/")): set(body) for method, path, body in _bodies(1)}
    checked = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            ref = (op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}))
            ref = ref.get("$ref") or next((s.get("$ref") for s in ref.get("anyOf", []) if "$ref" in s), None)
            if not path.startswith("/api/") or not ref:
                continue
            schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
            assert set(schema.get("properties", {})) <= covered.get((method.upper(), path), set()), (method, path)
            checked += 1
    assert checked == len(covered)


@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_in_any_body_field_are_refused_naming_it(client, sandbox, char):
    cid = customer_id(client)
    before, stripe_before = counts(), dict(sandbox.app.sandbox.state.customers)
    for method, path, body in _bodies(cid):
        for field, value in body.items():
            resp = client.request(method, path, json={**body, field: _tainted(value, char)})
            err = error_of(resp, 422, "invalid_request")
            assert err["fields"][0]["field"] == field, (path, field, err)
            assert err["message"].startswith(f"{field}: "), err
    assert counts() == before
    assert dict(sandbox.app.sandbox.state.customers) == stripe_before


def test_a_name_or_email_with_a_control_character_is_refused_by_the_service_too(web_env):
    """The service checks for itself (the CLI and the demo call it directly, without the API's schema)."""
    from billing import enrolment

    for email, name in (("ada@example.com", "Ada\r\nBcc: everyone@example.com"), ("ada@example.com\x00", "Ada"),
                        ("ada@example.com", "Ada\u2028Lovelace")):
        with pytest.raises(enrolment.InvalidInput) as caught:
            enrolment.create_customer(email, name)
        assert caught.value.code == "invalid_request"
    assert counts()["customers"] == 0


def test_emails_are_checked_by_the_validator_and_stored_normalized(client):
    for email in ("ada@", "ada@localhost", "ada..x@example.com", "ada@example..com", "a b@example.com",
                  "ada@example.com <ada@example.com>"):
        error_of(client.post("/api/customers", json={"email": email, "name": "Ada"}), 422, "invalid_input")
    resp = client.post("/api/customers", json={"email": "Ada.Lovelace@EXAMPLE.com", "name": "  Ada  "})
    assert resp.status_code == 201, resp.text
    assert resp.json()["email"] == "Ada.Lovelace@example.com"
    with unit_of_work() as uow:
        row = uow.session.execute(text("SELECT email, name FROM customers")).one()
    assert tuple(row) == ("Ada.Lovelace@example.com", "Ada")


@pytest.mark.parametrize(("locale", "ok"), [("en", True), ("de-DE", True), ("zh-Hant-TW", True), ("es-419", True),
                                            ("english", False), ("de_DE", False), ("", False), ("d", False)])
def test_locale_is_a_language_tag(client, locale, ok):
    resp = client.post("/api/customers", json={"email": "ada@example.com", "name": "Ada", "locale": locale})
    assert resp.status_code == (201 if ok else 422), resp.text


# --- path ids and query parameters -----------------------------------------------------------------------

OUT_OF_RANGE = ["99999999999999999999", str(2**63), "0", "-1", "-99999999999999999999"]


def _api_operations(client) -> list[tuple[str, str, dict]]:
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() if path.startswith("/api/")
            for method, op in ops.items()]


def _fill(path: str, **values: str) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


def test_ids_beyond_bigint_zero_or_negative_are_404(client, sandbox):
    cid = customer_id(client)
    before = counts()
    integer_paths = [(m, p) for m, p, _ in _api_operations(client) if "_id}" in p and "{setup_intent_id}" not in p]
    assert len(integer_paths) >= 4
    bodies = {"/api/customers/{customer_id}/payment-methods/import":
              {"payment_method": "pm_card_visa", "saved_at": "2020-06-01T00:00:00Z"}}
    for method, path in integer_paths:
        for bad in OUT_OF_RANGE:
            url = _fill(path, customer_id=bad, subscription_id=bad)
            resp = client.request(method, url, json=bodies.get(path, {}) if method == "POST" else None)
            error_of(resp, 404, "not_found")
    body = {"customer_id": 99999999999999999999, "amount": 1999, "currency": "eur", "interval": "month"}
    assert client.post("/api/subscriptions", json=body).status_code in (404, 422)
    assert counts() == before
    assert len(sandbox.app.sandbox.state.customers) == 1 and cid  # only the one made above


@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_in_path_ids_and_query_parameters_are_4xx(client, char):
    cid = customer_id(client)
    before = counts()
    tainted = quote(_tainted("seti_123", char), safe="")
    for method, path, op in _api_operations(client):
        params = [p for p in op.get("parameters", []) if p["in"] in ("path", "query")]
        if any(p["in"] == "path" for p in params):
            url = _fill(path, customer_id=quote(_tainted(cid, char), safe=""), subscription_id=quote(
                _tainted(cid, char), safe=""), setup_intent_id=tainted)
            resp = client.request(method, url, json={} if method == "POST" else None)
            assert 400 <= resp.status_code < 500, (method, url, resp.status_code, resp.text)
            assert set(resp.json()) == {"error"}
        for query in (p for p in params if p["in"] == "query"):
            url = _fill(path, customer_id=str(cid), subscription_id=str(cid), setup_intent_id="seti_123")
            resp = client.request(method, url, params={query["name"]: _tainted("x", char)})
            assert resp.status_code < 500, (method, url, query["name"], resp.text)
    assert counts() == before


def test_a_card_setup_id_that_cannot_be_stripes_is_404_without_asking_stripe(client, sandbox):
    for bad in ("%00", "seti_%00", "seti_1%0D%0Ax", "seti_" + "x" * 300, "seti_%E2%80%A8", "..", "seti_1;drop"):
        error_of(client.get(f"/api/card-setups/{bad}"), 404, "not_found")
    assert not sandbox.app.sandbox.state.setup_intents


# --- customer pages --------------------------------------------------------------------------------------

@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_in_customer_page_tokens_are_404_pages(client, char):
    token = quote(_tainted("A" * 43, char), safe="")
    before = counts()
    for page in ("setup", "recover"):
        resp = client.get(f"/{page}/{token}")
        assert resp.status_code == 404, resp.text
        assert resp.headers["content-type"].startswith("text/html")
        done = client.post(f"/{page}/{token}/complete", json={})
        assert done.status_code == 404 and done.json()["error"]["code"] == "link_not_found"
    assert counts() == before


# --- finance console -------------------------------------------------------------------------------------

@pytest.fixture
def staff_client(web_env, database_url):
    from billing.web.app import create_app

    support.truncate_staff(database_url)
    support.add_accounts()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        assert support.login(c).status_code == 303
        yield c


@pytest.fixture
def a_charge() -> int:
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session)
        sub = factories.make_subscription(uow.session, customer)
        charge = factories.make_charge(uow.session, sub, status="requires_payment_method", attempts=1,
                                       last_error_code="card_declined", last_decline_code="insufficient_funds")
        uow.commit()
        return charge.id


@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_in_finance_filters_are_400_naming_the_filter(staff_client, a_charge, char):
    for name, value in (("status", "requires_payment_method"), ("decline_code", "insufficient_funds"),
                        ("country", "DE"), ("date_from", "2025-01-01"), ("date_to", "2025-12-31"),
                        ("sort", "amount"), ("direction", "desc")):
        for page in ("/finance/queue", "/finance/queue.csv"):
            resp = staff_client.get(page, params={name: _tainted(value, char)})
            assert resp.status_code == 400, (page, name, resp.text[:300])
    # The page number is a number or the first page.
    assert staff_client.get("/finance/queue", params={"page": "1\x00"}).status_code == 200
    assert staff_client.get("/finance/queue", params={"page": "99999999999999999999"}).status_code == 200


def test_finance_charge_ids_out_of_range_are_404(staff_client, a_charge):
    page = staff_client.get(f"/finance/charges/{a_charge}")
    csrf = support.hidden(page.text)
    before = counts()
    for bad in OUT_OF_RANGE:
        assert staff_client.get(f"/finance/charges/{bad}").status_code == 404, bad
        resp = staff_client.post(f"/finance/charges/{bad}/actions/void",
                                 data={"csrf_token": csrf, "reason": "customer asked"}, follow_redirects=False)
        assert resp.status_code == 404, (bad, resp.text[:300])
    assert staff_client.get("/finance/charges/1%00").status_code in (404, 422)
    assert counts() == before


@pytest.mark.parametrize("char", ["\x00", "\x7f", "\u2028", "\x1b"])
def test_a_control_character_in_an_action_reason_is_refused_and_nothing_changes(staff_client, a_charge, char):
    page = staff_client.get(f"/finance/charges/{a_charge}")
    resp = staff_client.post(f"/finance/charges/{a_charge}/actions/void",
                             data={"csrf_token": support.hidden(page.text), "reason": f"customer{char} asked"},
                             follow_redirects=False)
    assert resp.status_code == 422, resp.text[:300]
    with unit_of_work() as uow:
        assert uow.session.get(Charge, a_charge).status == "requires_payment_method"
        assert uow.session.scalar(select(func.count()).select_from(AuditEntry)) == 0
    # Lines in a reason are fine.
    ok = support.act(staff_client, a_charge, "void", reason="customer called\r\nand asked to stop")
    assert ok.status_code == 303, ok.text[:300]


def test_a_control_character_in_the_login_email_is_a_4xx(web_env, database_url):
    from billing.web.app import create_app

    support.truncate_staff(database_url)
    support.add_accounts()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        for char in HOSTILE.values():
            resp = support.login(c, email=_tainted(support.OPERATOR, char))
            assert 400 <= resp.status_code < 500, resp.text[:300]


def test_the_overview_sums_amounts_of_every_currency(staff_client):
    """PostgreSQL's sum() is a Decimal: the overview shows it in each currency's decimals."""
    with unit_of_work() as uow:
        for currency, amount in (("eur", 1999), ("jpy", 1500), ("kwd", 1230)):
            customer = factories.make_customer(uow.session)
            sub = factories.make_subscription(uow.session, customer, currency=currency, amount=amount)
            factories.make_charge(uow.session, sub, status="requires_payment_method")
        uow.commit()
    resp = staff_client.get("/finance/overview")
    assert resp.status_code == 200, resp.text[:500]
    for shown in ("€19.99", "¥1,500", "1.230 KWD"):
        assert shown in resp.text


# --- start_at --------------------------------------------------------------------------------------------

def _at(**delta):
    """A time relative to when the test runs (not to when it was collected)."""
    return lambda: soon(**delta)


@pytest.mark.parametrize(("start_at", "status", "code"), [
    (0, 422, "invalid_request"),
    (1767225600, 422, "invalid_request"),
    ("0", 422, "invalid_request"),
    (1.5, 422, "invalid_request"),
    (True, 422, "invalid_request"),
    ("2027-01-01", 422, "invalid_request"),
    ("2027-01-01T09:00:00", 422, "invalid_request"),
    ("2027-01-01 09:00:00+01:00", 422, "invalid_request"),
    ("2027-02-30T09:00:00+01:00", 422, "invalid_request"),
    ("2027-01-01T09:00:00+25:00", 422, "invalid_request"),
    ("next tuesday", 422, "invalid_request"),
    (_at(hours=-2), 422, "invalid_input"),
    (_at(days=-20400), 422, "invalid_input"),
    (_at(days=400), 422, "invalid_input"),
    ("9999-12-31T23:59:59+00:00", 422, "invalid_input"),
    (_at(minutes=-30), 201, None),
    (_at(days=300), 201, None),
    (lambda: (datetime.now(UTC) + timedelta(days=1)).astimezone(timezone(timedelta(hours=-5))).isoformat(), 201, None),
    (lambda: (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), 201, None),
])
def test_start_at_is_a_zoned_time_in_its_window(client, start_at, status, code):
    cid = customer_id(client)
    start_at = start_at() if callable(start_at) else start_at
    body = {"customer_id": cid, "amount": 1999, "currency": "eur", "interval": "day", "start_at": start_at}
    resp = client.post("/api/subscriptions", json=body)
    assert resp.status_code == status, resp.text
    if code:
        err = error_of(resp, status, code)
        assert err["message"].startswith("start_at: "), err
        assert counts()["subscriptions"] == 0


def test_the_grace_before_now_is_named_in_the_refusal(client):
    from billing import enrolment

    cid = customer_id(client)
    body = {"customer_id": cid, "amount": 1999, "currency": "eur", "interval": "day", "start_at": soon(hours=-2)}
    err = error_of(client.post("/api/subscriptions", json=body), 422, "invalid_input")
    assert enrolment.START_AT_GRACE == timedelta(hours=1)
    assert "no earlier than 1 hour before now" in err["message"]


# --- currency and amount ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("amount", "currency", "words"), [
    (1, "eur", "amount: at least 0.50 EUR"),
    (49, "jpy", "amount: at least 50 JPY"),
    (29, "gbp", "amount: at least 0.30 GBP"),
    (100_000_000, "eur", "amount: at most 999,999.99 EUR"),
    (1234, "kwd", "amount: KWD amounts must be a multiple of 10"),
    (1999, "xyz", "currency: XYZ is not a currency Stripe can charge in"),
])
def test_amounts_stripe_would_refuse_are_refused(client, amount, currency, words):
    cid = customer_id(client)
    body = {"customer_id": cid, "amount": amount, "currency": currency, "interval": "month"}
    err = error_of(client.post("/api/subscriptions", json=body), 422, "invalid_input")
    assert err["message"].startswith(words), err
    assert err["field"] == words.split(":")[0]
    assert counts()["subscriptions"] == 0


@pytest.mark.parametrize(("amount", "currency"), [(50, "jpy"), (50, "EUR"), (1230, "kwd"), (99_999_999, "eur"),
                                                  (999_999_999, "idr")])
def test_amounts_at_the_limits_are_accepted(client, amount, currency):
    cid = customer_id(client)
    body = {"customer_id": cid, "amount": amount, "currency": currency, "interval": "month"}
    resp = client.post("/api/subscriptions", json=body)
    assert resp.status_code == 201, resp.text
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, resp.json()["id"])
        assert (sub.amount, sub.currency) == (amount, currency.lower())


# --- an over-size chunked body against the real server ---------------------------------------------------

@contextlib.contextmanager
def web_server(env: dict[str, str], log_path):
    with web_server_process(env, log_path) as (url, proc):
        yield url, psutil.Process(proc.pid)


def _rss(process: psutil.Process) -> int:
    return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))


def _chunks(total: int, size: int = 64 * 1024):
    block = b"{" + b" " * (size - 1)
    for _ in range(total // size):
        yield block


def test_an_oversize_chunked_body_is_413_and_the_server_does_not_hold_it(web_env, tmp_path):
    headers = api_key_headers()
    with web_server(web_env, tmp_path / "web.log") as (url, process), httpx.Client(base_url=url, timeout=120) as http:
        # Warm up every path the test takes, so that what is measured is the bodies.
        assert http.post("/api/customers", json={"email": "ada@example.com", "name": "Ada"},
                         headers=headers).status_code == 201
        assert http.post("/webhooks/stripe", content=b"{}").status_code == 400
        baseline, peak, stop = _rss(process), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(process))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for path, extra in (("/webhooks/stripe", {"Stripe-Signature": "t=1,v1=00"}),
                                ("/api/customers", {**headers, "Content-Type": "application/json"})):
                resp = http.post(path, content=_chunks(50 * MIB), headers=extra)
                assert resp.status_code == 413, (path, resp.text[:300])
                assert set(resp.json()) == {"error"} and resp.json()["error"]["code"] == "payload_too_large"
            # Declared too large: refused before a byte of the body is read.
            resp = http.post("/api/customers", content=b" " * (2 * MIB),
                             headers={**headers, "Content-Type": "application/json"})
            assert resp.status_code == 413
        finally:
            stop.set()
            sampler.join(5)
        grown = max(peak[0], _rss(process)) - baseline
        assert grown < 30 * MIB, f"web process grew by {grown / MIB:.1f} MiB"
        # A body under the cap still works, on the same server.
        assert http.get("/healthz").status_code == 200
    log_text = (tmp_path / "web.log").read_text()
    assert '"status": 413' in log_text or " 413 " in log_text


# --- logs ------------------------------------------------------------------------------------------------

PII_EMAIL = "pii.person@example.com"
PII_NAME = "Piia Secretname"


def _logged(caplog) -> str:
    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        lines.append(str(record.__dict__))
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(lines)


def test_a_refused_body_writes_no_email_or_name_to_the_log(client, caplog):
    caplog.set_level(logging.DEBUG)
    for body in ({"email": PII_EMAIL, "name": PII_NAME + "\x00"}, {"email": PII_EMAIL + "\n", "name": PII_NAME},
                 {"email": PII_EMAIL, "name": PII_NAME, "country": "Piiland"}, {"email": "x", "name": PII_NAME}):
        assert client.post("/api/customers", json=body).status_code == 422
    logged = _logged(caplog)
    assert "POST /api/customers 422" in logged
    assert PII_EMAIL not in logged and "Secretname" not in logged and "pii.person" not in logged


def test_an_unexpected_error_is_a_generic_500_logged_without_its_message(client, caplog, monkeypatch):
    from billing import enrolment

    def broken(email, name, country=None, **_kw):
        raise RuntimeError(f"could not store {email} ({name})")

    monkeypatch.setattr(enrolment, "create_customer", broken)
    caplog.set_level(logging.DEBUG)
    resp = client.post("/api/customers", json={"email": PII_EMAIL, "name": PII_NAME})
    err = error_of(resp, 500, "internal_error")
    assert PII_EMAIL not in resp.text
    assert set(err) == {"code", "message"}
    logged = _logged(caplog)
    assert PII_EMAIL not in logged and "Secretname" not in logged
    [line] = [r for r in caplog.records if getattr(r, "error", None) == "RuntimeError"]
    assert line.levelno == logging.ERROR and line.route == "/api/customers"
    assert any("in broken" in frame for frame in line.where)  # where it happened, without what it said


def test_database_errors_do_not_quote_their_parameters(web_env):
    """A driver error's text (which tracebacks and ``log.exception`` print) names no bound value."""
    import sqlalchemy.exc

    from billing.db import get_engine

    with get_engine().connect() as conn, pytest.raises(sqlalchemy.exc.SQLAlchemyError) as caught:
        conn.execute(text("SELECT count(*) FROM customers WHERE email = :email"), {"email": PII_EMAIL + "\x00"})
    assert PII_EMAIL not in str(caught.value)
