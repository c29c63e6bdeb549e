"""Celery tasks: thin. Each takes IDs, calls one billing/ function, and owns nothing else.

The billing functions open their own units of work, contain per-item failures (they log them), and
enqueue follow-up work only after their transactions commit, through the ``enqueue`` callable they
are handed here. That callable is the only place that knows about Celery.
"""

from __future__ import annotations

import contextlib
import logging
import random

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from billing import charging, notifications, reconciler, webhooks
from billing.outcomes import TemporaryStripeError
from workers.celery_app import CHARGE_RETRY_MAX_COUNTDOWN, app

log = logging.getLogger(__name__)

CHARGE_MAX_RETRIES = 10
# The database is out of reach for a moment (a restart, a failover, an exhausted pool, a lock timeout):
# nothing was decided, so the task is tried again like any temporary error. A charge whose task gives up
# is still swept by the reconciler (a pending one, or a processing one once its lease lapses).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def enqueue_charge(charge_id: int) -> None:
    charge_attempt.delay(charge_id)


def enqueue_charges(charge_ids: tuple[int, ...]) -> None:
    """A billing run's batch in one message (``charge_attempts``), fanned out by a worker: one Celery
    publish costs a quarter of a millisecond of CPU, 25 s for a run of 100,000 charges."""
    charge_attempts.delay(list(charge_ids))


# billing.charging.enqueue_all sends a whole batch through this in one call.
enqueue_charge.many = enqueue_charges


def retry_countdown(retries: int) -> float:
    """Exponential backoff with jitter (5 s, 10 s, 20 s, … capped), so retries of many charges that
    failed together (a Stripe outage) do not come back in one wave."""
    base = min(CHARGE_RETRY_MAX_COUNTDOWN, 5 * 2**retries)
    return base / 2 + random.uniform(0, base / 2)


@app.task(ignore_result=True)
def run_billing() -> None:
    report = charging.run_due(enqueue=enqueue_charge)
    log.info("billing run finished", extra={"report": repr(report)})


class RetryingTask(app.Task):
    """The one owner of task retries (warehouse ``warehouse/tasks.py``). A body raises
    :class:`TemporaryStripeError` (Stripe unreachable), :class:`~billing.webhooks.EventDeferred` or
    returns ``"locked"`` (the row is held for a moment); the base class retries with backoff and
    jitter, and after ``max_retries`` logs and leaves the work to the sweeps (reconciler, retry
    sweep, inbox requeue), which find it from the database. The attempt row keeps its idempotency
    key, so a retry resends the same request."""

    abstract = True
    ignore_result = True
    max_retries = CHARGE_MAX_RETRIES
    temporary: tuple[type[Exception], ...] = (TemporaryStripeError, *DATABASE_UNAVAILABLE)

    def __call__(self, *args, **kwargs):
        try:
            result = self.run(*args, **kwargs)
        except self.temporary as exc:
            if self.request.retries >= self.max_retries:
                log.warning("task still failing temporarily; left to the sweeps",
                            extra={"task": self.name, "task_args": list(args), "error": type(exc).__name__})
                return None
            raise self.retry(countdown=retry_countdown(self.request.retries), exc=exc) from None
        if result == "locked" and self.request.retries < self.max_retries:
            raise self.retry(countdown=1 + random.uniform(0, 2))
        return result


@app.task(base=RetryingTask, bind=True)
def charge_attempt(self, charge_id: int) -> str:
    return charging.process_charge(charge_id)


@app.task(ignore_result=True)
def charge_attempts(charge_ids: list[int]) -> None:
    """One ``charge_attempt`` per charge of a batch, so each keeps its own retries and acknowledgement:
    one broker connection, the publishes pipelined where the transport can (kombu's ``Producer.batch``,
    Redis since kombu 5.7). Sent again after a lost worker, it repeats publishes, which a charge
    attempt shrugs off (a charge is claimed once)."""
    with app.producer_or_acquire() as producer:
        pipelined = hasattr(producer, "batch")
        with producer.batch(max_size=max(1, len(charge_ids))) if pipelined else contextlib.nullcontext():
            for charge_id in charge_ids:
                charge_attempt.apply_async((charge_id,), producer=producer)


def enqueue_manual_retry(charge_id: int) -> None:
    retry_charge_now.delay(charge_id)


@app.task(base=RetryingTask, bind=True)
def retry_charge_now(self, charge_id: int) -> str:
    """A staff "retry now": the scheduled run's exactly-once path, before the charge's retry time.
    The request is a row (``charges.retry_requested_at``): a lost or busy run is sent again by the
    retry sweep until an attempt claims the charge."""
    result = charging.process_charge(charge_id, manual=True)
    log.info("manual retry finished", extra={"charge_id": charge_id, "result": result})
    return result


@app.task(ignore_result=True)
def retry_due_charges() -> None:
    charging.retry_due(now=None, enqueue=enqueue_charge, enqueue_manual=enqueue_manual_retry)


@app.task(ignore_result=True)
def reconcile() -> None:
    try:
        report = reconciler.sweep(enqueue=enqueue_charge)
    finally:
        # Webhook events whose processing task was lost or gave up are stored: run them again, even
        # when the charge sweep failed.
        requeued_events = webhooks.requeue_unprocessed(enqueue=enqueue_webhook_event)
    log.info("reconciler sweep finished", extra={"report": repr(report), "requeued_events": len(requeued_events)})


@app.task(ignore_result=True)
def relay_outbox() -> None:
    notifications.relay_due()


WEBHOOK_MAX_RETRIES = 10


def enqueue_webhook_event(event_row_id: int) -> None:
    process_webhook_event.delay(event_row_id)


class WebhookTask(RetryingTask):
    abstract = True
    max_retries = WEBHOOK_MAX_RETRIES
    # Deferred while a charge attempt is in flight (it records the same outcome), or Stripe was
    # unreachable for a re-read: the stored event is processed again later.
    temporary = (webhooks.EventDeferred, TemporaryStripeError, *DATABASE_UNAVAILABLE)


@app.task(base=WebhookTask, bind=True)
def process_webhook_event(self, event_row_id: int) -> None:
    webhooks.process(event_row_id)


@app.task(ignore_result=True)
def backfill_events() -> None:
    """Stripe events whose delivery failed, or newer than the newest stored, through the same inbox
    (billing.backfill). Stripe unreachable: nothing to retry here, the next scheduled run reads them."""
    from billing import backfill
    from billing.outcomes import StripeRequestRefused

    try:
        report = backfill.run(enqueue=enqueue_webhook_event)
    except TemporaryStripeError as exc:
        log.warning("event backfill skipped: Stripe unavailable", extra={"error": str(exc)})
        return
    except StripeRequestRefused as exc:
        # Some Stripe-compatible servers have no event list: nothing to backfill from.
        log.warning("event backfill skipped: the event list was refused", extra={"code": exc.code})
        return
    log.info("event backfill finished", extra={"report": repr(report)})
