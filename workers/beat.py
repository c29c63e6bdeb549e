"""The beat scheduler: RedBeat, made to wait out Redis outages instead of dying in them.

RedBeat (celery-redbeat) keeps the schedule and a lock in Redis, so any number of ``billing beat`` processes
run and one sends tasks. Out of the box, a Redis restart kills every one of them: the lock is extended at
the top of each tick, and while Redis reloads its data it answers ``BusyLoadingError: Redis is loading the
dataset in memory`` (a refused connection before that); the error leaves ``tick``, beat's loop ends and the
process exits 1 — "two beats for failover" both die on the same restart. After a restart *without* data the
lock and the schedule are gone too: the extend raises ``LockNotOwnedError``, and a beat that survived would
find nothing to send.

:class:`BillingScheduler` changes only that:

* any tick that meets an unavailable Redis (:data:`workers.broker.REDIS_UNAVAILABLE`) is skipped and the
  next one comes after an exponential backoff with jitter (0.5 s doubling to :data:`MAX_BACKOFF`); the
  first success logs that Redis is back;
* a beat whose lock is gone (Redis lost it, or it expired during a long outage and another beat took it)
  becomes a standby again instead of exiting; the lock is taken without blocking, on every tick, so a
  standby keeps ticking (and writing its heartbeat, :mod:`workers.health`) — RedBeat's blocking
  acquisition at start-up is switched off;
* whoever holds the lock re-installs the static schedule when Redis no longer has it (an empty restart);
  ``last_run_at`` of the entries that survived is kept, as RedBeat's own start-up does;
* closing with Redis unreachable leaves the lock to expire (``redbeat_lock_timeout``) instead of raising.

Anything else (a bug, a bad schedule) still ends beat with a non-zero status, for the supervisor to see.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

from celery.signals import beat_init
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatScheduler, acquire_distributed_beat_lock, get_redis
from redis.exceptions import LockError

from workers import health
from workers.broker import REDIS_UNAVAILABLE

log = logging.getLogger("workers.beat")

MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.5

# The lock is taken on the first tick and by standbys on every tick, never by blocking at start-up (a beat
# blocked there would neither tick nor write its heartbeat).
beat_init.disconnect(acquire_distributed_beat_lock)

# ``billing beat`` sets this to the heartbeat file; None: no heartbeat (tests that build a scheduler).
heartbeat_path: Path | None = None


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` consecutive failures: doubling, capped, jittered (so
    many beats do not hammer a Redis that is loading its data in lockstep)."""
    base = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, failures - 1))
    return base / 2 + random.uniform(0, base / 2)


class BillingScheduler(RedBeatScheduler):
    def __init__(self, app, **kwargs):
        self._failures = 0
        self._schedule_installed = False
        super().__init__(app, **kwargs)

    # --- the schedule ---------------------------------------------------------------------------------

    def setup_schedule(self):
        """At construction: with Redis unavailable, the schedule is installed by the first tick that
        reaches it instead of failing beat's start."""
        try:
            self._install_schedule()
        except REDIS_UNAVAILABLE as exc:
            log.warning("beat: Redis unavailable at start; the schedule is installed once it answers",
                        extra={"error": type(exc).__name__})

    def _install_schedule(self) -> None:
        super().setup_schedule()
        self._schedule_installed = True

    def _ensure_schedule(self) -> None:
        conf = self.app.redbeat_conf
        if not self._schedule_installed or not get_redis(self.app).exists(conf.statics_key):
            if self._schedule_installed:
                log.warning("beat: the schedule is gone from Redis (restarted without its data); installing it")
            self._install_schedule()

    # --- the lock -------------------------------------------------------------------------------------

    def _try_acquire(self) -> bool:
        """RedBeat's lock, as ``acquire_distributed_beat_lock`` makes it, taken without blocking."""
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # RedBeat's extend sets the TTL to lock_timeout rather than adding to it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            return False
        log.info("beat: Acquired lock")
        self.lock = lock
        return True

    @property
    def active(self) -> bool:
        return not self.lock_key or self.lock is not None

    # --- ticking --------------------------------------------------------------------------------------

    def tick(self, min=min, **kwargs):
        error = None
        try:
            interval = self._tick(min=min, **kwargs)
        except REDIS_UNAVAILABLE as exc:
            error = exc
            interval = self._redis_unavailable(exc)
        except LockError as exc:
            # Not ours any more: Redis restarted without it, or it expired while Redis was out of reach
            # and another beat holds it now. Stand by and try for it on the next tick.
            log.warning("beat: lost the lock; standing by until it is free", extra={"error": type(exc).__name__})
            self.lock = None
            interval = FIRST_BACKOFF
        else:
            if self._failures:
                log.info("beat: Redis answers again", extra={"failed_ticks": self._failures})
            self._failures = 0
        self._write_heartbeat(error)
        return interval

    def _tick(self, min=min, **kwargs):
        if self.lock_key and self.lock is None and not self._try_acquire():
            return self.max_interval  # standby: someone else sends the tasks
        self._ensure_schedule()
        return super().tick(min=min, **kwargs)

    def _redis_unavailable(self, exc: Exception) -> float:
        self._failures += 1
        delay = backoff(self._failures)
        log.warning("beat: Redis unavailable; trying again in %.1fs", delay,
                    extra={"error": type(exc).__name__, "failed_ticks": self._failures})
        return delay

    def _write_heartbeat(self, error: Exception | None) -> None:
        if heartbeat_path is None:
            return
        redis_state = "ok" if error is None else f"error: {type(error).__name__}"
        payload = {"kind": "beat", "pid": os.getpid(), "at": time.time(),
                   "role": "active" if self.active else "standby",
                   "status": "ok" if error is None else "unavailable", "checks": {"redis": redis_state}}
        try:
            health.write(heartbeat_path, payload)
        except OSError:
            log.exception("could not write the beat heartbeat", extra={"path": str(heartbeat_path)})

    def close(self):
        try:
            super().close()
        except (*REDIS_UNAVAILABLE, LockError) as exc:
            # The lock expires by itself within redbeat_lock_timeout; a standby takes over then.
            log.warning("beat: could not release the lock; it expires by itself",
                        extra={"error": type(exc).__name__})
            self.lock = None
        health.remove(heartbeat_path)
