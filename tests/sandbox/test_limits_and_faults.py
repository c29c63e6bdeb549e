"""Rate limits, lock timeouts, and each injected fault kind."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import stripe

from sandbox.testing import SandboxServer


def _auth(sb):
    return {"Authorization": f"Bearer {sb.api_key}"}


def test_rate_limit_per_endpoint_and_global(sb):
    sb.control.set_rate_limits(None, 5)
    with httpx.Client(base_url=sb.url, headers=_auth(sb)) as http:
        statuses = [http.get("/v1/events").status_code for _ in range(30)]
        assert 429 in statuses and statuses[0] == 200
        other = http.get("/v1/charges")  # another endpoint has its own budget
        assert other.status_code == 200
    sb.control.set_rate_limits(5, None)
    with httpx.Client(base_url=sb.url, headers=_auth(sb)) as http:
        statuses = [http.get(p).status_code for p in ("/v1/events", "/v1/charges") * 15]
    assert 429 in statuses
    counters = sb.control.requests()
    assert counters["rate_limited"] >= 2


def test_rate_limit_error_shape_through_sdk(sb, client):
    sb.control.set_rate_limits(None, 1)
    with pytest.raises(stripe.RateLimitError) as info:
        for _ in range(20):
            client.v1.events.list()
    assert info.value.http_status == 429
    assert info.value.error.code == "rate_limit"


def test_lock_timeout_on_concurrent_writes_to_one_object(sb, client, customer):
    pi = client.v1.payment_intents.create(params={"amount": 1000, "currency": "eur", "customer": customer.id})
    sb.control.set_latency(1000, 1000)
    results: list[httpx.Response] = []

    def update(i):
        results.append(httpx.post(sb.url + f"/v1/payment_intents/{pi.id}", data={"metadata[n]": str(i)},
                                  headers=_auth(sb), timeout=30))

    threads = [threading.Thread(target=update, args=(i,)) for i in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while sb.control.requests()["in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[1].start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 429]
    err = next(r for r in results if r.status_code == 429)
    assert err.json()["error"]["code"] == "lock_timeout"
    assert err.headers["Stripe-Should-Retry"] == "true"


def test_api_error_fault_500(sb, client):
    sb.control.add_fault("api_error", method="POST", path="/v1/customers", count=1)
    with pytest.raises(stripe.APIError) as info:
        client.v1.customers.create(params={"email": "e@example.com"}, options={"idempotency_key": "k500"})
    assert info.value.http_status == 500
    assert info.value.error.type == "api_error"
    # Stripe saves 500s under the key: the retry with the same key gets the same 500.
    with pytest.raises(stripe.APIError):
        client.v1.customers.create(params={"email": "e@example.com"}, options={"idempotency_key": "k500"})
    assert client.v1.customers.create(params={"email": "e@example.com"}).id.startswith("cus_")


def test_rate_limit_fault_429_not_saved(sb, client):
    sb.control.add_fault("rate_limit", path="/v1/customers", count=1)
    with pytest.raises(stripe.RateLimitError):
        client.v1.customers.create(params={"email": "r@example.com"}, options={"idempotency_key": "k429"})
    cus = client.v1.customers.create(params={"email": "r@example.com"}, options={"idempotency_key": "k429"})
    assert cus.id.startswith("cus_")


def test_connection_reset_changes_nothing(sb, client, customer):
    sb.control.add_fault("reset", method="POST", path="/v1/payment_intents", count=1)
    with pytest.raises(stripe.APIConnectionError):
        client.v1.payment_intents.create(params={
            "amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
            "confirm": True})
    assert client.v1.payment_intents.list(params={"customer": customer.id}).data == []
    assert sb.control.ledger() == []


def test_lost_response_after_processing_then_replay(sb, client, customer):
    sb.control.add_fault("lose_response", method="POST", path="/v1/payment_intents", count=1)
    params = {"amount": 1000, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
              "confirm": True, "metadata": {"attempt": "a-9"}}
    with pytest.raises(stripe.APIConnectionError):
        client.v1.payment_intents.create(params=params, options={"idempotency_key": "attempt-9"})
    ledger = sb.control.ledger()
    assert len(ledger) == 1  # it was charged although the client never heard back
    pi = client.v1.payment_intents.create(params=params, options={"idempotency_key": "attempt-9"})
    assert pi.id == ledger[0]["payment_intent"]
    assert pi.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(sb.control.ledger()) == 1
    found = client.v1.payment_intents.search(params={"query": "metadata['attempt']:'a-9'"})
    assert [p.id for p in found.data] == [pi.id]


def test_slow_response_times_out_client_but_is_processed(sb, customer):
    sb.control.add_fault("slow", method="POST", path="/v1/payment_intents", count=1, delay_ms=1500)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sb.url + "/v1/payment_intents", headers=_auth(sb), timeout=0.3, data={
            "amount": "1000", "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
            "confirm": "true"})
    deadline = time.monotonic() + 10
    while not sb.control.ledger() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sb.control.ledger()) == 1


def test_random_rate_faults_are_deterministic_from_seed():
    def run() -> list[int]:
        with SandboxServer(seed=7, rate_global=None, rate_endpoint=None,
                           faults=[{"fault": "api_error", "rate": 0.3, "path": "/v1/events"}]) as server:
            with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_test_x"}) as http:
                return [http.get("/v1/events").status_code for _ in range(40)]

    first, second = run(), run()
    assert first == second
    assert 500 in first and 200 in first


def test_latency_distribution_median_and_tail(sb):
    sb.control.set_latency(40, 120)
    with httpx.Client(base_url=sb.url, headers=_auth(sb)) as http:
        samples = []
        for _ in range(25):
            t = time.perf_counter()
            http.get("/v1/events")
            samples.append(time.perf_counter() - t)
    samples.sort()
    assert samples[len(samples) // 2] >= 0.015  # loose: only checks latency is applied
    faults = sb.control.faults()
    assert faults == []


def test_targeted_rule_matches_path_glob_and_count(sb, client, customer):
    sb.control.add_fault("api_error", method="POST", path="/v1/payment_intents/*/confirm", count=2, saved=False)
    pi = client.v1.payment_intents.create(params={"amount": 1000, "currency": "eur", "customer": customer.id,
                                                  "payment_method": "pm_card_visa"})
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            client.v1.payment_intents.confirm(pi.id, options={"idempotency_key": "c-1"})
    assert client.v1.payment_intents.confirm(pi.id, options={"idempotency_key": "c-1"}).status == "succeeded"
    assert sb.control.requests()["faults"]["api_error"] == 2
