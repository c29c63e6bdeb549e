"""Idempotency keys as Stripe documents them (https://docs.stripe.com/api/idempotent_requests).

* The status code and body of the first request with a key are saved once endpoint execution
  begins, errors included (also 500s); later requests with the key get that result back with
  ``Idempotent-Replayed: true``.
* Same key, different parameters (or endpoint) → 400 ``idempotency_error``.
* Same key while the first request is still executing → 409 ``idempotency_key_in_use``.
* Validation failures and conflicts are not saved: the key can be retried.
* Keys are pruned once at least 24 hours old (sandbox time); a pruned key starts a new request.
* Keys are scoped to the API key; only POST requests use them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import StripeError


@dataclass
class Saved:
    fingerprint: str
    created: float
    done: bool = False
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def fingerprint(method: str, path: str, params: dict[str, Any]) -> str:
    return json.dumps([method, path, params], sort_keys=True, separators=(",", ":"))


class IdempotencyStore:
    def __init__(self, ttl_seconds: float = 24 * 3600) -> None:
        self.ttl = ttl_seconds
        self.entries: OrderedDict[tuple[str, str], Saved] = OrderedDict()

    def clear(self) -> None:
        self.entries.clear()

    def prune(self, now: float) -> None:
        while self.entries:
            entry = next(iter(self.entries.values()))
            if entry.created > now - self.ttl:
                break
            if not entry.done:  # never prune under an executing request
                break
            self.entries.popitem(last=False)

    def begin(self, scope: str, key: str, fp: str, now: float) -> Saved | None:
        """Returns the saved result to replay, or None after reserving the key for this request."""
        self.prune(now)
        entry = self.entries.get((scope, key))
        if entry is not None and entry.done and entry.created <= now - self.ttl:
            del self.entries[(scope, key)]
            entry = None
        if entry is None:
            self.entries[(scope, key)] = Saved(fp, now)
            return None
        if entry.fingerprint != fp:
            raise StripeError(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they were first "
                f"used with. Try using a key other than '{key}' if you meant to execute a different request.",
            )
        if not entry.done:
            raise StripeError(
                409,
                "invalid_request_error",
                "There is currently another in-progress request using this Stripe token (probably an "
                "idempotency key). Please try again later.",
                code="idempotency_key_in_use",
            )
        return entry

    def finish(self, scope: str, key: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        entry = self.entries.get((scope, key))
        if entry is not None:
            entry.done, entry.status, entry.body, entry.headers = True, status, body, headers

    def abandon(self, scope: str, key: str) -> None:
        entry = self.entries.get((scope, key))
        if entry is not None and not entry.done:
            del self.entries[(scope, key)]
