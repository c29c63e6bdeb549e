"""Stripe events for tests, signed exactly as Stripe signs deliveries: ``Stripe-Signature:
t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" keyed by the endpoint secret>``
(https://docs.stripe.com/webhooks#verify-manually). Written independently of billing.webhooks so the
tests do not check the verifier against itself."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any

SECRET = "whsec_test_0123456789abcdef"
_ids = itertools.count(1)


def signature(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def signed(event: dict[str, Any], secret: str = SECRET, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The delivery Stripe would make: raw body and headers."""
    body = json.dumps(event, indent=2).encode()
    return body, {"Stripe-Signature": signature(body, secret, timestamp), "Content-Type": "application/json"}


def event(type_: str, obj: dict[str, Any], *, created: int | None = None,
          event_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id or f"evt_test_{next(_ids):06d}_{int(time.time() * 1000)}", "object": "event",
            "api_version": "2024-06-20", "created": int(time.time()) if created is None else created,
            "livemode": False, "pending_webhooks": 1, "type": type_, "data": {"object": obj}}


def payment_intent(pi_id: str, status: str, *, charge_id: int | None = None, error: dict | None = None,
                   amount: int = 1999) -> dict[str, Any]:
    return {"id": pi_id, "object": "payment_intent", "amount": amount, "currency": "eur", "status": status,
            "client_secret": f"{pi_id}_secret_DO_NOT_LOG", "payment_method": "pm_test_webhook",
            "metadata": {"charge_id": str(charge_id)} if charge_id is not None else {},
            "last_payment_error": error}


DECLINE = {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
           "message": "Your card has insufficient funds."}
