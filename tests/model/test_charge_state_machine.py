"""A model-based test of the charge and subscription lifecycle (a hypothesis ``RuleBasedStateMachine``).

It runs on the real PostgreSQL of the suite, with a hand-written model of Stripe (:class:`StripeModel`,
the ground truth of what was charged) and a real SMTP server (aiosmtpd). Every path that can touch a
charge is a rule, and hypothesis interleaves them in any order:

* the billing run (``run_due``) and the retry run (``retry_due``) at the model's clock;
* a worker running a queued charge task, Stripe answering with every outcome class (succeeded,
  processing, a status that is neither, authentication required, soft and hard declines, a request
  Stripe refuses) over every transport (answered, an error before Stripe processed it, the answer lost
  after it did, a 500 saved under the idempotency key and replayed);
* Stripe's webhooks delivered in any order, late, twice, and foreign ones (another installation's
  metadata, another customer, another amount or currency, a restored database's twin);
* Stripe settling a PaymentIntent it held in ``processing``;
* the customer opening the link of an email actually received, and paying on the recovery page (now or
  much later, with the saved card or a new one, successfully or not);
* staff actions (retry now, pause, resume, void, cancel the subscription);
* reconciler sweeps; the outbox relay with the mail server up, failing temporarily, or away;
* clock jumps of hours to weeks, and a "everything settles" step (queues drained, every webhook
  delivered, a sweep).

After every step it checks what must always hold (SPEC "What must always hold", issue 10):

1. at most one succeeded PaymentIntent per period (the Stripe model's ledger); a paid charge is backed
   by a succeeded PaymentIntent of ours for its amount, and after things settle every succeeded one is
   recorded as paid;
2. a subscription's status is what its charges imply (:func:`billing.state.derive_subscription_status`
   fed with facts computed here from the rows);
3. one open (not paid, uncollectible or void) charge per subscription at a time;
4. every failure is notified exactly once (one failure email per failure event, by dedupe key; none
   about a decline that was not ours; a failed charge's first email is a failure email), nobody is
   sent an email about a charge that was already settled at send time, and no email arrives twice;
5. nothing is back-billed beyond the policy: after a hold ends (``past_due``/``unpaid`` → ``active``) no
   charge is opened for a period that ended before billing resumed (:func:`billing.state.skip_missed_periods`);
6. nothing is stuck: after a sweep, no charge stays ``processing`` on a PaymentIntent Stripe has
   settled, and none stays ``processing`` past the limit on a PaymentIntent in a status that is
   neither success nor failure; after everything settles nothing is ``pending``/``processing`` while
   Stripe has an answer.

``MODEL_STEPS`` (default 2000, about half a minute) sets roughly how many steps one run makes. A failure
prints the steps that led to it, shrunk by hypothesis, as code that can be pasted into a test.
"""

from __future__ import annotations

import collections
import copy
import email
import email.policy
import itertools
import os
import re
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import func, select

from billing import charging, customer_pages, finance, installation, notifications, reconciler, webhooks
from billing.db import unit_of_work
from billing.models import Attempt, AttemptPhase, Charge, Notification, Subscription, SubscriptionStatus
from billing.outcomes import CardDetails, OutcomeKind, PaymentOutcome, TemporaryStripeError
from billing.recovery import TokenError
from billing.settings import get_settings
from billing.state import derive_subscription_status
from billing.stripe_gateway import intent_view, outcome_from_payment_intent
from tests import factories
from tests.conftest import TABLES

FINAL = frozenset({"paid", "uncollectible", "void"})
WAITING = frozenset({"authentication_required", "requires_payment_method", "needs_review"})
IN_FLIGHT = frozenset({"pending", "processing"})
FAILURE_KINDS = frozenset({"payment_failed", "authentication_required"})
# Statuses a PaymentIntent can be paid from in the browser (confirmCardPayment).
PAYABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
# A PaymentIntent in one of these has an answer: the charge must follow it.
STRIPE_SETTLED = frozenset({"succeeded", "requires_payment_method", "canceled"})
# How long a charge may stay ``processing`` (from its latest attempt) before a sweep must have made it
# actionable, when the reconciler does not say (``PROCESSING_LIMIT``).
STUCK_LIMIT = timedelta(days=3)

# Stripe's answers to an off-session confirm that fails (the 402 card_error bodies), by outcome class.
# https://docs.stripe.com/declines/codes, https://docs.stripe.com/payments/save-and-reuse
DECLINES = {
    "authentication_required": {"type": "card_error", "code": "authentication_required",
                                "decline_code": "authentication_required",
                                "message": "This payment requires authentication."},
    "soft_decline": {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                     "message": "Your card has insufficient funds."},
    "soft_decline_later": {"type": "card_error", "code": "card_declined", "decline_code": "do_not_honor",
                           "advice_code": "try_again_later", "message": "Your card was declined."},
    "hard_decline": {"type": "card_error", "code": "card_declined", "decline_code": "lost_card",
                     "message": "Your card was declined."},
}
OUTCOMES = ("succeeded", "processing", "requires_capture", *DECLINES, "refused")
# How the answer travels: received; lost before Stripe processed the request; lost after it did; a 500
# Stripe saved under the idempotency key and replays to every resend (https://docs.stripe.com/api/idempotent_requests).
TRANSPORTS = ("ok", "ok", "ok", "error_before", "lost_after", "saved_500")
# Stripe prunes idempotency keys after 24 hours; a resend after that is a new request.
KEY_LIFETIME = timedelta(hours=24)
FOREIGN_VARIANTS = ("other_installation", "other_customer", "other_amount", "other_currency", "restored_twin")

STEPS = int(os.environ.get("MODEL_STEPS", "2000"))
STEPS_PER_EXAMPLE = 80
SHRINK_SECONDS = int(os.environ.get("MODEL_SHRINK_SECONDS", "120"))
# Invariants to leave out of a run, by name (comma-separated), to look past a known failure while
# investigating; empty in the suite.
SKIP = frozenset(filter(None, os.environ.get("MODEL_SKIP", "").split(",")))

picks = st.integers(min_value=0, max_value=63)


def _note(message: str) -> None:
    """What a step did, printed with the failing steps (or at once when a step is run by hand)."""
    try:
        note(message)
    except InvalidArgument:
        print(message)


# --- Stripe, as a model -------------------------------------------------------------------------------

class StripeModel:
    """The gateway's interface over an in-memory Stripe account: PaymentIntents with their status, the
    idempotency keys' saved answers, the webhook events Stripe would send, and which PaymentIntents are
    another installation's (the ground truth of "charged twice" and "not ours").

    The outcome of the next create or confirm is taken from ``plan`` (set by the rule that runs a
    task); with nothing planned, Stripe charges successfully."""

    def __init__(self, clock, installation_id: str):
        self.clock = clock
        self.installation_id = installation_id
        self.intents: dict[str, dict] = {}
        self.foreign: set[str] = set()
        self.failures: collections.Counter[str] = collections.Counter()  # PaymentIntent → declines
        self.saved: dict[str, tuple] = {}  # idempotency key → the answer Stripe replays, and when it was saved
        self.plan: list[tuple[str, str]] = []
        self.events: list[dict] = []  # sent by Stripe, not delivered yet
        self.cards: dict[str, CardDetails] = {}
        self.faults = True
        self._ids = itertools.count(1)

    # ground truth

    def ours(self) -> list[dict]:
        return [pi for pi_id, pi in self.intents.items() if pi_id not in self.foreign]

    def succeeded_by_charge(self) -> dict[str, list[dict]]:
        by_charge: dict[str, list[dict]] = collections.defaultdict(list)
        for pi in self.ours():
            if pi["status"] == "succeeded":
                by_charge[pi["metadata"].get("charge_id")].append(pi)
        return by_charge

    def declined_charges(self) -> set[str]:
        """Charges (ids as in metadata) one of whose own PaymentIntents was declined at least once."""
        return {pi["metadata"].get("charge_id") for pi in self.ours() if self.failures[pi["id"]]}

    # plumbing

    def _next(self) -> tuple[str, str]:
        kind, transport = self.plan.pop(0) if self.plan else ("succeeded", "ok")
        return kind, (transport if self.faults else "ok")

    def _emit(self, type_: str, pi: dict) -> None:
        self.events.append({
            "id": f"evt_model_{uuid.uuid4().hex[:20]}", "object": "event", "api_version": "2024-06-20",
            "created": int(self.clock().timestamp()), "livemode": False, "type": type_,
            "data": {"object": copy.deepcopy(pi)}})

    def _new_pi(self, *, customer: str, amount: int, currency: str, metadata: dict, payment_method: str | None,
                prefix: str = "pi_model") -> dict:
        pi_id = f"{prefix}_{next(self._ids)}_{uuid.uuid4().hex[:6]}"
        pi = {"id": pi_id, "object": "payment_intent", "amount": amount, "currency": currency, "customer": customer,
              "status": "requires_payment_method", "payment_method": payment_method,
              "metadata": {installation.METADATA_KEY: self.installation_id, **metadata},
              "last_payment_error": None, "client_secret": f"{pi_id}_secret_model", "setup_future_usage": None}
        self.intents[pi_id] = pi
        return pi

    def _apply(self, pi: dict, kind: str, payment_method: str | None) -> PaymentOutcome:
        """Stripe confirms ``pi`` off-session with the answer ``kind``; returns what the gateway returns."""
        pi["payment_method"] = payment_method or pi["payment_method"]
        if kind in DECLINES:
            err = {**DECLINES[kind], "payment_method": {"id": pi["payment_method"]}}
            pi["status"], pi["last_payment_error"] = "requires_payment_method", err
            self.failures[pi["id"]] += 1
            self._emit("payment_intent.payment_failed", pi)
            # The 402 body: its error names the PaymentIntent (https://docs.stripe.com/api/errors).
            return PaymentOutcome(
                kind=OutcomeKind.authentication_required if kind == "authentication_required" else OutcomeKind.declined,
                payment_intent_id=pi["id"], payment_method_id=pi["payment_method"], error_code=err["code"],
                decline_code=err.get("decline_code"), advice_code=err.get("advice_code"), message=err["message"])
        pi["status"], pi["last_payment_error"] = kind, None
        self._emit({"succeeded": "payment_intent.succeeded", "processing": "payment_intent.processing",
                    "requires_capture": "payment_intent.amount_capturable_updated"}[kind], pi)
        return outcome_from_payment_intent(pi)

    def _saved(self, key: str) -> bool:
        """Whether Stripe still holds an answer under ``key``: keys are pruned after 24 hours."""
        saved = self.saved.get(key)
        if saved is not None and self.clock() - saved[-1] >= KEY_LIFETIME:
            del self.saved[key]
            return False
        return saved is not None

    def _save(self, key: str, *answer) -> None:
        self.saved[key] = (*answer, self.clock())

    def _replay(self, key: str) -> PaymentOutcome:
        saved = self.saved[key]
        if saved[0] == "error":
            raise TemporaryStripeError("Stripe replayed the 500 saved under this key", replayed=True)
        if saved[0] == "current":  # a 400 payment_intent_unexpected_state: the gateway reads the PaymentIntent
            return outcome_from_payment_intent(self.intents[saved[1]])
        return saved[1]

    def _transport_before(self, key: str, transport: str) -> None:
        if transport == "error_before":
            raise TemporaryStripeError("connection reset before Stripe read the request")
        if transport == "saved_500":
            self._save(key, "error")
            raise TemporaryStripeError("Stripe answered 500 (saved under the key)")

    # the gateway's interface

    def charge_off_session(self, *, customer_id, payment_method_id, amount, currency, mandate_id, metadata,
                           idempotency_key):
        if self._saved(idempotency_key):
            return self._replay(idempotency_key)
        kind, transport = self._next()
        self._transport_before(idempotency_key, transport)
        if kind == "refused":
            outcome = PaymentOutcome(kind=OutcomeKind.refused, error_code="amount_too_small",
                                     message="Amount must be at least 50 cents")
        else:
            pi = self._new_pi(customer=customer_id, amount=amount, currency=currency, metadata=dict(metadata),
                              payment_method=payment_method_id)
            outcome = self._apply(pi, kind, payment_method_id)
        self._save(idempotency_key, "outcome", outcome)
        if transport == "lost_after":
            raise TemporaryStripeError("the answer was lost after Stripe processed the request")
        return outcome

    def confirm_off_session(self, *, payment_intent_id, payment_method_id, mandate_id, idempotency_key):
        if self._saved(idempotency_key):
            return self._replay(idempotency_key)
        kind, transport = self._next()
        self._transport_before(idempotency_key, transport)
        pi = self.intents[payment_intent_id]
        if pi["status"] not in PAYABLE:
            self._save(idempotency_key, "current", payment_intent_id)
            outcome = outcome_from_payment_intent(pi)
        elif kind == "refused":
            outcome = PaymentOutcome(kind=OutcomeKind.refused, error_code="amount_too_small",
                                     payment_intent_id=payment_intent_id)
            self._save(idempotency_key, "outcome", outcome)
        else:
            outcome = self._apply(pi, kind, payment_method_id)
            self._save(idempotency_key, "outcome", outcome)
        if transport == "lost_after":
            raise TemporaryStripeError("the answer was lost after Stripe processed the request")
        return outcome

    def find_payment_intent(self, *, customer_id, attempt_id, attempt_key=None):
        # The real gateway's rule (billing.stripe_gateway.find_payment_intent): newest first, passing
        # over another installation's and another attempt key's (a restored database's twin).
        for pi in reversed(list(self.intents.values())):
            meta = pi["metadata"]
            if pi["customer"] != customer_id or meta.get("attempt_id") != str(attempt_id):
                continue
            if meta.get(installation.METADATA_KEY) not in (None, self.installation_id):
                continue
            if attempt_key is not None and meta.get("attempt_key") not in (None, attempt_key):
                continue
            return outcome_from_payment_intent(pi)
        return None

    def retrieve_payment_intent(self, payment_intent_id):
        return outcome_from_payment_intent(self.intents[payment_intent_id])

    def payment_intent_for_customer(self, payment_intent_id):
        return intent_view(self.intents[payment_intent_id])

    def create_payment_intent_on_session(self, *, customer_id, amount, currency, metadata, idempotency_key):
        if self._saved(idempotency_key):
            return intent_view(self.saved[idempotency_key][1])
        pi = self._new_pi(customer=customer_id, amount=amount, currency=currency, metadata=dict(metadata),
                          payment_method=None)
        self._save(idempotency_key, "view", copy.deepcopy(pi))
        return intent_view(pi)

    def retrieve_payment_method(self, payment_method_id):
        return self.cards[payment_method_id]

    # what happens at Stripe without us

    def pay_on_session(self, pi_id: str, *, success: bool, new_card: bool) -> bool:
        """Stripe.js confirms the PaymentIntent with the customer present. False: it cannot be paid."""
        pi = self.intents[pi_id]
        if pi["status"] not in PAYABLE:
            return False
        if new_card:
            pm = f"pm_model_new_{next(self._ids)}"
            self.cards[pm] = CardDetails(payment_method_id=pm, customer_id=pi["customer"], brand="visa", last4="4444",
                                         exp_month=1, exp_year=2040, country="FR", fingerprint=f"fpnew{pm}")
            pi["payment_method"], pi["setup_future_usage"] = pm, "off_session"
        if success:
            pi["status"], pi["last_payment_error"] = "succeeded", None
            self._emit("payment_intent.succeeded", pi)
        else:
            self._apply(pi, "soft_decline", None)
        return True

    def settle(self, pi_id: str, *, success: bool) -> None:
        """A PaymentIntent Stripe held (processing, or waiting for capture) gets its answer."""
        pi = self.intents[pi_id]
        if success:
            pi["status"], pi["last_payment_error"] = "succeeded", None
            self._emit("payment_intent.succeeded", pi)
        else:
            self._apply(pi, "soft_decline", None)

    def foreign_intent(self, *, variant: str, charge_id: int, attempt_id: int, customer: str, amount: int,
                       currency: str, succeeded: bool) -> dict:
        """A PaymentIntent that names one of our charges (and its latest attempt id, as a restored
        database or a twin installation reuses ids) but is not ours; returns its event."""
        meta = {"charge_id": str(charge_id), "attempt_id": str(attempt_id),
                "attempt_key": f"attempt-{attempt_id}-0123456789ab"}
        pi = self._new_pi(customer="cus_someone_else" if variant == "other_customer" else customer,
                          amount=amount + 100 if variant == "other_amount" else amount,
                          currency=({"usd": "eur"}.get(currency, "usd") if variant == "other_currency" else currency),
                          metadata=meta, payment_method="pm_someone_else", prefix="pi_foreign")
        if variant == "other_installation":
            pi["metadata"][installation.METADATA_KEY] = "inst_staging_twin"  # _new_pi tags it as ours first
        self.foreign.add(pi["id"])
        before = len(self.events)
        if succeeded:
            pi["status"] = "succeeded"
            self._emit("payment_intent.succeeded", pi)
        else:
            self._apply(pi, "hard_decline", None)
        return self.events.pop(before)


# --- SMTP -------------------------------------------------------------------------------------------------

class MailServer:
    """An aiosmtpd handler that keeps what it receives, or answers 451 while ``failing``."""

    def __init__(self):
        self.failing = False
        self.messages: list[email.message.EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd hook
        if self.failing:
            return "451 4.3.0 Temporary local problem, try again later"
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append(msg)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mail_server():
    from aiosmtpd.controller import Controller

    handler, port = MailServer(), _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.url = f"smtp://127.0.0.1:{port}"
    yield handler
    controller.stop()


# --- the database ---------------------------------------------------------------------------------------

def _truncate_all() -> None:
    """The suite's clean slate (``clean_db``'s tables) before each example: each starts from nothing.
    Staff accounts, API keys and the installation's identity stay, as other tests' session fixtures may
    rely on them."""
    url = get_settings().database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


RECOVER_LINK = re.compile(r"/recover/([A-Za-z0-9_\-]{20,})")
FAILURE_KEY = re.compile(r"^charge-(\d+):attempt-(\d+):(payment_failed|authentication_required)$")
STATS: dict = {"examples": 0, "steps": 0, "seen": collections.Counter()}


class ChargeLifecycle(RuleBasedStateMachine):
    """Three subscriptions (two customers; euro monthly, yen weekly, dollar fortnightly), all due now."""

    mail: MailServer  # set by the test

    def __init__(self):
        super().__init__()
        _truncate_all()
        STATS["examples"] += 1
        self.mail.messages.clear()
        self.mail.failing = False
        self.now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        self.gw = StripeModel(lambda: self.now, installation.installation_id())
        self.tasks: list[tuple[int, bool]] = []  # (charge id, manual): the Celery queue
        self.delivered: list[dict] = []  # events Stripe has delivered at least once (redelivered later)
        self.pages: list[tuple[str, str]] = []  # (token, PaymentIntent id) of recovery pages left open
        self.sub_status: dict[int, str] = {}
        self.resumed_at: dict[int, datetime] = {}
        self.seen_charges: set[int] = set()
        self.in_flight_since: dict[int, datetime] = {}
        self.stripe_customers: dict[int, str] = {}
        self.retry_requests: dict[int, datetime] = {}  # staff "retry now" accepted, by charge
        with unit_of_work() as uow:
            s = uow.session
            ada, bob = factories.make_customer(s, name="Ada"), factories.make_customer(s, name="Bob")
            factories.make_payment_method(s, ada)
            factories.make_payment_method(s, bob)
            due = self.now - timedelta(minutes=1)
            plans = [(ada, 1999, "eur", "month", 1), (ada, 500, "jpy", "week", 1), (bob, 4200, "usd", "week", 2)]
            for customer, amount, currency, interval, count in plans:
                sub = factories.make_subscription(s, customer, amount=amount, currency=currency, interval=interval,
                                                  interval_count=count, anchor_at=due, next_charge_at=due)
                self.sub_status[sub.id] = sub.status
            self.stripe_customers = {c.id: c.stripe_customer_id for c in (ada, bob)}
            uow.commit()

    # --- helpers -----------------------------------------------------------------------------------

    def _enqueue(self, charge_id: int, manual: bool = False) -> None:
        if (charge_id, manual) not in self.tasks:
            self.tasks.append((charge_id, manual))

    def retry_charge(self, charge_id: int) -> None:  # finance.Jobs
        self._enqueue(charge_id, manual=True)

    def relay_outbox(self) -> None:  # finance.Jobs: the relay rule sends
        pass

    def _charges(self) -> list[Charge]:
        with unit_of_work() as uow:
            return list(uow.session.scalars(select(Charge).order_by(Charge.id)))

    def _pick(self, items: list, pick: int):
        return items[pick % len(items)] if items else None

    def _run_task(self, index: int) -> str | None:
        if not self.tasks:
            return None
        charge_id, manual = self.tasks.pop(index % len(self.tasks))
        try:
            result = charging.process_charge(charge_id, gateway=self.gw, now=self.now, manual=manual)
        except TemporaryStripeError:
            # Celery retries the task; the attempt row keeps its idempotency key.
            self._enqueue(charge_id, manual)
            return "temporary"
        if result == "locked":
            self._enqueue(charge_id, manual)
        return result

    def _process_row(self, row_id: int) -> str:
        try:
            return webhooks.process(row_id, gateway=self.gw, now=self.now)
        except webhooks.EventDeferred:
            return "deferred"  # the stored row is processed again on redelivery or by the sweep

    def _deliver(self, event: dict) -> str:
        rows: list[int] = []
        webhooks.accept(event, enqueue=rows.append)
        if event not in self.delivered:
            self.delivered.append(event)
        return ",".join(self._process_row(r) for r in rows) or "duplicate"

    def _drain(self, limit: int = 60) -> None:
        for _ in range(limit):
            if not self.tasks:
                return
            self._run_task(0)

    def _retry_due(self) -> None:
        charging.retry_due(now=self.now, enqueue=self._enqueue, enqueue_manual=self.retry_charge)

    def _sweep(self) -> reconciler.SweepReport:
        report = reconciler.sweep(now=self.now, enqueue=self._enqueue, gateway=self.gw)
        webhooks.requeue_unprocessed(enqueue=self._process_row, now=self.now)
        return report

    def _page_call(self, fn, *args):
        """A customer page's request, at the model's clock (the pages read the one clock)."""
        with freeze_time(self.now):
            return fn(*args, gateway=self.gw)

    # --- rules: billing -----------------------------------------------------------------------------

    @rule()
    def billing_run(self):
        report = charging.run_due(now=self.now, enqueue=self._enqueue)
        _note(f"run_due opened {report.created}")

    @rule()
    def retry_run(self):
        self._retry_due()

    @precondition(lambda self: self.tasks)
    @rule(index=picks)
    def task_lost(self, index):
        """A task that never runs: the broker lost it, or its retries ran out (the sweeps must notice)."""
        _note(f"lost task {self.tasks.pop(index % len(self.tasks))}")

    @precondition(lambda self: self.tasks)
    @rule(index=picks, kind=st.sampled_from(OUTCOMES), transport=st.sampled_from(TRANSPORTS))
    def worker_runs_task(self, index, kind, transport):
        self.gw.plan = [(kind, transport)]
        _note(f"task → {self._run_task(index)}")
        self.gw.plan = []

    @precondition(lambda self: self.tasks)
    @rule(kind=st.sampled_from(OUTCOMES), transport=st.sampled_from(TRANSPORTS))
    def worker_runs_next_task(self, kind, transport):
        self.worker_runs_task(0, kind, transport)

    # --- rules: Stripe on its own -------------------------------------------------------------------

    @precondition(lambda self: self.gw.events)
    @rule(index=picks)
    def webhook_delivered(self, index):
        """Any event not delivered yet: out of order, and as late as the clock has moved since."""
        if self.gw.events:
            event = self.gw.events.pop(index % len(self.gw.events))
            _note(f"{event['type']} → {self._deliver(event)}")

    @precondition(lambda self: self.delivered)
    @rule(index=picks)
    def webhook_redelivered(self, index):
        event = self._pick(self.delivered, index)
        if event is not None:
            _note(f"again {event['type']} → {self._deliver(event)}")

    @precondition(lambda self: self.seen_charges)
    @rule(index=picks, variant=st.sampled_from(FOREIGN_VARIANTS), succeeded=st.booleans())
    def foreign_webhook(self, index, variant, succeeded):
        charge = self._pick(self._charges(), index)
        if charge is None:
            return
        with unit_of_work() as uow:
            sub = uow.session.get(Subscription, charge.subscription_id)
            customer = self.stripe_customers[sub.customer_id]
            attempt_id = uow.session.scalar(select(func.max(Attempt.id)).where(Attempt.charge_id == charge.id))
        event = self.gw.foreign_intent(variant=variant, charge_id=charge.id, attempt_id=attempt_id or 1,
                                       customer=customer, amount=charge.amount, currency=charge.currency,
                                       succeeded=succeeded)
        _note(f"foreign {event['type']} → {self._deliver(event)}")

    @precondition(lambda self: any(pi["status"] in ("processing", "requires_capture") for pi in self.gw.ours()))
    @rule(index=picks, success=st.booleans())
    def stripe_settles_held_payment(self, index, success):
        held = [pi["id"] for pi in self.gw.ours() if pi["status"] in ("processing", "requires_capture")]
        pi_id = self._pick(held, index)
        if pi_id is not None:
            self.gw.settle(pi_id, success=success)

    # --- rules: the customer -----------------------------------------------------------------------

    @precondition(lambda self: self.mail.messages)
    @rule(index=picks)
    def customer_opens_link(self, index):
        """A link from an email the customer really received."""
        tokens = [m for msg in self.mail.messages for m in RECOVER_LINK.findall(msg.get_body(("plain",)).get_content())]
        token = self._pick(tokens, index)
        if token is None:
            return
        try:
            page = self._page_call(customer_pages.open_recovery, token)
        except (TokenError, customer_pages.NothingToPay, customer_pages.CannotPayOnline) as exc:
            _note(f"page: {type(exc).__name__}")
            return
        if page.payable:
            self.pages.append((token, page.client_secret.split("_secret_")[0]))

    @precondition(lambda self: self.pages)
    @rule(index=picks, success=st.booleans(), new_card=st.booleans())
    def customer_pays_on_page(self, index, success, new_card):
        """On a page opened earlier (maybe much earlier): Stripe.js confirms, then the page reports back."""
        opened = self._pick(self.pages, index)
        if opened is None:
            return
        token, pi_id = opened
        if not self.gw.pay_on_session(pi_id, success=success, new_card=new_card):
            return
        if success:
            self.pages.remove(opened)
        try:
            outcome = self._page_call(customer_pages.complete_recovery, token)
            _note(f"page says {outcome.charge_status}")
        except (TokenError, customer_pages.CannotPayOnline) as exc:
            _note(f"page: {type(exc).__name__}")

    # --- rules: staff, sweeps, mail, time ---------------------------------------------------------

    @precondition(lambda self: self.seen_charges)
    @rule(index=picks, action=st.sampled_from(["retry_now", "pause_retries", "resume_retries", "void",
                                               "cancel_subscription"]))
    def staff_action(self, index, action):
        charge = self._pick(self._charges(), index)
        if charge is None:
            return
        try:
            _note(finance.perform(action, charge.id, actor="olga.operator@example.com", reason="model-based test",
                                 jobs=self, now=self.now))
        except finance.ActionRefused as exc:
            _note(f"refused: {exc}")
        else:
            if action == "retry_now":
                self.retry_requests[charge.id] = self.now

    @rule()
    def reconciler_sweep(self):
        before = {c.id: c for c in self._charges()}
        self._sweep()
        self._check_after_sweep(before)

    @rule(mode=st.sampled_from(["up", "up", "failing", "away"]))
    def outbox_relay(self, mode):
        before = {c.id: c.status for c in self._charges()}
        with unit_of_work() as uow:
            due = set(uow.session.scalars(select(Notification.id).where(Notification.status == "pending",
                                                                        Notification.send_after <= self.now)))
        self.mail.failing = mode == "failing"
        url = self.mail.url if mode != "away" else f"smtp://127.0.0.1:{_free_port()}"
        notifications.relay_due(now=self.now, smtp_url=url)
        self.mail.failing = False
        with unit_of_work() as uow:
            sent = uow.session.execute(select(Notification.id, Notification.kind, Notification.charge_id)
                                       .where(Notification.status == "sent", Notification.id.in_(due))).all()
        if "sent_while_settled" in SKIP:
            return
        for nid, kind, charge_id in sent:
            status = before.get(charge_id)
            if kind in FAILURE_KINDS or kind == "reminder":
                bad = status in FINAL or status == "needs_review"
            elif kind == "final_notice":
                bad = status != "uncollectible"
            else:
                bad = kind == "payment_succeeded" and status != "paid"
            assert not bad, f"email {nid} ({kind}) sent about charge {charge_id} which was already {status}"

    @rule(delta=st.sampled_from([timedelta(hours=1), timedelta(hours=5), timedelta(hours=13), timedelta(days=1),
                                 timedelta(days=2), timedelta(days=4), timedelta(weeks=1), timedelta(weeks=2),
                                 timedelta(weeks=5)]))
    def clock_jumps(self, delta):
        self.now += delta

    @rule()
    def everything_settles(self):
        """Workers drain their queue, Stripe delivers every event, a sweep runs: then what Stripe holds as
        succeeded must be paid here, and nothing may wait for an answer Stripe has already given."""
        self.gw.faults = False
        try:
            for _ in range(3):  # a resumed attempt may need a later sweep to learn how Stripe settled it
                self._drain()
                while self.gw.events:
                    self._deliver(self.gw.events.pop(0))
                self.now += reconciler.STALE_AFTER + timedelta(minutes=1)
                self._sweep()
                self._retry_due()
            self._drain()
            while self.gw.events:
                self._deliver(self.gw.events.pop(0))
        finally:
            self.gw.faults = True
        charges = {c.id: c for c in self._charges()}
        if "settled_paid" not in SKIP:
            for charge_id, pis in self.gw.succeeded_by_charge().items():
                charge = charges.get(int(charge_id))
                assert charge is not None and charge.status == "paid", (
                    f"Stripe collected {[p['id'] for p in pis]} for charge {charge_id}, which is "
                    f"{charge.status if charge else 'missing'} after everything settled")
        if "staff_retry_kept" not in SKIP:
            self._staff_retries_happened(charges)
        if "settled_stuck" not in SKIP:
            for c in charges.values():
                if c.status in IN_FLIGHT:
                    pi = self.gw.intents.get(c.payment_intent_id) if c.payment_intent_id else None
                    assert pi is not None and pi["status"] not in STRIPE_SETTLED, (
                        f"charge {c.id} is still {c.status} after everything settled; its PaymentIntent is "
                        f"{pi['status'] if pi else 'none'}")

    # --- invariants ----------------------------------------------------------------------------------

    def _staff_retries_happened(self, charges: dict[int, Charge]) -> None:
        """A "retry now" staff were told is on its way has been attempted (or the charge moved on)."""
        with unit_of_work() as uow:
            latest = dict(uow.session.execute(select(Attempt.charge_id, func.max(Attempt.started_at))
                                              .group_by(Attempt.charge_id)).all())
        for charge_id, asked in list(self.retry_requests.items()):
            tried = latest.get(charge_id) is not None and latest[charge_id] >= asked
            if tried or charges[charge_id].status not in ("requires_payment_method", "needs_review"):
                del self.retry_requests[charge_id]
                continue
            raise AssertionError(f"staff asked for a retry of charge {charge_id} at {asked:%Y-%m-%d %H:%M}; "
                                 f"after everything settled it was never attempted ({charges[charge_id].status})")

    def _check_after_sweep(self, before: dict[int, Charge]) -> None:
        """A sweep settles every ``processing`` charge whose PaymentIntent Stripe has settled, and makes
        one processing for longer than the limit (counted from its latest attempt) actionable."""
        if "stuck" in SKIP:
            return
        after = {c.id: c for c in self._charges()}
        with unit_of_work() as uow:
            s = uow.session
            unfinished = set(s.scalars(select(Attempt.charge_id).where(Attempt.phase == AttemptPhase.started)))
            started = dict(s.execute(select(Attempt.charge_id, func.max(Attempt.started_at))
                                     .group_by(Attempt.charge_id)).all())
        limit = getattr(reconciler, "PROCESSING_LIMIT", STUCK_LIMIT)
        for charge_id, was in before.items():
            now = after[charge_id]
            if was.status != "processing" or now.status != "processing" or charge_id in unfinished:
                continue
            pi = self.gw.intents.get(now.payment_intent_id) if now.payment_intent_id else None
            status = pi["status"] if pi else None
            if was.updated_at < self.now - reconciler.STALE_AFTER:
                assert status not in STRIPE_SETTLED, (
                    f"charge {charge_id} stays processing after a sweep although Stripe settled its "
                    f"PaymentIntent as {status}")
            since = started.get(charge_id)
            assert since is None or self.now - since <= limit, (
                f"charge {charge_id} has been processing since {since:%Y-%m-%d %H:%M} (PaymentIntent {status}), "
                f"and a sweep at {self.now:%Y-%m-%d %H:%M} left it there, past the {limit} limit")

    @invariant()
    def money_and_status_hold(self):
        STATS["steps"] += 1
        with unit_of_work() as uow:
            s = uow.session
            subs = list(s.scalars(select(Subscription).order_by(Subscription.id)))
            charges = list(s.scalars(select(Charge).order_by(Charge.id)))
            notes = s.execute(select(Notification.dedupe_key, Notification.kind, Notification.charge_id)).all()
        by_sub: dict[int, list[Charge]] = collections.defaultdict(list)
        STATS["seen"].update({f"charge:{c.status}" for c in charges} | {f"sub:{s.status}" for s in subs})
        for c in charges:
            by_sub[c.subscription_id].append(c)
            if c.status in IN_FLIGHT:
                self.in_flight_since.setdefault(c.id, self.now)
            else:
                self.in_flight_since.pop(c.id, None)
        checks = {
            "one_success": lambda: self._one_success_per_period(charges),
            "paid_backed": lambda: self._paid_is_backed(charges),
            "one_open": lambda: self._one_open_per_subscription(by_sub),
            "derived_status": lambda: self._status_follows_charges(subs, by_sub),
            "notified_once": lambda: self._failures_notified_once(charges, notes),
            "no_back_billing": lambda: self._no_back_billing(subs, charges),
            "no_duplicate_email": self._no_email_twice,
        }
        for name, check in checks.items():
            if name not in SKIP:
                check()
        self._track_resumes(subs)

    def _one_success_per_period(self, charges):
        for charge_id, pis in self.gw.succeeded_by_charge().items():
            assert len(pis) <= 1, f"charge {charge_id} was collected {len(pis)} times: {[p['id'] for p in pis]}"

    def _paid_is_backed(self, charges):
        for c in charges:
            if c.status != "paid":
                continue
            pi = self.gw.intents.get(c.payment_intent_id) if c.payment_intent_id else None
            assert pi is not None and c.payment_intent_id not in self.gw.foreign, (
                f"charge {c.id} is paid on {c.payment_intent_id}, which is not a PaymentIntent of ours")
            assert pi["status"] == "succeeded" and pi["metadata"].get("charge_id") == str(c.id), (
                f"charge {c.id} is paid but its PaymentIntent {pi['id']} is {pi['status']} "
                f"(for charge {pi['metadata'].get('charge_id')})")
            assert (pi["amount"], pi["currency"]) == (c.amount, c.currency), (
                f"charge {c.id} of {c.amount} {c.currency} is paid by {pi['amount']} {pi['currency']}")

    def _one_open_per_subscription(self, by_sub):
        for sub_id, cs in by_sub.items():
            open_ = [(c.id, c.period_index, c.status) for c in cs if c.status not in FINAL]
            assert len(open_) <= 1, f"subscription {sub_id} has {len(open_)} open charges: {open_}"

    def _status_follows_charges(self, subs, by_sub):
        final_status = SubscriptionStatus(get_settings().final_subscription_status)
        for sub in subs:
            cs = by_sub.get(sub.id, [])
            open_failure = any(c.status in WAITING or (c.status in IN_FLIGHT and (c.first_failed_at is not None
                                                                                  or c.last_error_code is not None))
                               for c in cs)
            given_up = any(c.status == "uncollectible" and not any(
                later.period_index > c.period_index and later.status in ("paid", "void") for later in cs) for c in cs)
            expected = derive_subscription_status(canceled=sub.canceled_at is not None, open_failure=open_failure,
                                                  given_up=given_up, final_status=final_status)
            assert sub.status == expected, (
                f"subscription {sub.id} is {sub.status}, but its charges imply {expected.value}: "
                f"{[(c.id, c.period_index, c.status, bool(c.first_failed_at)) for c in cs]}")

    def _failures_notified_once(self, charges, notes):
        per_event = collections.Counter()
        failure_rows = collections.Counter()
        for key, kind, charge_id in notes:
            match = FAILURE_KEY.match(key)
            if match:
                per_event[(int(match.group(1)), int(match.group(2)))] += 1
            if kind in FAILURE_KINDS:
                failure_rows[charge_id] += 1
        for (charge_id, attempt), n in per_event.items():
            assert n == 1, f"{n} failure emails for one failure event (charge {charge_id}, attempt {attempt})"
        declined = self.gw.declined_charges()
        for charge_id in failure_rows:
            assert str(charge_id) in declined, (
                f"charge {charge_id}'s customer is emailed about a failure, but no PaymentIntent of theirs failed")
        for c in charges:
            if c.first_failed_at is not None and c.status in ("authentication_required", "requires_payment_method",
                                                              "uncollectible"):
                assert failure_rows[c.id] >= 1, (
                    f"charge {c.id} failed ({c.status}) and its customer was never sent a failure email")

    def _no_back_billing(self, subs, charges):
        for c in charges:
            if c.id in self.seen_charges:
                continue
            self.seen_charges.add(c.id)
            resumed = self.resumed_at.get(c.subscription_id)
            assert resumed is None or c.period_end > resumed, (
                f"charge {c.id} bills period {c.period_index} ({c.period_start:%Y-%m-%d} – {c.period_end:%Y-%m-%d}) "
                f"of subscription {c.subscription_id}, which ended before billing resumed on {resumed:%Y-%m-%d %H:%M}")

    def _track_resumes(self, subs):
        for sub in subs:
            if self.sub_status.get(sub.id) in ("past_due", "unpaid") and sub.status == "active":
                self.resumed_at[sub.id] = self.now
            self.sub_status[sub.id] = sub.status

    def _no_email_twice(self):
        ids = collections.Counter(m["Message-ID"] for m in self.mail.messages)
        twice = [k for k, n in ids.items() if n > 1]
        assert not twice, f"the same email arrived {len(twice)} time(s) more than once"


def test_charge_lifecycle_model(mail_server, monkeypatch):
    ChargeLifecycle.mail = mail_server
    # Shrinking a long failing run may take hypothesis minutes; a shorter bound keeps the suite's timeout
    # (and a still useful, if less minimal, sequence). Internal, hence guarded.
    from hypothesis.internal.conjecture import engine

    if hasattr(engine, "MAX_SHRINKING_SECONDS"):
        monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
    started = time.monotonic()
    STATS.update(examples=0, steps=0, seen=collections.Counter())
    run_state_machine_as_test(ChargeLifecycle, settings=settings(
        max_examples=max(1, STEPS // STEPS_PER_EXAMPLE), stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
        database=None, suppress_health_check=list(HealthCheck)))
    print(f"model: {STATS['examples']} examples, {STATS['steps']} checked states in {time.monotonic() - started:.1f}s; "
          f"states seen (steps): {dict(sorted(STATS['seen'].items()))}")


# --- sequences the machine found, replayed step by step ---------------------------------------------------

def _replay(mail_server, steps) -> None:
    ChargeLifecycle.mail = mail_server
    machine = ChargeLifecycle()
    for step in steps:
        step(machine)
        machine.money_and_status_hold()


def test_staff_retry_of_a_refused_charge_keeps_the_subscription_true(mail_server):
    """A charge Stripe refused (``needs_review``, never a card failure) that staff retry: while the retry
    runs, and after Stripe replays a saved 500 so the attempt is abandoned, the subscription says what
    its charges say."""
    _replay(mail_server, [
        lambda m: m.billing_run(),
        lambda m: m.worker_runs_task(0, "refused", "ok"),
        lambda m: m.staff_action(0, "retry_now"),
        lambda m: m.worker_runs_task(2, "succeeded", "saved_500"),
        lambda m: m.worker_runs_task(2, "succeeded", "ok"),
    ])


def test_a_twin_payment_intent_never_makes_a_resumed_attempt_charge_twice(mail_server):
    """The answer to an attempt is lost; a PaymentIntent from a restored database's twin names the same
    charge and attempt id; the attempt resumes a day later, after Stripe pruned its key."""
    _replay(mail_server, [
        lambda m: m.billing_run(),
        lambda m: m.worker_runs_task(0, "succeeded", "lost_after"),
        lambda m: m.foreign_webhook(0, "restored_twin", False),
        lambda m: m.clock_jumps(timedelta(days=1)),
        lambda m: m.worker_runs_task(2, "succeeded", "ok"),
    ])
