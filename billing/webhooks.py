"""Stripe webhooks: verify, store (deduplicated), then process by type with a per-object newest-event guard.

Stripe delivers events at least once, in no guaranteed order, and retries for up to three days
(https://docs.stripe.com/webhooks, sections "Handle duplicate events", "Event ordering" and "Retry
behavior"). So the endpoint does as little as it can before answering 2xx ("Quickly return a 2xx
response"): :func:`verify` the signature on the raw body, :func:`accept` the event (one short
transaction: ``INSERT … ON CONFLICT (stripe_event_id) DO NOTHING``), and hand the row id to a task
after the commit. :func:`process` then applies it, at most once per event:

* the event row is locked and ``processed_at`` checked, so a duplicate delivery (or a duplicated
  task) changes nothing;
* events about one Stripe object are serialized by an advisory lock on its id, and an event older
  than one already applied for the same object is marked ``stale`` (compared by ``event.created``);
  when the order cannot be told from the events alone (same second, or an event that may predate
  what a charge attempt recorded from Stripe's own answer), the object is fetched again from Stripe
  and its current state applied instead of the snapshot;
* a charge changes state only through :func:`billing.charging.apply_outcome`, with the number of the
  charge's latest attempt, which is the number the charge task uses for the same outcome: the
  failure email's dedupe key (charge, attempt, kind) is then the same whichever path comes first;
* while an attempt at that charge is in flight the event is left to it (:class:`EventDeferred`, the
  task retries later): the attempt records the same outcome from Stripe's answer.

Outcomes written to ``webhook_events.outcome``: ``applied``, ``unchanged`` (the state already holds
it), ``stale``, ``ignored`` (nothing to do, e.g. the charge is final), ``unknown_object`` (about
nothing of ours), ``foreign`` (a PaymentIntent naming one of our charges that is not provably ours:
another installation's on the same Stripe account, a restored database's twin, or one whose amount,
currency or customer is not the charge's — logged, counted and never applied, :mod:`billing.ownership`),
``unknown_type``.

Nothing here imports FastAPI or Celery. The stored payload has every ``client_secret`` removed, and
logs carry event ids and types only, never the payload.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing import charging, customer_pages, enrolment, metrics, ownership, state, stripe_gateway
from billing.db import get_engine, unit_of_work
from billing.models import (
    Attempt,
    AttemptPhase,
    CardSetup,
    Charge,
    ChargeStatus,
    Customer,
    PaymentMethod,
    WebhookEvent,
)
from billing.outcomes import CardDetails, OutcomeKind, PaymentGateway, PaymentOutcome, SetupResult
from billing.stripe_gateway import outcome_from_payment_intent

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Stripe-Signature"
DEFAULT_TOLERANCE = 300
_MAX_HEADER_LENGTH = 4096
_SCHEME = "v1"


# ---------------------------------------------------------------------------------------- verify

class WebhookError(Exception):
    """A delivery we refuse; ``reason`` is a stable code (the HTTP error code), ``message`` plain words."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def verify(payload: bytes, sig_header: str | None, secret: str, *, now: float | None = None,
           tolerance: int = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Check a delivery the way Stripe signs it and return the event as a dict.

    ``Stripe-Signature: t=<unix time>,v1=<hex>[,v1=<hex>…]``; each ``v1`` is HMAC-SHA256, keyed by
    the endpoint secret, of ``"<t>." + raw body``. Any one matching ``v1`` is enough (Stripe sends
    several while a secret is being rolled), compared in constant time. The timestamp is part of the
    signed text, so checking it bounds replays: older than ``tolerance`` seconds is refused, and so
    is one more than ``tolerance`` seconds ahead of our clock (a signature made for the future is a
    replay waiting to become fresh). https://docs.stripe.com/webhooks#verify-events,
    https://docs.stripe.com/webhooks#verify-manually

    Written here rather than calling ``stripe.WebhookSignature``: that decodes the body as text before
    signing (we sign the exact bytes received), accepts any timestamp in the future, reports every
    failure as one exception type, and this module stays free of the stripe import (only
    :mod:`billing.stripe_gateway` has it).
    """
    if not secret:
        raise ValueError("the webhook signing secret is empty: refusing to verify with it")
    if not sig_header:
        raise WebhookError("missing_signature", f"the {SIGNATURE_HEADER} header is missing")
    timestamp, signatures = _parse_header(sig_header)
    signed = str(timestamp).encode() + b"." + payload
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
    # Every candidate is compared (no early exit) so timing says nothing about which one was close.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise WebhookError("bad_signature", "no signature matches the payload for this endpoint's secret")
    now = time.time() if now is None else now
    if timestamp < now - tolerance:
        raise WebhookError("timestamp_too_old", f"the signature timestamp is more than {tolerance}s old")
    if timestamp > now + tolerance:
        raise WebhookError("timestamp_in_future", f"the signature timestamp is more than {tolerance}s ahead")
    return _parse_event(payload)


def _parse_header(header: str) -> tuple[int, list[str]]:
    if len(header) > _MAX_HEADER_LENGTH:
        raise WebhookError("malformed_signature", f"the {SIGNATURE_HEADER} header is too long")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise WebhookError("malformed_signature", f"the {SIGNATURE_HEADER} header is not key=value pairs")
        if key == "t":
            timestamps.append(value)
        elif key == _SCHEME:
            signatures.append(value)
        # Other schemes (v0 is Stripe's test scheme) are ignored, as Stripe's libraries do.
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit() \
            or len(timestamps[0]) > 12:
        raise WebhookError("malformed_signature", f"the {SIGNATURE_HEADER} header needs exactly one numeric t=")
    if not signatures:
        raise WebhookError("malformed_signature", f"the {SIGNATURE_HEADER} header has no {_SCHEME}= signature")
    return int(timestamps[0]), signatures


def _storable(value: Any) -> bool:
    """No NUL and no lone surrogate anywhere in the event's strings (keys included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _parse_event(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise WebhookError("invalid_json", "the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookError("invalid_event", "the body is not a JSON object")
    if not _storable(event):
        # PostgreSQL's jsonb refuses NUL (\u0000) and text with lone surrogates: such an event could
        # never be stored, so it is refused now rather than answered 503 and redelivered for 3 days.
        raise WebhookError("invalid_event", "the event holds text that cannot be stored (NUL or a lone surrogate)")
    for field, limit in (("id", 64), ("type", 80)):
        value = event.get(field)
        if not isinstance(value, str) or not value:
            raise WebhookError("invalid_event", f"the event has no {field}")
        if len(value) > limit:
            raise WebhookError("invalid_event", f"the event {field} is too long")
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        raise WebhookError("invalid_event", "the event has no created timestamp")
    obj = (event.get("data") or {}).get("object") if isinstance(event.get("data"), dict) else None
    if not isinstance(obj, dict):
        raise WebhookError("invalid_event", "the event has no data.object")
    if obj.get("id") is not None and (not isinstance(obj["id"], str) or len(obj["id"]) > 64):
        raise WebhookError("invalid_event", "the event's object id is not a short string")
    return event


# ------------------------------------------------------------------------------------ store, accept

_REDACTED_KEYS = frozenset({"client_secret"})


def redact(value: Any) -> Any:
    """The payload without secrets: a SetupIntent's or PaymentIntent's ``client_secret`` lets anyone
    holding it confirm that intent from a browser, and nothing here needs it."""
    if isinstance(value, dict):
        return {k: ("[redacted]" if k in _REDACTED_KEYS and v is not None else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def store(session: Session, event: dict[str, Any]) -> WebhookEvent | None:
    """Insert a verified event in the caller's transaction; ``None`` if its id was stored before.

    ``INSERT … ON CONFLICT (stripe_event_id) DO NOTHING``: concurrent deliveries of one event insert
    one row, and the loser neither fails nor aborts its transaction.
    """
    obj = event["data"]["object"]
    stmt = (pg_insert(WebhookEvent)
            .values(stripe_event_id=event["id"], type=event["type"], object_id=obj.get("id"),
                    event_created=event["created"], payload=redact(event))
            .on_conflict_do_nothing(index_elements=[WebhookEvent.stripe_event_id])
            .returning(WebhookEvent.id))
    row_id = session.execute(stmt).scalar_one_or_none()
    return session.get(WebhookEvent, row_id) if row_id is not None else None


@dataclass(frozen=True)
class Accepted:
    event_row_id: int
    duplicate: bool
    enqueued: bool


def accept(event: dict[str, Any], *, enqueue: Callable[[int], None]) -> Accepted:
    """Store a verified event and, once that has committed, enqueue its processing.

    A duplicate is acknowledged without being processed again; it is enqueued once more only while
    its first copy is still unprocessed (its task was lost, or is waiting on an attempt in flight),
    which processing tolerates. The enqueue is called here after the commit rather than through an
    after-commit hook so a failure reaches the caller: the endpoint then answers 5xx, Stripe
    delivers again, and that delivery enqueues the stored row.
    """
    with unit_of_work() as uow:
        row = store(uow.session, event)
        duplicate = row is None
        if duplicate:
            row = uow.session.scalars(select(WebhookEvent)
                                      .where(WebhookEvent.stripe_event_id == event["id"])).one()
        row_id, pending = row.id, row.processed_at is None
        uow.commit()
    if not duplicate:
        metrics.observe_webhook_lag(event["created"])
    log.info("webhook event received", extra={"event_id": event["id"], "event_type": event["type"],
                                              "event_row_id": row_id, "duplicate": duplicate})
    if pending:
        enqueue(row_id)
    return Accepted(event_row_id=row_id, duplicate=duplicate, enqueued=pending)


def requeue_unprocessed(*, enqueue: Callable[[int], None], older_than: timedelta = timedelta(minutes=10),
                        now: datetime | None = None, limit: int = 500) -> list[int]:
    """Enqueue events stored but never processed (a lost task, retries given up): for a periodic sweep."""
    cutoff = (now or datetime.now(UTC)) - older_than
    with unit_of_work() as uow:
        ids = list(uow.session.scalars(
            select(WebhookEvent.id).where(WebhookEvent.processed_at.is_(None), WebhookEvent.received_at < cutoff)
            .order_by(WebhookEvent.id).limit(limit)))
    for row_id in ids:
        try:
            enqueue(row_id)
        except Exception:
            log.exception("could not enqueue a webhook event", extra={"event_row_id": row_id})
    return ids


# ---------------------------------------------------------------------------------------- process

class EventDeferred(Exception):
    """Not processed now (an attempt at the charge is in flight, or the object is busy): try later."""


# Outcomes meaning "the state reflects this event": a later-arriving older event is then stale.
_CURRENT = ("applied", "unchanged")
# Stripe's clock and ours are both NTP-synced; an event this close to an attempt may belong to it.
CLOCK_SKEW = timedelta(seconds=60)
_OBJECT_LOCK_CLASS = 0x7768  # "wh": keeps these advisory lock keys apart from any other use


@dataclass
class _Context:
    gateway: Any
    now: datetime

    def get_gateway(self):
        self.gateway = stripe_gateway.resolve(self.gateway)
        return self.gateway


class _NeedFetch(Exception):
    """The handler needs a fresh copy of the object from Stripe before it can decide."""


def process(event_row_id: int, *, gateway: PaymentGateway | None = None, now: datetime | None = None) -> str:
    """Apply one stored event; returns its outcome (or ``already_processed`` / ``missing``).

    Raises :class:`EventDeferred` when it should be tried again later, and
    :class:`~billing.outcomes.TemporaryStripeError` when a needed read from Stripe failed.
    """
    with unit_of_work() as uow:
        row = uow.session.get(WebhookEvent, event_row_id)
        if row is None:
            log.warning("webhook event row not found", extra={"event_row_id": event_row_id})
            return "missing"
        if row.processed_at is not None:
            return "already_processed"
        type_, object_id = row.type, row.object_id
    ctx = _Context(gateway=gateway, now=now or datetime.now(UTC))
    handler = _HANDLERS.get(type_)
    with _object_lock(object_id or f"event-row-{event_row_id}"):
        if handler is None:
            outcome = _mark_simple(event_row_id, "unknown_type", ctx.now)
        else:
            outcome = _run(handler, event_row_id, ctx)
    if type_ == "payment_intent.succeeded":
        # Also on a redelivery: if Stripe was unreachable the first time, the task's retry finishes it.
        _adopt_new_card(event_row_id, ctx)
    if outcome != "already_processed":
        log.info("webhook event processed", extra={"event_row_id": event_row_id, "event_type": type_,
                                                   "outcome": outcome})
    return outcome


def _adopt_new_card(event_row_id: int, ctx: _Context) -> None:
    """A payment made on the recovery page with a new card saved for later (``setup_future_usage``):
    the card becomes the default even if the page never reported back. Idempotent: a card already
    the default is left alone."""
    with unit_of_work() as uow:
        row = uow.session.get(WebhookEvent, event_row_id)
        pi, outcome = row.payload["data"]["object"], row.outcome
    if outcome == "foreign":
        return  # not ours: its card is nobody's here
    if pi.get("setup_future_usage") == "off_session":
        customer_pages.adopt_card_paid_with(pi, gateway=ctx.get_gateway())


Handler = Callable[[Session, WebhookEvent, _Context, Any], str]


def _run(handler: Handler, event_row_id: int, ctx: _Context) -> str:
    """Run ``handler`` in a unit of work; if it asks for a fresh object, fetch it outside any
    transaction (no row lock is held across a Stripe call) and run it once more with it."""
    fetched: Any = None
    for _ in range(2):
        with unit_of_work() as uow:
            row = uow.session.scalars(select(WebhookEvent).where(WebhookEvent.id == event_row_id)
                                      .with_for_update()).one()
            if row.processed_at is not None:
                return "already_processed"
            try:
                outcome = handler(uow.session, row, ctx, fetched)
            except _NeedFetch as need:
                fetch = need.args[0]
            else:
                row.processed_at = ctx.now
                row.outcome = outcome
                uow.commit()
                return outcome
        fetched = fetch()
    raise AssertionError("a handler asked for a fresh object twice")


def _mark_simple(event_row_id: int, outcome: str, now: datetime) -> str:
    with unit_of_work() as uow:
        row = uow.session.scalars(select(WebhookEvent).where(WebhookEvent.id == event_row_id)
                                  .with_for_update()).one()
        if row.processed_at is not None:
            return "already_processed"
        row.processed_at, row.outcome = now, outcome
        uow.commit()
    return outcome


@contextlib.contextmanager
def _object_lock(object_id: str) -> Iterator[None]:
    """Serialize the processing of events about one Stripe object, across workers, for as long as it
    takes (including a fetch from Stripe). A session-level advisory lock on its own connection; the
    connection's ``lock_timeout`` bounds the wait, after which the event is deferred."""
    with get_engine().connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        params = {"c": _OBJECT_LOCK_CLASS, "k": object_id}
        try:
            conn.execute(text("SELECT pg_advisory_lock(:c, hashtext(:k))"), params)
        except OperationalError:
            raise EventDeferred(f"events about {object_id} are being processed elsewhere") from None
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:c, hashtext(:k))"), params)


def _superseded(s: Session, row: WebhookEvent) -> bool:
    """A newer event about the same object has already been applied."""
    return bool(s.scalar(select(exists().where(
        WebhookEvent.object_id == row.object_id, WebhookEvent.id != row.id,
        WebhookEvent.outcome.in_(_CURRENT), WebhookEvent.event_created > row.event_created))))


def _tied(s: Session, row: WebhookEvent) -> bool:
    """Another event about the same object, applied, carries the same second: order unknown."""
    return bool(s.scalar(select(exists().where(
        WebhookEvent.object_id == row.object_id, WebhookEvent.id != row.id,
        WebhookEvent.outcome.in_(_CURRENT), WebhookEvent.event_created == row.event_created))))


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("id")
    return value if isinstance(value, str) else None


def _created_at(row: WebhookEvent) -> datetime:
    return datetime.fromtimestamp(row.event_created, UTC)


# --- payment_intent.* ---------------------------------------------------------------------------

def _find_charge(s: Session, pi: dict[str, Any]) -> Charge | None:
    """The charge a PaymentIntent is about, locked: the one whose PaymentIntent it is, else the one its
    metadata names (created, but its id never reached us). Only a claim so far: the caller asks
    :func:`billing.ownership.is_ours` before it moves anything."""
    charge = s.scalars(select(Charge).where(Charge.payment_intent_id == pi["id"]).with_for_update()).first()
    if charge is not None:
        return charge
    raw = (pi.get("metadata") or {}).get("charge_id")
    if not isinstance(raw, str) or not raw.isdigit() or len(raw) > 18:
        return None
    return s.scalars(select(Charge).where(Charge.id == int(raw)).with_for_update()).first()


def _not_ours(s: Session, row: WebhookEvent, charge: Charge, pi: dict[str, Any]) -> str | None:
    """``foreign`` (logged and counted) when the PaymentIntent is not provably ours, else ``None``."""
    verdict = ownership.is_ours(s, charge, pi)
    if verdict.ours:
        return None
    if charge.payment_intent_id is None and _attempt_in_flight(s, charge.id):
        # The attempt in flight may be about to record this very PaymentIntent as the charge's own.
        raise EventDeferred(f"an attempt at charge {charge.id} is in flight")
    ownership.reject(verdict, source=ownership.WEBHOOK, charge_id=charge.id, payment_intent_id=pi["id"],
                     event_row_id=row.id, event_type=row.type)
    return "foreign"


def _attempt_in_flight(s: Session, charge_id: int) -> bool:
    """An attempt has started and not finished, or someone holds the charge's lease (billing.leases;
    the caller holds the charge's row lock)."""
    unfinished = s.scalar(select(exists().where(Attempt.charge_id == charge_id,
                                                Attempt.phase == AttemptPhase.started)))
    return bool(unfinished) or charging.lease_held(s, charge_id)


def _latest_attempt(s: Session, charge_id: int) -> Attempt | None:
    return s.scalars(select(Attempt).where(Attempt.charge_id == charge_id)
                     .order_by(Attempt.number.desc()).limit(1)).first()


# Where an outcome leaves a charge that is not final (apply_outcome via the dunning policy).
_STATUS_AFTER = {
    OutcomeKind.processing: ChargeStatus.processing,
    OutcomeKind.authentication_required: ChargeStatus.authentication_required,
    OutcomeKind.declined: ChargeStatus.requires_payment_method,
    OutcomeKind.invalid_request: ChargeStatus.requires_payment_method,
    OutcomeKind.refused: ChargeStatus.needs_review,
    OutcomeKind.canceled: ChargeStatus.requires_payment_method,
}


def _recorded_by(attempt: Attempt | None, outcome: PaymentOutcome, charge: Charge) -> bool:
    """The latest attempt already recorded this very outcome, and nothing has moved the charge since."""
    return (attempt is not None and attempt.phase == AttemptPhase.finished
            and charge.status == _STATUS_AFTER.get(outcome.kind)
            and attempt.payment_intent_id in (None, outcome.payment_intent_id)
            and attempt.outcome == outcome.kind.value and attempt.error_code == outcome.error_code
            and attempt.decline_code == outcome.decline_code)


def _handle_payment_intent(s: Session, row: WebhookEvent, ctx: _Context, fetched: PaymentOutcome | None) -> str:
    pi = row.payload["data"]["object"]
    charge = _find_charge(s, pi)
    if charge is None:
        return "unknown_object"
    foreign = _not_ours(s, row, charge, pi)
    if foreign is not None:
        return foreign
    if charge.payment_intent_id not in (None, pi["id"]):
        return "unknown_object"  # ours, but the charge has moved on to another PaymentIntent
    if charge.status == ChargeStatus.paid or (charge.status in state.FINAL
                                              and row.type != "payment_intent.succeeded"):
        # A success still counts on a charge given up or written off: the money was collected.
        return "ignored"
    if _attempt_in_flight(s, charge.id):
        raise EventDeferred(f"an attempt at charge {charge.id} is in flight")
    if _superseded(s, row):
        return "stale"
    if row.type == "payment_intent.requires_action" and charge.status not in (ChargeStatus.pending,
                                                                              ChargeStatus.processing):
        # Off-session, requires_action only follows our own confirm (some Stripe-compatible servers).
        # On a charge that already waits on the customer it means the customer is authenticating on
        # the recovery page right now: no "please authenticate" email in the middle of it.
        return "ignored"
    latest = _latest_attempt(s, charge.id)
    outcome = fetched or outcome_from_payment_intent(pi)
    if _recorded_by(latest, outcome, charge):
        return "unchanged"
    if (outcome.kind is not OutcomeKind.succeeded and latest is not None
            and _created_at(row) < latest.started_at - CLOCK_SKEW):
        # About an earlier attempt: the latest one began after this happened and has its own outcome.
        # (A success is never stale: whenever it happened, the money was collected.)
        return "stale"
    if fetched is None:
        # The snapshot may be older than what the latest attempt learnt from Stripe's own answer,
        # or than an event of the same second: apply Stripe's current state instead.
        attempt_near = (latest is not None and latest.finished_at is not None
                        and _created_at(row) <= latest.finished_at + CLOCK_SKEW)
        if attempt_near or _tied(s, row):
            raise _NeedFetch(lambda: ctx.get_gateway().retrieve_payment_intent(pi["id"]))
    if charge.payment_intent_id is None:
        charge.payment_intent_id = pi["id"]
    # The latest attempt's number: the one the charge task passes for this same outcome, so the
    # failure email's dedupe key is shared and it is written once whichever path comes first.
    result = charging.apply_outcome(s, charge, outcome, now=ctx.now, attempt_number=charge.attempts or 1,
                                    manual=latest is not None and latest.manual)
    return "ignored" if result.startswith("ignored:") else "applied"


# --- setup_intent.* -----------------------------------------------------------------------------

def _handle_setup_intent(s: Session, row: WebhookEvent, ctx: _Context, fetched: CardDetails | None) -> str:
    si = row.payload["data"]["object"]
    setup = s.scalars(select(CardSetup).where(CardSetup.setup_intent_id == si["id"]).with_for_update()).first()
    customer = s.get(Customer, setup.customer_id) if setup is not None else None
    if customer is None and _id_of(si.get("customer")):
        customer = s.scalars(select(Customer).where(
            Customer.stripe_customer_id == _id_of(si.get("customer")))).first()
    if customer is None:
        return "unknown_object"
    if _superseded(s, row):
        return "stale"
    if setup is not None and setup.status in enrolment.FINAL_SETUP_STATUSES and row.type != "setup_intent.succeeded":
        return "stale"

    if row.type == "setup_intent.succeeded":
        pm_id = _id_of(si.get("payment_method"))
        if not pm_id:
            return "ignored"
        if setup is not None and setup.status == "succeeded" and setup.payment_method_id is not None:
            return "unchanged"  # saved already (the API's refresh of the card setup got there first)
        if fetched is None:
            raise _NeedFetch(lambda: ctx.get_gateway().retrieve_payment_method(pm_id))
        if fetched.customer_id not in (None, customer.stripe_customer_id):
            log.warning("SetupIntent's card belongs to another customer; not saved",
                        extra={"event_row_id": row.id, "customer_id": customer.id})
            return "ignored"
        result = SetupResult(setup_intent_id=si["id"], status="succeeded", client_secret=None,
                             payment_method_id=pm_id, mandate_id=_id_of(si.get("mandate")),
                             customer_id=customer.stripe_customer_id)
        try:
            # The same save as the API's card setup: one row per card (fingerprint), the customer's
            # default and their subscriptions' card from now on.
            pm = enrolment.save_payment_method(s, customer, fetched, saved_at=ctx.now, setup=result)
        except enrolment.Conflict:
            log.warning("SetupIntent's card is saved for another customer; not saved",
                        extra={"event_row_id": row.id, "customer_id": customer.id})
            return "ignored"
        if setup is not None:
            setup.status = "succeeded"
            setup.payment_method_id = pm.id
            setup.last_error_code = setup.last_error_message = None
    elif setup is None:
        return "unknown_object"
    elif row.type == "setup_intent.setup_failed":
        err = si.get("last_setup_error") or {}
        setup.status = si.get("status") or "requires_payment_method"
        setup.last_error_code = err.get("code")
        setup.last_error_message = err.get("message")
    else:  # setup_intent.requires_action
        setup.status = si.get("status") or "requires_action"
    if setup is not None:
        setup.updated_at = ctx.now
    return "applied"


# --- payment_method.*, mandate.updated ----------------------------------------------------------

def _locked_pm(s: Session, stripe_pm_id: str | None) -> PaymentMethod | None:
    if not stripe_pm_id:
        return None
    return s.scalars(select(PaymentMethod).where(PaymentMethod.stripe_payment_method_id == stripe_pm_id)
                     .with_for_update()).first()


def _handle_pm_detached(s: Session, row: WebhookEvent, ctx: _Context, _fetched: Any) -> str:
    """A detached card cannot be charged again (nor attached again): the next charge fails with no
    usable card, and the customer is asked for a new one."""
    pm = _locked_pm(s, row.object_id)
    if pm is None:
        return "unknown_object"
    if pm.detached_at is not None:
        return "unchanged"
    pm.detached_at = _created_at(row)
    log.info("payment method detached", extra={"payment_method_id": pm.id, "customer_id": pm.customer_id})
    return "applied"


def _handle_pm_updated(s: Session, row: WebhookEvent, ctx: _Context, _fetched: Any) -> str:
    """The card network's account updater gave the card a new expiry or number."""
    pm = _locked_pm(s, row.object_id)
    if pm is None:
        return "unknown_object"
    if _superseded(s, row):
        return "stale"
    card = row.payload["data"]["object"].get("card") or {}
    for key in ("brand", "last4", "exp_month", "exp_year", "country"):
        if card.get(key) is not None:
            setattr(pm, key, card[key])
    fingerprint = card.get("fingerprint")
    if fingerprint and fingerprint != pm.fingerprint:
        taken = s.scalar(select(exists().where(PaymentMethod.customer_id == pm.customer_id,
                                               PaymentMethod.fingerprint == fingerprint, PaymentMethod.id != pm.id)))
        if not taken:
            pm.fingerprint = fingerprint
    return "applied"


def _handle_mandate_updated(s: Session, row: WebhookEvent, ctx: _Context, _fetched: Any) -> str:
    """An inactive mandate must not be passed on a PaymentIntent any more: it is cleared from the card,
    whose next charge then goes without one (and fails like any other if the bank insists)."""
    mandate = row.payload["data"]["object"]
    if _superseded(s, row):
        return "stale"
    if mandate.get("status") != "inactive":
        return "ignored"
    cards = s.scalars(select(PaymentMethod).where(PaymentMethod.mandate_id == mandate["id"]).with_for_update()).all()
    if not cards:
        return "unknown_object"
    for pm in cards:
        pm.mandate_id = None
        log.warning("mandate became inactive; cleared from the card",
                    extra={"payment_method_id": pm.id, "customer_id": pm.customer_id})
    return "applied"


_HANDLERS: dict[str, Handler] = {
    "payment_intent.succeeded": _handle_payment_intent,
    "payment_intent.payment_failed": _handle_payment_intent,
    "payment_intent.requires_action": _handle_payment_intent,
    "payment_intent.processing": _handle_payment_intent,
    "payment_intent.canceled": _handle_payment_intent,
    "setup_intent.succeeded": _handle_setup_intent,
    "setup_intent.setup_failed": _handle_setup_intent,
    "setup_intent.requires_action": _handle_setup_intent,
    "payment_method.detached": _handle_pm_detached,
    "payment_method.automatically_updated": _handle_pm_updated,
    "mandate.updated": _handle_mandate_updated,
}


# ------------------------------------------------------------------------------------ backfill

# The event types processed here: what the backfill asks Stripe for (billing.backfill).
HANDLED_TYPES: tuple[str, ...] = tuple(sorted(_HANDLERS))


def accept_listed(event: dict[str, Any], *, enqueue: Callable[[int], None]) -> Accepted:
    """:func:`accept` for an event read back from Stripe's event list rather than delivered: no signature to
    check (it came over the authenticated API), the same checks on its shape as a delivered body, then the
    same store (deduplicated by event id) and the same processing. Raises :class:`WebhookError` for an
    event that could never be stored."""
    return accept(_parse_event(json.dumps(event).encode()), enqueue=enqueue)
