"""The Redis broker connection: what counts as "Redis is unavailable", and a work-around in kombu's transport.

When Redis goes away under a running worker (a restart, with or without its data), Celery 5.7 closes the
broken connection twice: once while collecting it, and once more before reconnecting. The first close stops
half-way (the blocking read it finishes raises); by the second, the connection has already cut its
transport loose (``transport.client = None``). The channel then restores the messages it had delivered but
not acknowledged (tasks running, and retries waiting on their countdown) and needs a Redis client for it,
built from ``transport.client.hostname``:

    kombu/transport/virtual/base.py  restore_unacked_once -> restore_unacked
    kombu/transport/redis.py         conn_or_acquire -> _create_client -> pool -> _connparams
    AttributeError: 'NoneType' object has no attribute 'hostname'

The AttributeError is not one of the connection errors Celery ignores there, so it is an "Unrecoverable
error" and the worker stops, with status 0 through ``Celery.worker_main`` (which drops the exit code). The
same traceback, from the same cleared transport, is kombu's https://github.com/celery/kombu/issues/970
("Error on Restarting Celery", restore_unacked_once -> conn_or_acquire -> _connparams); the version here
reaches it from the reconnect path instead of a warm shutdown, and no kombu release fixes it yet. Pinning an
older Celery is not a way out: the batched publishes of ``charge_attempts`` need kombu 5.7.

So, patched around, not pinned:

* a channel remembers the connection parameters it was created with, and uses them once its transport is
  gone, so the restore is attempted at all;
* a restore that fails because Redis is still down (it usually is: the connection was lost because Redis
  stopped) keeps the delivery tags, and :func:`restore_deferred` puts those messages back on the queue as
  soon as the worker is connected again. Without it they would wait in Redis's "unacked" hash for the
  visibility timeout (30 minutes) — the lost-ETA-task problem of https://github.com/celery/celery/issues/1307.
  After a restart without data there is nothing left to restore, and the periodic sweeps find the work in
  the database instead.

Re-running a restored message is safe: every task is idempotent (see :mod:`workers.celery_app`).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import redis.exceptions

log = logging.getLogger(__name__)

# What "Redis is unavailable right now" looks like to redis-py: refused or reset connections, timeouts, and
# a Redis that is up but still loading its data set ("BusyLoadingError: Redis is loading the dataset in
# memory"), which is a ConnectionError subclass. Worth waiting out, never a reason to exit.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # BusyLoadingError included
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)

# Socket options for every broker connection: a connect that hangs, or a Redis that vanished without
# closing the socket (a failover, a paused VM), surfaces as an error Celery reconnects from, not as a worker
# blocked on a read forever. Celery's BRPOP waits one second at a time, well inside the timeout. No
# ``retry_on_timeout``: kombu stops pipelining publishes (``Producer.batch``) when redis-py may retry them.
BROKER_SOCKET_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "socket_keepalive": True,
}

_lock = threading.Lock()
_deferred: set[str] = set()
_patched = False


def pending_restores() -> int:
    """How many delivered messages wait to be put back on the queue (for logs and tests)."""
    with _lock:
        return len(_deferred)


def _remember_connparams(original):
    @functools.wraps(original)
    def _connparams(self, asynchronous=False):
        if self.connection.client is None:
            remembered = self.__dict__.get("_billing_connparams", {}).get(asynchronous)
            if remembered is None:
                raise redis.exceptions.ConnectionError("the broker connection is closed")
            return dict(remembered)
        params = original(self, asynchronous=asynchronous)
        self.__dict__.setdefault("_billing_connparams", {})[asynchronous] = dict(params)
        return params

    return _connparams


def _defer_on_failure(original):
    @functools.wraps(original)
    def restore_unacked(self, client=None):
        tags = list(self._delivered)
        try:
            return original(self, client)
        except REDIS_UNAVAILABLE as exc:
            if tags:
                with _lock:
                    _deferred.update(str(tag) for tag in tags)
                log.warning("Redis unavailable while putting delivered messages back; done on reconnect",
                            extra={"messages": len(tags), "error": type(exc).__name__})
            self._delivered.clear()
            return None

    return restore_unacked


def apply_patches() -> None:
    """Patch kombu's Redis transport once per process (idempotent)."""
    global _patched
    if _patched:
        return
    from kombu.transport import redis as kombu_redis

    kombu_redis.Channel._connparams = _remember_connparams(kombu_redis.Channel._connparams)
    kombu_redis.QoS.restore_unacked = _defer_on_failure(kombu_redis.QoS.restore_unacked)
    _patched = True


def restore_deferred(connection) -> int:
    """Put the messages whose restore failed back on their queues, through ``connection`` (a kombu
    connection to the broker). Tags whose message is gone (Redis restarted empty, or another worker's
    sweep restored it) are dropped quietly. Returns how many tags were handled; on a Redis error the
    rest is kept for the next call."""
    with _lock:
        tags = sorted(_deferred)
    if not tags:
        return 0
    from kombu.exceptions import OperationalError

    done = 0
    try:
        qos = connection.default_channel.qos
        for tag in tags:
            qos.restore_by_tag(tag)
            with _lock:
                _deferred.discard(tag)
            done += 1
    except (*REDIS_UNAVAILABLE, OperationalError) as exc:
        log.warning("Redis unavailable while restoring delivered messages; trying again on reconnect",
                    extra={"restored": done, "left": len(tags) - done, "error": type(exc).__name__})
    else:
        log.info("delivered messages put back on the queue after reconnecting", extra={"messages": done})
    return done
