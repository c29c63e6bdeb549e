"""Inspection and control: ledger, reset, clock, request counters, CLI wiring."""

from __future__ import annotations

import httpx
import pytest
import stripe


def test_ledger_records_every_successful_charge(client, customer, sb):
    pi = client.v1.payment_intents.create(params={
        "amount": 1234, "currency": "eur", "customer": customer.id, "payment_method": "pm_card_visa",
        "confirm": True, "metadata": {"subscription": "s-1", "period": "2025-01"}})
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(params={
            "amount": 999, "currency": "eur", "customer": customer.id, "confirm": True,
            "payment_method": "pm_card_visa_chargeDeclined"})
    (entry,) = sb.control.ledger()
    assert entry["payment_intent"] == pi.id
    assert entry["amount"] == 1234 and entry["currency"] == "eur"
    assert entry["customer"] == customer.id and entry["payment_method"] == pi.payment_method
    assert entry["metadata"] == {"subscription": "s-1", "period": "2025-01"}
    assert entry["charge"] == pi.latest_charge and isinstance(entry["created"], int)


def test_reset_forgets_everything(client, customer, sb):
    client.v1.payment_intents.create(params={"amount": 1000, "currency": "eur", "customer": customer.id,
                                             "payment_method": "pm_card_visa", "confirm": True})
    sb.control.add_fault("api_error", count=5)
    sb.control.advance(1000)
    sb.control.reset()
    assert sb.control.ledger() == []
    assert sb.control.faults() == []
    assert sb.control.requests()["total"] == 0
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.retrieve(customer.id)


def test_a_saved_card_can_start_declining_later(client, customer, sb):
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    params = {"amount": 500, "currency": "eur", "customer": customer.id, "payment_method": pm.id,
              "confirm": True, "off_session": True}
    client.v1.payment_intents.create(params=params)
    sb.control.decline_later(pm.id, "lost_card")
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.create(params=params)
    error = declined.value.json_body["error"]
    assert error["decline_code"] == "lost_card" and error["advice_code"] == "do_not_try_again"
    assert error["payment_intent"]["status"] == "requires_payment_method"
    sb.control.decline_later(pm.id, None)
    client.v1.payment_intents.create(params=params)
    assert len(sb.control.ledger()) == 2
    with pytest.raises(httpx.HTTPStatusError):
        sb.control.decline_later(pm.id, "made_up_code")


def test_clock_moves_forward_and_stamps_objects(client, sb):
    before = sb.control.now()
    after = sb.control.advance(30 * 86400)
    assert after >= before + 30 * 86400
    cus = client.v1.customers.create(params={})
    assert cus.created >= after
    target = after + 3600
    assert sb.control.set_time(target) == target
    resp = httpx.post(sb.url + "/_sandbox/clock", json={"now": before})
    assert resp.status_code == 400  # only forward


def test_request_counters(client, sb):
    for _ in range(3):
        client.v1.customers.create(params={})
    client.v1.events.list()
    counters = sb.control.requests()
    assert counters["total"] == 4
    assert counters["by_endpoint"]["POST /v1/customers"] == 3
    assert counters["by_endpoint"]["GET /v1/events"] == 1
    assert counters["by_status"]["200"] == 4
    assert counters["rate_limited"] == 0


def test_cli_sandbox_passes_flags(monkeypatch):
    from typer.testing import CliRunner

    import billing.cli as cli
    import sandbox.server

    seen = {}
    monkeypatch.setattr(sandbox.server, "main", lambda **kw: seen.update(kw))
    result = CliRunner().invoke(cli.app, [
        "sandbox", "--port", "12345", "--seed", "3", "--latency-median-ms", "300", "--latency-p99-ms", "900",
        "--rate-global", "0", "--rate-endpoint", "10", "--webhook-url", "http://a/h", "--webhook-url",
        "http://b/h", "--webhook-secret", "whsec_x"])
    assert result.exit_code == 0, result.output
    assert seen["port"] == 12345 and seen["seed"] == 3
    assert seen["latency_median_ms"] == 300 and seen["latency_p99_ms"] == 900
    assert seen["rate_global"] is None and seen["rate_endpoint"] == 10
    assert seen["webhook_endpoints"] == [("http://a/h", "whsec_x"), ("http://b/h", "whsec_x")]
