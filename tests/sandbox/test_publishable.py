"""What a browser may do with a publishable key (as Stripe.js does it), CORS, the Stripe.js stand-in
and the 3-D Secure page in frame mode. Raw HTTP, because this is what the browser sends."""

from __future__ import annotations

import json
import re

import httpx
import pytest

PK = "pk_test_sandbox"


@pytest.fixture
def http(sb):
    with httpx.Client(base_url=sb.url, timeout=10) as c:
        yield c


def _si(client, customer, **params):
    return client.v1.setup_intents.create(params={"customer": customer.id, "usage": "off_session", **params})


def _pi(client, customer, **params):
    return client.v1.payment_intents.create(params={"amount": 2000, "currency": "eur", "customer": customer.id,
                                                    **params})


def test_confirm_setup_with_card_details_and_client_secret(client, customer, http):
    si = _si(client, customer)
    resp = http.post(f"/v1/setup_intents/{si.id}/confirm", data={
        "key": PK, "client_secret": si.client_secret, "use_stripe_sdk": "true",
        "payment_method_data[type]": "card", "payment_method_data[card][number]": "4242424242424242",
        "payment_method_data[card][exp_month]": "12", "payment_method_data[card][exp_year]": "2040",
        "payment_method_data[card][cvc]": "123"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == "*"
    body = resp.json()
    assert body["status"] == "succeeded"
    pm = client.v1.payment_methods.retrieve(body["payment_method"])
    assert pm.card.last4 == "4242" and pm.customer == customer.id


def test_confirm_setup_3ds_then_frame_challenge_posts_the_result(client, customer, http):
    si = _si(client, customer)
    resp = http.post(f"/v1/setup_intents/{si.id}/confirm", data={
        "key": PK, "client_secret": si.client_secret, "payment_method": "pm_card_authenticationRequired"})
    body = resp.json()
    assert body["status"] == "requires_action"
    page = http.get(body["next_action"]["use_stripe_sdk"]["stripe_js"], params={"frame": "1"})
    assert 'name="frame" value="1"' in page.text
    done = http.post(f"/_sandbox/3ds/{si.id}", data={"outcome": "complete", "frame": "1"})
    assert done.status_code == 200 and "postMessage" in done.text
    message = json.loads(re.search(r"postMessage\((.*), \"\*\"\)", done.text).group(1))
    assert message["type"] == "sandbox-3ds-result"
    assert message["intent"]["id"] == si.id and message["intent"]["status"] == "succeeded"
    assert "client_secret" not in message["intent"]
    assert client.v1.setup_intents.retrieve(si.id).status == "succeeded"


def test_confirm_payment_with_saved_card_and_setup_future_usage(client, customer, http):
    pi = _pi(client, customer)
    resp = http.post(f"/v1/payment_intents/{pi.id}/confirm", data={
        "key": PK, "client_secret": pi.client_secret, "payment_method": "pm_card_visa",
        "setup_future_usage": "off_session"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded" and body["setup_future_usage"] == "off_session"
    assert client.v1.payment_methods.retrieve(body["payment_method"]).customer == customer.id


def test_declined_confirm_answers_402_with_the_intent(client, customer, http):
    pi = _pi(client, customer)
    resp = http.post(f"/v1/payment_intents/{pi.id}/confirm", data={
        "key": PK, "client_secret": pi.client_secret, "payment_method": "pm_card_visa_chargeDeclined"})
    assert resp.status_code == 402
    err = resp.json()["error"]
    assert err["type"] == "card_error" and err["payment_intent"]["id"] == pi.id


def test_retrieve_with_client_secret(client, customer, http):
    pi = _pi(client, customer)
    ok = http.get(f"/v1/payment_intents/{pi.id}", params={"key": PK, "client_secret": pi.client_secret})
    assert ok.status_code == 200 and ok.json()["id"] == pi.id
    si = _si(client, customer)
    ok = http.get(f"/v1/setup_intents/{si.id}", params={"key": PK, "client_secret": si.client_secret})
    assert ok.status_code == 200 and ok.json()["status"] == "requires_payment_method"


def test_create_payment_method_with_publishable_key(http):
    resp = http.post("/v1/payment_methods", data={
        "key": PK, "type": "card", "card[number]": "4000002760003184", "card[exp_month]": "1",
        "card[exp_year]": "2040"})
    assert resp.status_code == 200 and resp.json()["card"]["last4"] == "3184"


@pytest.mark.parametrize("secret", ["", "seti_nope_secret_x", "wrong"])
def test_wrong_or_missing_client_secret_is_refused(client, customer, http, secret):
    si = _si(client, customer)
    data = {"key": PK, "payment_method": "pm_card_visa"}
    if secret:
        data["client_secret"] = secret
    resp = http.post(f"/v1/setup_intents/{si.id}/confirm", data=data)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "client_secret"
    assert client.v1.setup_intents.retrieve(si.id).status == "requires_payment_method"


def test_another_intents_secret_is_refused(client, customer, http):
    one, other = _pi(client, customer), _pi(client, customer)
    resp = http.post(f"/v1/payment_intents/{one.id}/confirm", data={
        "key": PK, "client_secret": other.client_secret, "payment_method": "pm_card_visa"})
    assert resp.status_code == 400
    assert client.v1.payment_intents.retrieve(one.id).status == "requires_payment_method"


@pytest.mark.parametrize("param", ["off_session", "amount", "customer", "mandate"])
def test_server_only_parameters_are_refused(client, customer, http, param):
    pi = _pi(client, customer)
    resp = http.post(f"/v1/payment_intents/{pi.id}/confirm", data={
        "key": PK, "client_secret": pi.client_secret, "payment_method": "pm_card_visa", param: "1"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


@pytest.mark.parametrize("method,path", [("GET", "/v1/customers"), ("POST", "/v1/payment_intents"),
                                         ("GET", "/v1/payment_methods/pm_card_visa"),
                                         ("POST", "/v1/setup_intents/seti_x/cancel")])
def test_other_routes_refuse_a_publishable_key(http, method, path):
    resp = http.request(method, path, params={"key": PK} if method == "GET" else None,
                        data={"key": PK} if method == "POST" else None)
    assert resp.status_code == 401
    assert "publishable API key" in resp.json()["error"]["message"]


def test_publishable_key_must_be_a_test_key(client, customer, http):
    si = _si(client, customer)
    resp = http.post(f"/v1/setup_intents/{si.id}/confirm", data={"key": "pk_live_x",
                                                                 "client_secret": si.client_secret})
    assert resp.status_code == 401


def test_cors_preflight(http):
    resp = http.options("/v1/payment_intents/pi_x/confirm", headers={
        "Origin": "http://shop.test", "Access-Control-Request-Method": "POST"})
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "POST" in resp.headers["access-control-allow-methods"]


@pytest.mark.parametrize("path", ["/js/v3/stripe.js", "/js/v3/"])
def test_stripe_js_stand_in_is_served(http, path):
    resp = http.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/javascript")
    for name in ("confirmCardSetup", "confirmCardPayment", "handleNextAction", "elements"):
        assert name in resp.text
    assert http.get("/js/v2/stripe.js").status_code == 404
