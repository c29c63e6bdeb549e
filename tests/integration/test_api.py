"""The JSON API over HTTP (FastAPI's TestClient), against the Stripe sandbox and the real database.

Every route's happy path, then the ways a request can be wrong: each answers a 4xx with the body
``{"error": {"code", "message"}}`` and changes nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from billing.db import unit_of_work
from billing.models import AuditEntry, CardSetup, Charge, ChargeStatus, Customer, PaymentMethod, Subscription

pytestmark = pytest.mark.usefixtures("clean_db")

# A day inside the window a subscription may start in (enrolment.START_AT_HORIZON).
SOON = datetime.now(UTC) + timedelta(days=30)


@pytest.fixture
def client(app_env):
    from billing.web.app import create_app
    from tests.integration.billing_helpers import api_key_headers

    with TestClient(create_app(), raise_server_exceptions=False, headers=api_key_headers()) as c:
        yield c


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def count(model) -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.count()).select_from(model))


def new_customer(client, email="ada@example.com", **extra) -> dict:
    resp = client.post("/api/customers", json={"email": email, "name": "Ada Lovelace", **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def new_subscription(client, customer_id: int, **extra) -> dict:
    body = {"customer_id": customer_id, "amount": 1999, "currency": "eur", "interval": "month", **extra}
    resp = client.post("/api/subscriptions", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


# --- customers -------------------------------------------------------------------------------------

def test_create_customer(client, sandbox):
    body = new_customer(client, country="de")
    assert set(body) == {"id", "email", "stripe_customer_id"}
    assert body["email"] == "ada@example.com" and body["stripe_customer_id"].startswith("cus_")
    stripe_customer = sandbox.app.sandbox.state.customers[body["stripe_customer_id"]]
    from billing.installation import installation_id

    assert stripe_customer["metadata"] == {"customer_id": str(body["id"]), "installation": installation_id()}
    with unit_of_work() as uow:
        assert uow.session.get(Customer, body["id"]).country == "DE"


def test_lost_stripe_response_does_not_duplicate_the_stripe_customer(client, sandbox):
    sandbox.control.add_fault("lose_response", method="POST", path="/v1/customers", count=1)
    body = new_customer(client)
    assert body["stripe_customer_id"].startswith("cus_")
    assert list(sandbox.app.sandbox.state.customers) == [body["stripe_customer_id"]]


def test_stripe_down_still_creates_the_customer_and_the_card_setup_completes_it(client, sandbox):
    sandbox.control.add_fault("reset", method="POST", path="/v1/customers", count=4)
    body = new_customer(client)
    assert body["stripe_customer_id"] is None
    resp = client.post(f"/api/customers/{body['id']}/card-setups", json={})
    assert resp.status_code == 201, resp.text
    with unit_of_work() as uow:
        assert uow.session.get(Customer, body["id"]).stripe_customer_id.startswith("cus_")
    assert len(sandbox.app.sandbox.state.customers) == 1


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"name": "Ada"}, 422, "invalid_request"),
    ({"email": "ada@example.com"}, 422, "invalid_request"),
    ({"email": "not-an-email", "name": "Ada"}, 422, "invalid_input"),
    ({"email": "ada@example.com", "name": "  "}, 422, "invalid_input"),
    ({"email": "ada@example.com", "name": "Ada", "country": "Germany"}, 422, "invalid_input"),
    ({"email": "ada@example.com", "name": "Ada", "plan": "gold"}, 422, "invalid_request"),
    ({"email": 42, "name": "Ada"}, 422, "invalid_request"),
    ([], 422, "invalid_request"),
])
def test_create_customer_bad_input(client, sandbox, body, status, code):
    assert_error(client.post("/api/customers", json=body), status, code)
    assert count(Customer) == 0 and not sandbox.app.sandbox.state.customers


def test_validation_error_names_the_field(client):
    err = assert_error(client.post("/api/customers", json={"name": "Ada"}), 422, "invalid_request")
    assert err["message"].startswith("email")
    assert err["fields"][0]["field"] == "email"


def test_malformed_json(client):
    resp = client.post("/api/customers", content=b'{"email": "ada@', headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "malformed_json")
    assert count(Customer) == 0


# --- card setups -----------------------------------------------------------------------------------

def test_card_setup_confirmed_server_side_saves_the_card(client, sandbox):
    customer = new_customer(client)
    sub = new_subscription(client, customer["id"])  # created before the card: it gets the card too
    resp = client.post(f"/api/customers/{customer['id']}/card-setups", json={"payment_method": "pm_card_visa"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["status"] == "succeeded" and body["setup_intent_id"].startswith("seti_")
    assert "client_secret" not in body  # final: nothing left for Stripe.js to do
    assert body["setup_url"].startswith("http://billing.test/setup/")

    got = client.get(f"/api/card-setups/{body['setup_intent_id']}").json()
    assert got["status"] == "succeeded"
    pm = got["payment_method"]
    assert pm["id"].startswith("pm_") and (pm["brand"], pm["last4"], pm["country"]) == ("visa", "4242", "US")
    assert set(pm) == {"id", "brand", "last4", "country", "mandate_id"}

    with unit_of_work() as uow:
        row = uow.session.scalars(select(PaymentMethod)).one()
        assert row.stripe_payment_method_id == pm["id"] and row.fingerprint and row.setup_intent_id == body[
            "setup_intent_id"]
        assert (row.exp_month, row.exp_year) != (None, None) and row.previous_authorization is False
        assert uow.session.get(Customer, customer["id"]).default_payment_method_id == row.id
        assert uow.session.get(Subscription, sub["id"]).payment_method_id == row.id
        assert uow.session.scalars(select(CardSetup)).one().payment_method_id == row.id


def test_same_card_saved_twice_is_one_row(client):
    customer = new_customer(client)
    ids = []
    for _ in range(2):
        resp = client.post(f"/api/customers/{customer['id']}/card-setups", json={"payment_method": "pm_card_visa"})
        ids.append(client.get(f"/api/card-setups/{resp.json()['setup_intent_id']}").json()["payment_method"]["id"])
    assert ids[0] != ids[1]  # Stripe made a second PaymentMethod for the same card
    with unit_of_work() as uow:
        row = uow.session.scalars(select(PaymentMethod)).one()
        assert row.stripe_payment_method_id == ids[1]
    assert count(CardSetup) == 2


def _logged_secret(caplog, secret: str, loggers=None) -> list[str]:
    return [r.name for r in caplog.records
            if (loggers is None or r.name.split(".")[0] in loggers)
            and (secret in r.getMessage() or secret in repr(r.__dict__))]


def test_card_setup_without_payment_method_returns_client_secret_never_logged(client, caplog):
    customer = new_customer(client)
    with caplog.at_level(logging.DEBUG):
        resp = client.post(f"/api/customers/{customer['id']}/card-setups")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["status"] == "requires_payment_method"
    secret = body["client_secret"]
    assert secret.startswith(body["setup_intent_id"] + "_secret")
    assert _logged_secret(caplog, secret, loggers={"billing", "httpx", "uvicorn", "celery"}) == []
    got = client.get(f"/api/card-setups/{body['setup_intent_id']}").json()
    assert got == {"setup_intent_id": body["setup_intent_id"], "status": "requires_payment_method",
                   "payment_method": None}


def test_stripe_sdk_never_logs_a_client_secret(client, caplog):
    customer = new_customer(client)
    with caplog.at_level(logging.DEBUG):
        secret = client.post(f"/api/customers/{customer['id']}/card-setups").json()["client_secret"]
    assert _logged_secret(caplog, secret) == []


def test_three_d_secure_setup_is_returned_as_it_is_then_refreshed(client, sandbox):
    customer = new_customer(client)
    resp = client.post(f"/api/customers/{customer['id']}/card-setups",
                       json={"payment_method": "pm_card_threeDSecure2Required"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["status"] == "requires_action" and body["client_secret"]
    assert client.get(f"/api/card-setups/{body['setup_intent_id']}").json()["payment_method"] is None

    sandbox.control.complete_3ds(body["setup_intent_id"])
    got = client.get(f"/api/card-setups/{body['setup_intent_id']}").json()
    assert got["status"] == "succeeded" and got["payment_method"]["last4"] == "3220"
    with unit_of_work() as uow:
        assert uow.session.get(Customer, customer["id"]).default_payment_method_id is not None


def test_declined_card_on_setup_is_402_with_stripe_code(client):
    customer = new_customer(client)
    resp = client.post(f"/api/customers/{customer['id']}/card-setups",
                       json={"payment_method": "pm_card_chargeDeclinedInsufficientFunds"})
    err = assert_error(resp, 402, "card_declined")
    assert err["setup_intent_id"].startswith("seti_")
    assert err["setup_url"].startswith("http://billing.test/setup/")  # another card can be tried there
    assert count(PaymentMethod) == 0
    with unit_of_work() as uow:
        setup = uow.session.scalars(select(CardSetup)).one()
        assert setup.last_error_code == "card_declined"


def test_idempotency_key_header_returns_the_same_setup_intent(client, sandbox):
    customer = new_customer(client)
    first = client.post(f"/api/customers/{customer['id']}/card-setups", headers={"Idempotency-Key": "k-1"}).json()
    again = client.post(f"/api/customers/{customer['id']}/card-setups", headers={"Idempotency-Key": "k-1"}).json()
    other = client.post(f"/api/customers/{customer['id']}/card-setups", headers={"Idempotency-Key": "k-2"}).json()
    assert first["setup_intent_id"] == again["setup_intent_id"] != other["setup_intent_id"]
    assert count(CardSetup) == 2


def test_card_setup_errors(client, sandbox):
    assert_error(client.post("/api/customers/999/card-setups", json={}), 404, "not_found")
    assert_error(client.post("/api/customers/99999999999999999999/card-setups", json={}), 404, "not_found")
    assert_error(client.get("/api/card-setups/seti_unknown"), 404, "not_found")
    customer = new_customer(client)
    assert_error(client.post(f"/api/customers/{customer['id']}/card-setups", json={"payment_method": 7}), 422)
    assert_error(client.post(f"/api/customers/{customer['id']}/card-setups", json={"payment_method": "pm x"}),
                 422, "invalid_input")
    err = assert_error(client.post(f"/api/customers/{customer['id']}/card-setups",
                                   json={"payment_method": "pm_does_not_exist"}), 422)
    assert err["code"] not in ("invalid_request", "")  # Stripe's own code comes through
    assert count(CardSetup) == 0 and count(PaymentMethod) == 0


def test_stripe_unavailable_is_503_with_retry_after(client, sandbox):
    customer = new_customer(client)
    sandbox.control.add_fault("api_error", method="POST", path="/v1/setup_intents", count=10)
    resp = client.post(f"/api/customers/{customer['id']}/card-setups", json={})
    assert_error(resp, 503, "stripe_unavailable")
    assert resp.headers["Retry-After"]
    assert count(CardSetup) == 0


# --- grandfathered cards ---------------------------------------------------------------------------

@pytest.mark.parametrize(("card", "saved_at", "previous"), [
    ("pm_card_de", "2020-06-01T00:00:00Z", True),
    ("pm_card_de", "2021-06-01T00:00:00Z", False),
    ("pm_card_gb", "2021-06-01T00:00:00", True),
    ("pm_card_gb", "2021-10-01T00:00:00Z", False),
])
def test_import_payment_method(client, card, saved_at, previous):
    customer = new_customer(client)
    resp = client.post(f"/api/customers/{customer['id']}/payment-methods/import",
                       json={"payment_method": card, "saved_at": saved_at})
    assert resp.status_code == 201, resp.text
    assert resp.json()["previous_authorization"] is previous
    with unit_of_work() as uow:
        row = uow.session.scalars(select(PaymentMethod)).one()
        assert row.previous_authorization is previous
        assert uow.session.get(Customer, customer["id"]).default_payment_method_id == row.id


def test_import_payment_method_errors(client):
    assert_error(client.post("/api/customers/5/payment-methods/import",
                             json={"payment_method": "pm_card_visa", "saved_at": "2020-01-01T00:00:00Z"}), 404)
    customer = new_customer(client)
    url = f"/api/customers/{customer['id']}/payment-methods/import"
    assert_error(client.post(url, json={"payment_method": "pm_card_visa"}), 422, "invalid_request")
    assert_error(client.post(url, json={"payment_method": "pm_card_visa", "saved_at": "last year"}), 422)
    assert_error(client.post(url, json={"payment_method": "pm_card_visa", "saved_at": "2999-01-01T00:00:00Z"}),
                 422, "invalid_input")
    assert count(PaymentMethod) == 0


# --- subscriptions ---------------------------------------------------------------------------------

def test_create_and_get_subscription(client):
    customer = new_customer(client)
    body = new_subscription(client, customer["id"], currency="EUR", interval="week", interval_count=2,
                            start_at=f"{SOON.date()}T09:00:00+01:00")
    assert set(body) == {"id", "status", "next_charge_at"}
    assert body["status"] == "active"
    assert datetime.fromisoformat(body["next_charge_at"]) == datetime.combine(SOON.date(), time(8), UTC)
    with unit_of_work() as uow:
        sub = uow.session.get(Subscription, body["id"])
        assert (sub.currency, sub.interval, sub.interval_count, sub.amount) == ("eur", "week", 2, 1999)
        assert sub.anchor_at == sub.next_charge_at and sub.payment_method_id is None
    got = client.get(f"/api/subscriptions/{body['id']}").json()
    assert got == {**body, "charges": []}


def test_start_at_defaults_to_now_and_needs_a_zone(client):
    customer = new_customer(client)
    before = datetime.now(UTC)
    body = new_subscription(client, customer["id"])
    assert before <= datetime.fromisoformat(body["next_charge_at"]) <= datetime.now(UTC)
    naive = client.post("/api/subscriptions", json={"customer_id": customer["id"], "amount": 1999, "currency": "eur",
                                                    "interval": "month", "start_at": f"{SOON.date()}T12:00:00"})
    assert assert_error(naive, 422, "invalid_request")["fields"][0]["field"] == "start_at"


@pytest.mark.parametrize(("change", "code"), [
    ({"amount": -100}, "invalid_request"),
    ({"amount": 0}, "invalid_request"),
    ({"amount": 19.99}, "invalid_request"),
    ({"amount": "1999"}, "invalid_request"),
    ({"amount": 100_000_000}, "invalid_input"),  # over EUR's maximum (billing.money)
    ({"amount": 1_000_000_000}, "invalid_request"),  # over any currency's
    ({"currency": "eu"}, "invalid_request"),
    ({"currency": "e1r"}, "invalid_request"),
    ({"currency": None}, "invalid_request"),
    ({"interval": "fortnight"}, "invalid_request"),
    ({"interval_count": 0}, "invalid_request"),
    ({"interval": "month", "interval_count": 37}, "invalid_input"),
    ({"start_at": "next tuesday"}, "invalid_request"),
    ({"customer_id": "abc"}, "invalid_request"),
])
def test_create_subscription_bad_input(client, change, code):
    customer = new_customer(client)
    body = {"customer_id": customer["id"], "amount": 1999, "currency": "eur", "interval": "month", **change}
    assert_error(client.post("/api/subscriptions", json=body), 422, code)
    assert count(Subscription) == 0


@pytest.mark.parametrize("missing", ["customer_id", "amount", "currency", "interval"])
def test_create_subscription_missing_field(client, missing):
    body = {"customer_id": 1, "amount": 1999, "currency": "eur", "interval": "month"}
    del body[missing]
    err = assert_error(client.post("/api/subscriptions", json=body), 422, "invalid_request")
    assert err["fields"][0]["field"] == missing


def test_create_subscription_unknown_customer(client):
    body = {"customer_id": 424242, "amount": 1999, "currency": "eur", "interval": "month"}
    assert_error(client.post("/api/subscriptions", json=body), 404, "not_found")
    assert count(Subscription) == 0


def test_subscription_charges_shape(client):
    customer = new_customer(client)
    sub = new_subscription(client, customer["id"])
    with unit_of_work() as uow:
        uow.session.add(Charge(
            subscription_id=sub["id"], period_index=0, amount=1999, currency="eur",
            period_start=datetime(2025, 1, 1, tzinfo=UTC), period_end=datetime(2025, 2, 1, tzinfo=UTC),
            status=ChargeStatus.requires_payment_method, attempts=1, last_error_code="card_declined",
            last_decline_code="insufficient_funds", next_retry_at=datetime(2025, 1, 4, tzinfo=UTC)))
        uow.commit()
    charges = client.get(f"/api/subscriptions/{sub['id']}").json()["charges"]
    assert len(charges) == 1
    assert set(charges[0]) == {"id", "period_start", "period_end", "amount", "currency", "status",
                               "payment_intent_id", "attempts", "last_error_code", "last_decline_code",
                               "next_retry_at", "notified_at"}
    assert charges[0]["status"] == "requires_payment_method" and charges[0]["last_decline_code"] == "insufficient_funds"


def test_cancel_subscription(client):
    customer = new_customer(client)
    sub = new_subscription(client, customer["id"])
    resp = client.post(f"/api/subscriptions/{sub['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "canceled"
    again = client.post(f"/api/subscriptions/{sub['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert client.get(f"/api/subscriptions/{sub['id']}").json()["status"] == "canceled"
    with unit_of_work() as uow:
        entries = uow.session.scalars(select(AuditEntry)).all()
        assert [(e.action, e.subscription_id) for e in entries] == [("cancel_subscription", sub["id"])]


def test_unknown_subscription(client):
    assert_error(client.get("/api/subscriptions/31337"), 404, "not_found")
    assert_error(client.post("/api/subscriptions/31337/cancel"), 404, "not_found")
    assert_error(client.get("/api/subscriptions/abc"), 422, "invalid_request")


# --- the rest --------------------------------------------------------------------------------------

def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/api/nothing-here"), 404, "not_found")
    assert_error(client.delete("/api/customers"), 405, "method_not_allowed")


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_metrics(client, monkeypatch):
    from billing.settings import get_settings

    new_customer(client)
    client.get("/api/subscriptions/999")
    monkeypatch.setenv("BILLING_METRICS_TOKEN", "metrics-token-for-tests")  # /metrics is not public
    get_settings.cache_clear()
    text = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-for-tests"}).text
    monkeypatch.delenv("BILLING_METRICS_TOKEN")
    get_settings.cache_clear()
    assert "billing_customers_created_total" in text
    assert 'billing_http_requests_total{method="GET",route="/api/subscriptions/{subscription_id}",status="404"}' in text


def test_openapi_is_complete(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [("/api/customers", "post"), ("/api/customers/{customer_id}/card-setups", "post"),
                         ("/api/card-setups/{setup_intent_id}", "get"), ("/api/subscriptions", "post"),
                         ("/api/subscriptions/{subscription_id}", "get"),
                         ("/api/subscriptions/{subscription_id}/cancel", "post"),
                         ("/api/customers/{customer_id}/payment-methods/import", "post"),
                         ("/healthz", "get"), ("/metrics", "get")]:
        assert method in paths[path], path
    schemas = spec["components"]["schemas"]
    for name in ("CustomerIn", "CustomerOut", "CardSetupCreated", "CardSetupOut", "SubscriptionIn",
                 "SubscriptionOut", "ChargeOut", "ErrorBody"):
        assert name in schemas, name
    assert "404" in paths["/api/subscriptions/{subscription_id}"]["get"]["responses"]
