"""The Celery application: broker, delivery guarantees and the beat schedule, all from Settings.

Configuration is a promise (``add_defaults`` with a callable), read the first time Celery needs it,
so importing this module neither reads the environment nor starts the embedded Redis.

Delivery: every task is safe to run twice (charges are unique per period, Stripe writes carry our
idempotency keys), so messages are acknowledged *after* the task ran (``task_acks_late``): a worker
that dies mid-task leaves its message to be delivered again instead of losing it.

Beat: RedBeat keeps the schedule in Redis and holds a lock there, so any number of ``billing beat``
processes may run (one per machine, for failover) and exactly one of them sends tasks
(:mod:`workers.beat`, which also waits out Redis outages instead of exiting).

Dependencies restarting: the worker reconnects to Redis forever, with Celery's growing back-off
(``broker_connection_max_retries=None``), and puts the messages it held back on the queue once it is
connected again (:mod:`workers.broker`, which also works around a kombu defect that made the worker exit on
a Redis restart). A PostgreSQL restart fails the tasks that were using it with a temporary database error,
which :class:`workers.tasks.RetryingTask` retries. What the processes see is in their heartbeat files
(:mod:`workers.health`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from billing.ratelimit import resolve_broker_url
from billing.settings import Settings, get_settings
from workers import broker as broker_patches
from workers import health

broker_patches.apply_patches()

# Redis has no real acknowledgements: a delivered message sits in an "unacked" hash and is put back
# on the queue when it has not been acknowledged within the visibility timeout. That timeout has to
# exceed the longest a message can legitimately stay unacknowledged, or a healthy worker's task is
# handed to a second worker while the first still runs:
#   - a charge_attempt run: a few Stripe calls of up to stripe_timeout_seconds each, plus the
#     gateway's own retries and rate-limiter waits (minutes at most);
#   - a retry scheduled with a countdown (Redis counts an ETA message as unacked while it waits):
#     CHARGE_RETRY_MAX_COUNTDOWN below.
# Twice the sum of those, rounded up to 30 minutes, leaves a margin. The price is that a message held
# by a SIGKILLed worker comes back only after 30 minutes; the reconciler's sweep finds charges stuck in
# pending/processing well before that, so nothing waits on redelivery alone.
CHARGE_RETRY_MAX_COUNTDOWN = 300
VISIBILITY_TIMEOUT = 30 * 60

# The lock is extended on every beat tick, and a tick happens at least every BEAT_MAX_LOOP_INTERVAL;
# a beat that died without releasing it is replaced by a standby once it expires.
BEAT_MAX_LOOP_INTERVAL = 5
BEAT_LOCK_TIMEOUT = 30
BEAT_KEY_PREFIX = "billing:beat"
BEAT_LOCK_KEY = f"{BEAT_KEY_PREFIX}:lock"
BEAT_SCHEDULER = "workers.beat:BillingScheduler"

RETRY_DUE_INTERVAL = 60.0
RECONCILE_INTERVAL = 180.0
RELAY_OUTBOX_INTERVAL = 10.0
# Stripe events whose delivery failed, or newer than the newest we stored (billing.backfill).
BACKFILL_EVENTS_INTERVAL = 300.0

TASK_QUEUE = "billing"


def _periodic(task: str, every: float) -> dict[str, Any]:
    # A run that could not be delivered within its own interval is superseded by the next one; without
    # an expiry a worker coming back after an outage would work through a backlog of identical runs.
    return {"task": task, "schedule": every, "options": {"expires": every}}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        "run-billing": _periodic("workers.tasks.run_billing", settings.billing_run_interval_seconds),
        "retry-due-charges": _periodic("workers.tasks.retry_due_charges", RETRY_DUE_INTERVAL),
        "reconcile": _periodic("workers.tasks.reconcile", RECONCILE_INTERVAL),
        "relay-outbox": _periodic("workers.tasks.relay_outbox", RELAY_OUTBOX_INTERVAL),
        "backfill-events": _periodic("workers.tasks.backfill_events", BACKFILL_EVENTS_INTERVAL),
    }


def celery_config(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    broker = resolve_broker_url(settings)
    return {
        "broker_url": broker,
        "broker_connection_retry_on_startup": True,
        # A Redis restart, however long, is waited out (Celery backs off between tries); the worker never
        # gives up and exits because a dependency is down.
        "broker_connection_max_retries": None,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT, **broker_patches.BROKER_SOCKET_OPTIONS},
        # Nothing reads task results: progress lives in the database (charges, attempts, outbox).
        "result_backend": None,
        "task_ignore_result": True,
        # No results are stored, so beat needs no daily celery.backend_cleanup entry.
        "result_expires": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "timezone": "UTC",
        "enable_utc": True,
        "task_default_queue": TASK_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A worker reserves one message per free thread, not four: a message prefetched by a busy
        # worker is a charge nobody else may start, and is lost to redelivery if that worker dies.
        "worker_prefetch_multiplier": 1,
        # Charging waits on Stripe and PostgreSQL, not on the CPU: threads are cheap and share one
        # connection pool. ``billing worker`` passes the pool explicitly too.
        "worker_pool": "threads",
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
        "beat_scheduler": BEAT_SCHEDULER,
        "beat_max_loop_interval": BEAT_MAX_LOOP_INTERVAL,
        "beat_schedule": beat_schedule(settings),
        "redbeat_redis_url": broker,
        # Bounded waits on the beat's own Redis client: a hung Redis is an error beat backs off from.
        "redbeat_redis_options": {"socket_timeout": 10, "socket_connect_timeout": 5},
        "redbeat_key_prefix": BEAT_KEY_PREFIX,
        "redbeat_lock_key": BEAT_LOCK_KEY,
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT,
    }


class ConsumerHealth(bootsteps.StartStopStep):
    """Runs each time the worker's consumer has (re)connected to the broker, and when it loses it: puts back
    the messages whose restore failed while Redis was down, and tells the heartbeat (workers.health)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self._timer = None

    def start(self, c):
        try:
            broker_patches.restore_deferred(c.connection)
        except Exception:
            logging.getLogger(__name__).exception("could not put delivered messages back on the queue")
        beat = health.WorkerHeartbeat.current
        if beat is not None:
            beat.consumer_started()
            # Turns with the event loop: a heartbeat whose loop stops turning is a stuck worker.
            self._timer = c.timer.call_repeatedly(1.0, beat.loop_turned)

    def stop(self, c):
        beat = health.WorkerHeartbeat.current
        if beat is not None:
            beat.consumer_stopped()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    shutdown = stop


app = Celery("billing", include=["workers.tasks"])
app.add_defaults(celery_config)
app.steps["consumer"].add(ConsumerHealth)
