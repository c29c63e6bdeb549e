"""Every Prometheus metric of the product, in one place, on the process's default registry.

``billing web`` serves them at ``GET /metrics``; ``billing worker --metrics-port P`` serves them on a
port of its own (:func:`serve`). Each process counts what happens in it: charge attempts in workers,
card setups and webhook deliveries in the web app, Stripe calls in both. Names start with ``billing_``;
counters get Prometheus' ``_total`` suffix on exposition.

Labels are bounded: HTTP routes by template, Stripe calls by endpoint template
(``POST /v1/payment_intents/:id/confirm``), decline codes from Stripe's documented list with anything
else counted as ``other``, never an id.

Three gauges are read when scraped rather than kept up to date (:class:`BacklogCollector`): the Celery
queue's length in Redis and the outbox's due and dead emails, each by one cheap query with a short
timeout.
A failed read leaves the gauge out of that scrape and sets ``billing_backlog_source_up`` to 0 for it;
a scrape never raises.

Workers run Celery's threads pool (one process per worker), so the default registry is the whole
story; a prefork pool would need prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from billing.dunning import DECLINE_TABLE, REFUSAL_TABLE
from billing.outcomes import OutcomeKind

log = logging.getLogger(__name__)

# --- HTTP app ------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter("billing_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram("billing_http_request_duration_seconds", "HTTP request duration", ["method", "route"])
CUSTOMERS_CREATED = Counter("billing_customers_created", "Customers created through the API")
CARD_SETUPS = Counter("billing_card_setups", "SetupIntents created through the API, by resulting status",
                      ["status"])
SUBSCRIPTIONS_CREATED = Counter("billing_subscriptions_created", "Subscriptions created through the API")
SUBSCRIPTIONS_CANCELED = Counter("billing_subscriptions_canceled", "Subscriptions canceled through the API")
STRIPE_UNAVAILABLE = Counter("billing_api_stripe_unavailable", "API requests answered 503 because Stripe was "
                             "unreachable")

# --- charging ------------------------------------------------------------------------------------

CHARGE_ATTEMPTS = Counter(
    "billing_charge_attempts",
    "Charge attempts finished, by Stripe outcome and the charge status the dunning policy chose",
    ["outcome", "status"])
DECLINES = Counter("billing_charge_declines", "Declined charge attempts by Stripe decline code "
                   "(codes outside Stripe's documented list count as other)", ["decline_code"])

KNOWN_DECLINE_CODES = frozenset(DECLINE_TABLE) | {"authentication_required", "card_declined",
                                                  "generic_decline"}


REFUSED = Counter("billing_charge_refused", "Charge attempts whose request Stripe refused itself "
                  "(invalid_request_error, not a card decline), held for staff as needs_review; by Stripe error "
                  "code (codes outside our list count as other)", ["code"])

KNOWN_REFUSAL_CODES = frozenset(REFUSAL_TABLE) | {"invalid_request"}


def decline_label(code: str | None) -> str:
    return code if code in KNOWN_DECLINE_CODES else "other"


def refusal_label(code: str | None) -> str:
    code = code or "invalid_request"
    return code if code in KNOWN_REFUSAL_CODES or code.startswith("parameter_invalid_") else "other"


def observe_attempt(outcome: Any, status: str) -> None:
    """One finished attempt: ``outcome`` is a :class:`~billing.outcomes.PaymentOutcome`, ``status``
    what :func:`billing.charging.apply_outcome` returned (``ignored:…`` when the charge was final).
    A refused request is counted apart from declines: the card was never tried."""
    CHARGE_ATTEMPTS.labels(outcome=outcome.kind.value, status=status.split(":", 1)[0]).inc()
    if outcome.kind is OutcomeKind.refused:
        REFUSED.labels(code=refusal_label(outcome.error_code)).inc()
    elif outcome.is_failure and (outcome.decline_code or outcome.error_code):
        DECLINES.labels(decline_code=decline_label(outcome.decline_code or outcome.error_code)).inc()


# --- Stripe --------------------------------------------------------------------------------------

STRIPE_LATENCY = Histogram(
    "billing_stripe_request_duration_seconds", "Stripe API calls by endpoint template, sent to answered",
    ["endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30))
STRIPE_REQUESTS = Counter("billing_stripe_requests", "Stripe API calls by endpoint template and HTTP status "
                          "(0: no answer)", ["endpoint", "status"])
STRIPE_RATE_LIMITED = Counter("billing_stripe_rate_limited", "Stripe answers 429 (rate limited), by endpoint",
                              ["endpoint"])
# Stripe's limiters, as its 429 answers name them in Stripe-Rate-Limited-Reason (docs.stripe.com/rate-limits).
RATE_LIMITED_REASONS = frozenset({"global-rate", "endpoint-rate", "global-concurrency", "endpoint-concurrency",
                                  "resource-specific"})
STRIPE_RATE_LIMITED_REASON = Counter(
    "billing_stripe_rate_limited_reasons", "Stripe answers 429 by the limiter its Stripe-Rate-Limited-Reason header "
    "names (none: no header, as on a lock_timeout; other: a value outside Stripe's documented list), by endpoint",
    ["endpoint", "reason"])
RATE_LIMIT_WAIT = Histogram(
    "billing_ratelimit_wait_seconds", "Time a Stripe call waited for a slot in the shared request budget",
    ["endpoint"], buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def stripe_call(endpoint: str, call: Callable[[dict], Any], options: dict) -> Any:
    """``call(options)``, timed and counted under ``endpoint``; exceptions pass through unchanged."""
    started = time.perf_counter()
    status = 200
    try:
        return call(options)
    except Exception as exc:
        status = getattr(exc, "http_status", None) or 0
        if status == 429:
            STRIPE_RATE_LIMITED.labels(endpoint=endpoint).inc()
        raise
    finally:
        STRIPE_LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        STRIPE_REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


def observe_rate_limited_reason(endpoint: str, reason: str | None) -> str:
    """Count one 429 under its reason label; returns the label."""
    reason = (reason or "").strip().lower()
    label = "none" if not reason else reason if reason in RATE_LIMITED_REASONS else "other"
    STRIPE_RATE_LIMITED_REASON.labels(endpoint=endpoint, reason=label).inc()
    return label


def observe_rate_limit_wait(endpoint: str, waited: float) -> float:
    RATE_LIMIT_WAIT.labels(endpoint=endpoint).observe(waited)
    return waited


# --- webhooks, reconciler ------------------------------------------------------------------------

WEBHOOK_LAG = Histogram(
    "billing_webhook_lag_seconds", "Delivery lag of webhook events: received here minus the event's created",
    buckets=(1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600, 3 * 24 * 3600))
RECONCILER_FINDINGS = Counter("billing_reconciler_findings", "Charges the reconciler acted on, by kind",
                              ["kind"])


def observe_webhook_lag(created: int, received_at: float | None = None) -> None:
    received_at = time.time() if received_at is None else received_at
    WEBHOOK_LAG.observe(max(0.0, received_at - created))


RECONCILER_ERRORS = Counter(
    "billing_reconciler_errors",
    "Rows a reconciler sweep could not read from Stripe (the sweep went on with the next), by error class.",
    ["error"],
)


def observe_reconciler_error(error: str) -> None:
    known = error in ("StripeRequestRefused", "TemporaryStripeError")
    RECONCILER_ERRORS.labels(error=error if known else "other").inc()


def observe_reconciler(report: Any) -> None:
    for kind in ("requeued", "settled", "given_up"):
        RECONCILER_FINDINGS.labels(kind=kind).inc(len(getattr(report, kind)))


# --- ownership -----------------------------------------------------------------------------------

FOREIGN_OBJECTS = Counter(
    "billing_foreign_objects",
    "Stripe objects that named one of our charges but were not provably ours, never applied (billing.ownership): "
    "by where they came from (webhook, resume, replayed_error, decline_lookup, search, reconciler, "
    "recovery_page) and what did not match (installation, charge, customer, amount, currency, attempt)",
    ["source", "reason"])


def observe_foreign(source: str, reason: str) -> None:
    FOREIGN_OBJECTS.labels(source=source, reason=reason).inc()


# --- outbox --------------------------------------------------------------------------------------

OUTBOX_FAILURES = Counter(
    "billing_outbox_failures", "Outbox emails not sent on a try, by stage (render, build, smtp) and result "
    "(retry: backing off; dead: given up, refused for good or out of tries)", ["stage", "result"])
OUTBOX_SERVER_UNAVAILABLE = Counter(
    "billing_outbox_server_unavailable", "Relay runs stopped because the SMTP server could not be reached, "
    "closed the connection or refused our sender (no email is charged a try for these)")


# --- read at scrape time -------------------------------------------------------------------------

SCRAPE_TIMEOUT_SECONDS = 1.0


class BacklogCollector(Collector):
    """``billing_queue_depth`` (``LLEN`` of the Celery queue), ``billing_outbox_due`` (pending emails
    whose ``send_after`` has come) and ``billing_outbox_dead`` (emails given up), each one cheap query."""

    def __init__(self, queue: str, timeout: float = SCRAPE_TIMEOUT_SECONDS):
        self.queue = queue
        self.timeout = timeout
        self._redis = None
        # Reads run on threads of their own so a hung connection costs a scrape ``timeout``, not a
        # TCP timeout; a read still hung from an earlier scrape is not started again beside it.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="metrics-backlog")
        self._pending: dict[str, Future] = {}

    def _queue_depth(self) -> int:
        if self._redis is None:
            import redis

            from billing.ratelimit import resolve_broker_url
            from billing.settings import get_settings

            self._redis = redis.Redis.from_url(resolve_broker_url(get_settings()), socket_timeout=self.timeout,
                                               socket_connect_timeout=self.timeout)
        return int(self._redis.llen(self.queue))

    def _outbox(self) -> tuple[int, int]:
        """(due, dead): each on its partial index, ``ix_notifications_due`` and ``ix_notifications_dead``."""
        from sqlalchemy import text

        from billing.db import get_engine

        with get_engine().connect() as conn:
            conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                         {"ms": str(int(self.timeout * 1000))})
            due = conn.execute(text(
                "SELECT count(*) FROM notifications WHERE status = 'pending' AND send_after <= now()")).scalar_one()
            dead = conn.execute(text("SELECT count(*) FROM notifications WHERE status = 'dead'")).scalar_one()
            return int(due), int(dead)

    def _read(self, source: str, read: Callable[[], int]) -> int:
        future = self._pending.get(source)
        if future is None or future.done():
            future = self._pending[source] = self._pool.submit(read)
        return future.result(timeout=self.timeout)

    def describe(self) -> list:
        # Registering must not read Redis and the database (the default registry would call collect()).
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("billing_backlog_source_up", "1 if the scrape-time read of a backlog source "
                               "worked", labels=["source"])
        for source, read in (("redis", self._queue_depth), ("database", self._outbox)):
            try:
                value = self._read(source, read)
            except Exception as exc:  # a scrape must never fail because a dependency is down
                log.warning("metrics: could not read %s", source, extra={"error": type(exc).__name__})
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            if source == "redis":
                gauge = GaugeMetricFamily("billing_queue_depth", "Messages waiting in the Celery queue (Redis LLEN)",
                                          labels=["queue"])
                gauge.add_metric([self.queue], value)
                yield gauge
            else:
                due, dead = value
                yield GaugeMetricFamily("billing_outbox_due", "Emails in the outbox whose send time has come",
                                        value=due)
                yield GaugeMetricFamily("billing_outbox_dead", "Emails given up (refused for good, or out of tries): "
                                        "shown on the finance console's overview", value=dead)
        yield up


_registered: BacklogCollector | None = None
_lock = threading.Lock()


def register_backlog_collector(queue: str = "billing") -> BacklogCollector:
    """Register the scrape-time gauges once per process (later calls return the same collector)."""
    global _registered
    with _lock:
        if _registered is None:
            _registered = BacklogCollector(queue)
            REGISTRY.register(_registered)
        return _registered


def serve(port: int, addr: str = "127.0.0.1", queue: str = "billing") -> None:
    """Expose the default registry over HTTP on ``port`` from a daemon thread (the worker's endpoint)."""
    register_backlog_collector(queue)
    start_http_server(port, addr=addr)
    log.info("metrics served on port %s", port, extra={"metrics_port": port})

