"""Hand-written fakes of our own ports (not of Stripe): a gateway that behaves like Stripe's
idempotency would, and records what was asked of it."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from billing.outcomes import OutcomeKind, PaymentOutcome, TemporaryStripeError


@dataclass
class FakeGateway:
    """Answers charges with ``script`` (a function of the payment method id), replays by key like
    Stripe, and can fail a call before or after "processing" it."""

    script: Callable[[str], PaymentOutcome | None] = lambda pm: None
    calls: list[tuple[str, dict]] = field(default_factory=list)
    intents: dict[str, dict] = field(default_factory=dict)  # pi id → {metadata, outcome, customer}
    by_key: dict[str, PaymentOutcome] = field(default_factory=dict)
    fail_next: list[str] = field(default_factory=list)  # "before" | "after": TemporaryStripeError
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def _outcome_for(self, pm: str, pi_id: str) -> PaymentOutcome:
        scripted = self.script(pm)
        kind = scripted.kind if scripted else OutcomeKind.succeeded
        return PaymentOutcome(kind=kind, payment_intent_id=pi_id, payment_method_id=pm,
                              error_code=scripted.error_code if scripted else None,
                              decline_code=scripted.decline_code if scripted else None,
                              advice_code=scripted.advice_code if scripted else None)

    def _maybe_fail(self, stage: str) -> None:
        if self.fail_next and self.fail_next[0] == stage:
            self.fail_next.pop(0)
            raise TemporaryStripeError(f"injected failure {stage} processing")

    def charge_off_session(self, *, customer_id, payment_method_id, amount, currency, mandate_id, metadata,
                           idempotency_key):
        self.calls.append(("create", {"key": idempotency_key, "pm": payment_method_id, "amount": amount,
                                      "currency": currency, "mandate": mandate_id, "metadata": dict(metadata)}))
        self._maybe_fail("before")
        if idempotency_key in self.by_key:
            return self.by_key[idempotency_key]
        pi_id = f"pi_fake_{next(self._ids)}"
        # The PaymentIntent's own fields too, which the product compares with its rows (billing.ownership).
        outcome = dataclasses.replace(self._outcome_for(payment_method_id, pi_id), amount=amount, currency=currency,
                                      customer_id=customer_id, metadata=dict(metadata))
        self.intents[pi_id] = {"metadata": dict(metadata), "outcome": outcome, "customer": customer_id}
        self.by_key[idempotency_key] = outcome
        self._maybe_fail("after")
        return outcome

    def confirm_off_session(self, *, payment_intent_id, payment_method_id, mandate_id, idempotency_key):
        self.calls.append(("confirm", {"key": idempotency_key, "pi": payment_intent_id, "pm": payment_method_id}))
        self._maybe_fail("before")
        if idempotency_key in self.by_key:
            return self.by_key[idempotency_key]
        outcome = self._outcome_for(payment_method_id, payment_intent_id)
        self.intents.setdefault(payment_intent_id, {"metadata": {}, "customer": None})["outcome"] = outcome
        self.by_key[idempotency_key] = outcome
        return outcome

    def find_payment_intent(self, *, customer_id, attempt_id, attempt_key=None):
        self.calls.append(("find", {"attempt_id": attempt_id}))
        for pi in self.intents.values():
            key = pi["metadata"].get("attempt_key")
            same_attempt = pi["metadata"].get("attempt_id") == str(attempt_id)
            if same_attempt and (attempt_key is None or key in (None, attempt_key)):
                return pi["outcome"]
        return None

    def retrieve_payment_intent(self, payment_intent_id):
        self.calls.append(("retrieve", {"pi": payment_intent_id}))
        return self.intents[payment_intent_id]["outcome"]

    def created(self) -> int:
        """PaymentIntents that exist: what "charged twice" would show up in."""
        return len(self.intents)


def declined(decline_code: str, advice_code: str | None = None) -> PaymentOutcome:
    return PaymentOutcome(kind=OutcomeKind.declined, error_code="card_declined", decline_code=decline_code,
                          advice_code=advice_code)


def auth_required() -> PaymentOutcome:
    return PaymentOutcome(kind=OutcomeKind.authentication_required, error_code="authentication_required")
