"""Is this PaymentIntent ours? Asked before a PaymentIntent moves one of our charges.

Our metadata on a Stripe object (``charge_id``, ``attempt_id``) is a claim, not a proof: two
installations sharing one Stripe account (staging beside production) number their charges alike, and
a database restored from a backup repeats ids that Stripe has already seen. Taken at its word, a
foreign ``payment_intent.succeeded`` would mark our charge paid and use up its recovery links, and a
foreign ``payment_failed`` would email our customer about someone else's decline. So a PaymentIntent
is applied only when it is provably ours (SPEC "What must always hold"; ARCHITECTURE practice 13):

* **The charge's own PaymentIntent** — its id was recorded from Stripe's answer to our own request,
  and Stripe's ids are unique: the id proves it. Its amount, currency and customer must still be the
  charge's, since anyone holding the API key can change them on a PaymentIntent that has not
  succeeded (https://docs.stripe.com/api/payment_intents/update); a field the object does not carry
  contradicts nothing.
* **A PaymentIntent found by our metadata** (a webhook about one whose id never reached us, a resumed
  attempt's lookup, the lookup after a decline that did not name its PaymentIntent) must match on
  every count: ``metadata.installation`` is this installation's (:mod:`billing.installation`),
  ``metadata.charge_id`` is the charge, its customer is the charge's customer's Stripe customer, its
  amount and currency are the charge's, and it names a known attempt of that charge —
  ``metadata.attempt_id`` an attempt of this charge *and* ``metadata.attempt_key`` that attempt's
  idempotency key (an attempt id repeats after a restore; the key's random part does not) — or it is
  the recovery page's, ``metadata.recovery_key`` being the charge's current recovery key.
  An attempt started before this installation began tagging its objects sent only ``charge_id`` and
  ``attempt_id``; for it those, with customer, amount and currency, are what there is to compare.

Whatever is not ours is :func:`reject`\\ ed: a structured WARNING line with the reason, and
``billing_foreign_objects_total{source,reason}``; the caller applies nothing (a webhook event is
recorded with outcome ``foreign``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import installation, metrics
from billing.db import unit_of_work
from billing.models import Attempt, Charge, Customer, Subscription
from billing.outcomes import PaymentIntentView, PaymentOutcome

log = logging.getLogger(__name__)

# Where a PaymentIntent came from (the metric's ``source`` label).
WEBHOOK = "webhook"
RESUME = "resume"
REPLAYED_ERROR = "replayed_error"
DECLINE_LOOKUP = "decline_lookup"
SEARCH = "search"
RECONCILER = "reconciler"
RECOVERY_PAGE = "recovery_page"


class Verdict(NamedTuple):
    """``ours`` and why: ``own_payment_intent`` / ``metadata`` / ``legacy_metadata`` when ours, else what
    did not match (``installation``, ``charge``, ``customer``, ``amount``, ``currency``, ``attempt``)."""

    ours: bool
    reason: str


@dataclass(frozen=True)
class Intent:
    """What a PaymentIntent says about itself, whichever shape it came in."""

    id: str | None
    amount: int | None
    currency: str | None
    customer_id: str | None
    metadata: Mapping[str, Any]

    @classmethod
    def of(cls, pi: Mapping[str, Any] | PaymentOutcome | PaymentIntentView) -> Intent:
        """From a Stripe object or webhook payload (a dict), or a gateway result."""
        if isinstance(pi, PaymentIntentView):
            pi = pi.outcome
        if isinstance(pi, PaymentOutcome):
            return cls(pi.payment_intent_id, pi.amount, pi.currency, pi.customer_id, pi.metadata or {})
        customer = pi.get("customer")
        if isinstance(customer, Mapping):
            customer = customer.get("id")
        return cls(pi.get("id"), pi.get("amount"), pi.get("currency"), customer, pi.get("metadata") or {})


@dataclass(frozen=True)
class Expected:
    """What our rows say a PaymentIntent of this charge must look like."""

    charge_id: int
    amount: int
    currency: str
    customer_id: str | None
    payment_intent_id: str | None
    attempt_keys: Mapping[str, str] = field(default_factory=dict)  # attempt id → idempotency key
    legacy_attempts: frozenset[str] = frozenset()  # attempt ids started before objects were tagged
    recovery_key: str | None = None


def verify(intent: Intent, expected: Expected, installation_id: str) -> Verdict:
    """The rule of this module as a pure function (the callers gather ``expected`` from our rows)."""
    own = intent.id is not None and intent.id == expected.payment_intent_id
    meta = intent.metadata
    legacy = ("installation" not in meta and "attempt_key" not in meta
              and str(meta.get("attempt_id")) in expected.legacy_attempts)
    if not own:
        if not legacy and meta.get(installation.METADATA_KEY) != installation_id:
            return Verdict(False, "installation")
        if meta.get("charge_id") != str(expected.charge_id):
            return Verdict(False, "charge")
    for reason, claimed, ours in (
            ("customer", intent.customer_id, expected.customer_id),
            ("amount", intent.amount, expected.amount),
            ("currency", (intent.currency or "").lower() or None, expected.currency.lower())):
        if (claimed is None and not own) or (claimed is not None and claimed != ours):
            return Verdict(False, reason)
    if own:
        return Verdict(True, "own_payment_intent")
    if legacy:
        return Verdict(True, "legacy_metadata")
    key = expected.attempt_keys.get(str(meta.get("attempt_id")))
    if key is not None and meta.get("attempt_key") == key:
        return Verdict(True, "metadata")
    if expected.recovery_key is not None and meta.get("recovery_key") == expected.recovery_key:
        return Verdict(True, "metadata")
    return Verdict(False, "attempt")


def expected_for(s: Session, charge: Charge) -> Expected:
    """``Expected`` from the charge's rows (its customer and attempts), in the caller's transaction."""
    customer = s.scalar(select(Customer.stripe_customer_id).join(Subscription, Subscription.customer_id == Customer.id)
                        .where(Subscription.id == charge.subscription_id))
    attempts = s.execute(select(Attempt.id, Attempt.idempotency_key, Attempt.started_at)
                         .where(Attempt.charge_id == charge.id)).all()
    tagged_since = installation.tagging_started_at() if attempts else None
    return Expected(
        charge_id=charge.id, amount=charge.amount, currency=charge.currency, customer_id=customer,
        payment_intent_id=charge.payment_intent_id,
        attempt_keys={str(a.id): a.idempotency_key for a in attempts},
        legacy_attempts=frozenset(str(a.id) for a in attempts if a.started_at < tagged_since),
        recovery_key=charge.recovery_key)


def is_ours(s: Session, charge: Charge, pi: Mapping[str, Any] | PaymentOutcome | PaymentIntentView) -> Verdict:
    """Whether ``pi`` may move ``charge`` (a locked row of the caller's transaction)."""
    return verify(Intent.of(pi), expected_for(s, charge), installation.installation_id())


def found_is_ours(found: PaymentOutcome, claim: Any, *, source: str) -> bool:
    """Whether a PaymentIntent found by an attempt's metadata is that attempt's; rejected (logged and
    counted) if not. ``claim`` is the attempt's :class:`billing.charging.Claim`."""
    legacy: frozenset[str] = frozenset()
    if installation.METADATA_KEY not in (found.metadata or {}):
        with unit_of_work() as uow:
            started = uow.session.scalar(select(Attempt.started_at).where(Attempt.id == claim.attempt_id))
        if started is not None and started < installation.tagging_started_at():
            legacy = frozenset({str(claim.attempt_id)})
    expected = Expected(charge_id=claim.charge_id, amount=claim.amount, currency=claim.currency,
                        customer_id=claim.stripe_customer_id, payment_intent_id=claim.payment_intent_id,
                        attempt_keys={str(claim.attempt_id): claim.idempotency_key}, legacy_attempts=legacy)
    verdict = verify(Intent.of(found), expected, installation.installation_id())
    if not verdict.ours:
        reject(verdict, source=source, charge_id=claim.charge_id, attempt_id=claim.attempt_id,
               payment_intent_id=found.payment_intent_id)
    return verdict.ours


def reject(verdict: Verdict, *, source: str, **ids: Any) -> None:
    """Log and count a PaymentIntent that is not ours. ``ids`` are our ids and Stripe's, never a secret."""
    metrics.observe_foreign(source, verdict.reason)
    log.warning("Stripe object is not provably ours; not applied",
                extra={"source": source, "reason": verdict.reason, **ids})
