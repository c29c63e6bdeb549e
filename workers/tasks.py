"""Celery tasks: thin. Each takes IDs, calls one billing/ function, and owns nothing else.

The billing functions open their own units of work, contain per-item failures (they log them), and
enqueue follow-up work only after their transactions commit, through the ``enqueue`` callable they
are handed here. That callable is the only place that knows about Celery.
"""

from __future__ import annotations

import logging
import random

from billing import charging, notifications, reconciler, webhooks
from billing.outcomes import TemporaryStripeError
from workers.celery_app import CHARGE_RETRY_MAX_COUNTDOWN, app

log = logging.getLogger(__name__)

CHARGE_MAX_RETRIES = 10


def enqueue_charge(charge_id: int) -> None:
    charge_attempt.delay(charge_id)


def retry_countdown(retries: int) -> float:
    """Exponential backoff with jitter (5 s, 10 s, 20 s, … capped), so retries of many charges that
    failed together (a Stripe outage) do not come back in one wave."""
    base = min(CHARGE_RETRY_MAX_COUNTDOWN, 5 * 2**retries)
    return base / 2 + random.uniform(0, base / 2)


@app.task(ignore_result=True)
def run_billing() -> None:
    report = charging.run_due(enqueue=enqueue_charge)
    log.info("billing run finished", extra={"report": repr(report)})


@app.task(bind=True, ignore_result=True, max_retries=CHARGE_MAX_RETRIES)
def charge_attempt(self, charge_id: int) -> None:
    try:
        result = charging.process_charge(charge_id)
    except TemporaryStripeError as exc:
        # The attempt row keeps its idempotency key, so the retry resends the same request.
        if self.request.retries >= self.max_retries:
            log.warning("charge attempt still failing temporarily; left to the reconciler",
                        extra={"charge_id": charge_id, "error": type(exc).__name__})
            return
        raise self.retry(countdown=retry_countdown(self.request.retries), exc=exc) from None
    if result == "locked" and self.request.retries < self.max_retries:
        raise self.retry(countdown=1 + random.uniform(0, 2))


def enqueue_manual_retry(charge_id: int) -> None:
    retry_charge_now.delay(charge_id)


@app.task(bind=True, ignore_result=True, max_retries=CHARGE_MAX_RETRIES)
def retry_charge_now(self, charge_id: int) -> None:
    """A staff "retry now": the scheduled run's exactly-once path, before the charge's retry time."""
    try:
        result = charging.process_charge(charge_id, manual=True)
    except TemporaryStripeError as exc:
        if self.request.retries >= self.max_retries:
            log.warning("manual retry still failing temporarily; left to the reconciler",
                        extra={"charge_id": charge_id, "error": type(exc).__name__})
            return
        raise self.retry(countdown=retry_countdown(self.request.retries), exc=exc) from None
    if result == "locked" and self.request.retries < self.max_retries:
        raise self.retry(countdown=1 + random.uniform(0, 2))
    log.info("manual retry finished", extra={"charge_id": charge_id, "result": result})


@app.task(ignore_result=True)
def retry_due_charges() -> None:
    charging.retry_due(now=None, enqueue=enqueue_charge)


@app.task(ignore_result=True)
def reconcile() -> None:
    report = reconciler.sweep(enqueue=enqueue_charge)
    # Webhook events whose processing task was lost or gave up are stored: run them again.
    requeued_events = webhooks.requeue_unprocessed(enqueue=enqueue_webhook_event)
    log.info("reconciler sweep finished", extra={"report": repr(report), "requeued_events": len(requeued_events)})


@app.task(ignore_result=True)
def relay_outbox() -> None:
    notifications.relay_due()


WEBHOOK_MAX_RETRIES = 10


def enqueue_webhook_event(event_row_id: int) -> None:
    process_webhook_event.delay(event_row_id)


@app.task(bind=True, ignore_result=True, max_retries=WEBHOOK_MAX_RETRIES)
def process_webhook_event(self, event_row_id: int) -> None:
    try:
        webhooks.process(event_row_id)
    except (webhooks.EventDeferred, TemporaryStripeError) as exc:
        # Deferred while a charge attempt is in flight (it records the same outcome), or Stripe was
        # unreachable for a re-read: the stored event is processed again later.
        if self.request.retries >= self.max_retries:
            log.warning("webhook event still not processed; left for a later sweep",
                        extra={"event_row_id": event_row_id, "error": type(exc).__name__})
            return
        raise self.retry(countdown=retry_countdown(self.request.retries), exc=exc) from None
