"""The Celery application: broker, delivery guarantees and the beat schedule, all from Settings.

Configuration is a promise (``add_defaults`` with a callable), read the first time Celery needs it,
so importing this module neither reads the environment nor starts the embedded Redis.

Delivery: every task is safe to run twice (charges are unique per period, Stripe writes carry our
idempotency keys), so messages are acknowledged *after* the task ran (``task_acks_late``): a worker
that dies mid-task leaves its message to be delivered again instead of losing it.

Beat: RedBeat keeps the schedule in Redis and holds a lock there, so any number of ``billing beat``
processes may run (one per machine, for failover) and exactly one of them sends tasks.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from billing.ratelimit import resolve_broker_url
from billing.settings import Settings, get_settings

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

RETRY_DUE_INTERVAL = 60.0
RECONCILE_INTERVAL = 180.0
RELAY_OUTBOX_INTERVAL = 10.0

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
    }


def celery_config(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    broker = resolve_broker_url(settings)
    return {
        "broker_url": broker,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
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
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "beat_max_loop_interval": BEAT_MAX_LOOP_INTERVAL,
        "beat_schedule": beat_schedule(settings),
        "redbeat_redis_url": broker,
        "redbeat_redis_options": {},
        "redbeat_key_prefix": BEAT_KEY_PREFIX,
        "redbeat_lock_key": BEAT_LOCK_KEY,
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT,
    }


app = Celery("billing", include=["workers.tasks"])
app.add_defaults(celery_config)
