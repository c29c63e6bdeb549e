"""Idempotency keys (https://docs.stripe.com/api/idempotent_requests)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import stripe


def _post(sb, path, data, key):
    return httpx.post(sb.url + path, data=data, timeout=30,
                      headers={"Authorization": f"Bearer {sb.api_key}", "Idempotency-Key": key})


def test_same_key_replays_first_result(client, customer, sb):
    params = {"amount": 4000, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
              "confirm": True, "metadata": {"charge": "c-1"}}
    first = client.v1.payment_intents.create(params=params, options={"idempotency_key": "charge-c-1"})
    second = client.v1.payment_intents.create(params=params, options={"idempotency_key": "charge-c-1"})
    assert first.id == second.id
    assert second.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(sb.control.ledger()) == 1


def test_replay_header_and_status_on_raw_http(customer, sb):
    data = {"amount": "4000", "currency": "eur", "customer": customer.id,
            "payment_method": "pm_card_visa_chargeDeclined", "confirm": "true", "off_session": "true"}
    first = _post(sb, "/v1/payment_intents", data, "k-decline")
    second = _post(sb, "/v1/payment_intents", data, "k-decline")
    assert first.status_code == second.status_code == 402  # errors from an executed request are saved
    assert first.json() == second.json()
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"


def test_different_params_same_key_is_idempotency_error(client, customer):
    client.v1.customers.create(params={"email": "x@example.com"}, options={"idempotency_key": "k1"})
    with pytest.raises(stripe.IdempotencyError) as info:
        client.v1.customers.create(params={"email": "y@example.com"}, options={"idempotency_key": "k1"})
    assert info.value.http_status == 400
    assert info.value.error.type == "idempotency_error"


def test_validation_errors_are_not_saved(client, customer):
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.create(params={"currency": "eur"}, options={"idempotency_key": "k-val"})
    pi = client.v1.payment_intents.create(params={"amount": 1000, "currency": "eur"},
                                          options={"idempotency_key": "k-val"})
    assert pi.status == "requires_payment_method"


def test_concurrent_use_is_409_in_use(customer, sb):
    sb.control.set_latency(1000, 1000)
    data = {"amount": "4000", "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
            "confirm": "true"}
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(_post(sb, "/v1/payment_intents", data, "k-busy")))
    first.start()
    # The first request sleeps 1 s inside the key; wait until the sandbox has it in flight.
    deadline = time.monotonic() + 10
    while sb.control.requests()["in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _post(sb, "/v1/payment_intents", data, "k-busy")
    first.join()
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "idempotency_key_in_use"
    assert results[0].status_code == 200
    assert len(sb.control.ledger()) == 1


def test_keys_are_pruned_after_24_hours(client, customer, sb):
    a = client.v1.customers.create(params={"email": "p@example.com"}, options={"idempotency_key": "k-prune"})
    sb.control.advance(23 * 3600)
    b = client.v1.customers.create(params={"email": "p@example.com"}, options={"idempotency_key": "k-prune"})
    assert a.id == b.id
    sb.control.advance(2 * 3600)
    c = client.v1.customers.create(params={"email": "p@example.com"}, options={"idempotency_key": "k-prune"})
    assert c.id != a.id


def test_keys_are_scoped_per_api_key(sb, customer):
    data = {"email": "s@example.com"}
    a = httpx.post(sb.url + "/v1/customers", data=data,
                   headers={"Authorization": "Bearer sk_test_one", "Idempotency-Key": "shared"})
    b = httpx.post(sb.url + "/v1/customers", data=data,
                   headers={"Authorization": "Bearer sk_test_two", "Idempotency-Key": "shared"})
    assert a.json()["id"] != b.json()["id"]
