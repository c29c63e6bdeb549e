"""When Stripe answers 429 anyway, the gateway reads which limiter refused the request
(``Stripe-Rate-Limited-Reason``, https://docs.stripe.com/rate-limits), counts it by reason, and resends.

A stub HTTP server plays Stripe: the sandbox sends no such header, and the point is what a real one
says."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY

from billing.stripe_gateway import StripeGateway

ENDPOINT = "GET /v1/payment_intents/:id"
PAYMENT_INTENT = {"id": "pi_stub", "object": "payment_intent", "status": "succeeded", "amount": 1999,
                  "currency": "eur", "customer": "cus_stub", "metadata": {}, "last_payment_error": None}
RATE_LIMITED = {"error": {"type": "invalid_request_error", "code": "rate_limit",
                          "message": "Too many requests hit the API too quickly."}}


class StubStripe(BaseHTTPRequestHandler):
    """Answers each request with the next of ``answers``: (status, Stripe-Rate-Limited-Reason or None)."""

    answers: list[tuple[int, str | None]] = []

    def do_GET(self):  # http.server calls it by this name
        status, reason = self.answers.pop(0) if self.answers else (200, None)
        body = json.dumps(PAYMENT_INTENT if status == 200 else RATE_LIMITED).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if reason is not None:
            self.send_header("Stripe-Rate-Limited-Reason", reason)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubStripe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def counted(reason: str) -> float:
    return REGISTRY.get_sample_value("billing_stripe_rate_limited_reasons_total",
                                     {"endpoint": ENDPOINT, "reason": reason}) or 0.0


def test_429s_are_counted_by_the_limiter_stripe_names_and_the_request_is_resent(stub):
    StubStripe.answers = [(429, "endpoint-rate"), (429, "Global-Concurrency "), (429, "a-new-limiter"), (429, None)]
    before = {r: counted(r) for r in ("endpoint-rate", "global-concurrency", "other", "none")}
    gateway = StripeGateway(api_key="sk_test_stub", api_base=f"http://127.0.0.1:{stub.server_port}", max_sends=5,
                            sleep=lambda _s: None)

    outcome = gateway.retrieve_payment_intent("pi_stub")

    assert outcome.payment_intent_id == "pi_stub"
    assert {r: counted(r) - n for r, n in before.items()} == {"endpoint-rate": 1, "global-concurrency": 1,
                                                              "other": 1, "none": 1}
