"""Heartbeat files: how ``billing worker`` and ``billing beat`` tell a supervisor the truth about themselves.

A process that is alive is not necessarily working: a worker may be reconnecting to a Redis that is still
loading its data, waiting on a PostgreSQL that restarts, or stuck. So each long-running process writes a
small JSON file, replaced atomically every few seconds, saying what it sees:

* ``billing worker`` (a thread, :class:`WorkerHeartbeat`): whether its consumer is connected to the broker
  and its event loop turning, whether Redis answers a PING and PostgreSQL a ``SELECT 1``;
* ``billing beat`` (its scheduler, on every tick): whether Redis answered that tick, and whether this beat
  holds the lock (``active``) or waits for it (``standby``, healthy too).

``billing worker --health`` and ``billing beat --health`` read the files (:func:`probe`): exit 0 when every
running process of that kind is fresh and ``ok``, 1 otherwise, with one line per process naming what is
wrong. A file that stopped changing means a process that is wedged or gone; one whose process id no longer
runs is removed. A dependency being down makes the probe fail until the process has reconnected by itself:
restarting the process would not help, and it does not need it — it reports, it does not exit.

Files live in ``BILLING_DATA_DIR/health/`` (``worker-<pid>.json``, ``beat-<pid>.json``), or at the path given
by ``--health-file`` / ``BILLING_WORKER_HEALTH_FILE`` / ``BILLING_BEAT_HEALTH_FILE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
# The worker's event loop wakes at least every second (BRPOP's timeout); a loop that has not turned for
# this long while connected is stuck.
LOOP_STALL_AFTER = 60.0
# A file older than this is a process that stopped writing: the worker writes every HEARTBEAT_INTERVAL; beat
# on every tick, which is at most its longest backoff (workers.beat.MAX_BACKOFF) apart.
MAX_AGE = {"worker": 30.0, "beat": 75.0}
CHECK_TIMEOUT = 3.0


def health_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "health"


def default_path(kind: str, data_dir: Path, pid: int | None = None) -> Path:
    return health_dir(data_dir) / f"{kind}-{pid or os.getpid()}.json"


def write(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    os.replace(tmp, path)


def remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def outcome(check: Callable[[], Any]) -> str:
    """``ok``, or ``error: <type>`` (the type only: a driver's message may carry a connection string)."""
    try:
        check()
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


# --- the worker's heartbeat ---------------------------------------------------------------------------

class WorkerHeartbeat:
    """A daemon thread writing the worker's heartbeat; the consumer bootstep reports its state here."""

    current: WorkerHeartbeat | None = None

    def __init__(self, path: Path, *, broker_url: str, interval: float = HEARTBEAT_INTERVAL):
        self.path = path
        self.interval = interval
        self.connected = False
        self.loop_at: float | None = None
        self._broker_url = broker_url
        self._redis = None
        self._engine = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="billing-heartbeat", daemon=True)

    def start(self) -> WorkerHeartbeat:
        WorkerHeartbeat.current = self
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        remove(self.path)

    # Called from the consumer's thread (workers.celery_app.HealthStep).
    def consumer_started(self) -> None:
        self.connected = True
        self.loop_at = time.monotonic()

    def consumer_stopped(self) -> None:
        self.connected = False

    def loop_turned(self) -> None:
        self.loop_at = time.monotonic()

    def _ping_redis(self) -> None:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self._broker_url, socket_timeout=CHECK_TIMEOUT,
                                               socket_connect_timeout=CHECK_TIMEOUT)
        self._redis.ping()

    def _ping_database(self) -> None:
        from sqlalchemy import text

        from billing import db
        from billing.settings import get_settings

        if self._engine is None:
            # Its own single connection, so a pool busy with charges never delays (or fakes) the answer.
            self._engine = db.make_engine(db.resolve_database_url(get_settings()), pool_size=1, max_overflow=0,
                                          pool_timeout=CHECK_TIMEOUT,
                                          connect_args={"connect_timeout": int(CHECK_TIMEOUT)})

        def select_one() -> None:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        db.retry_on_disconnect(select_one, tries=2)

    def snapshot(self) -> dict[str, Any]:
        checks = {"broker": outcome(self._ping_redis), "database": outcome(self._ping_database)}
        loop_age = None if self.loop_at is None else round(time.monotonic() - self.loop_at, 1)
        if not self.connected:
            checks["consumer"] = "error: not connected to the broker"
        elif loop_age is not None and loop_age > LOOP_STALL_AFTER:
            checks["consumer"] = f"error: event loop stalled for {loop_age:.0f}s"
        else:
            checks["consumer"] = "ok"
        return {"kind": "worker", "pid": os.getpid(), "at": time.time(), "loop_age": loop_age,
                "status": "ok" if all(v == "ok" for v in checks.values()) else "unavailable", "checks": checks}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                write(self.path, self.snapshot())
            except Exception:
                log.exception("could not write the worker heartbeat", extra={"path": str(self.path)})
            self._stop.wait(self.interval)


# --- reading heartbeats (``--health``) ----------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    path: Path
    healthy: bool
    line: str


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(path: Path, kind: str, *, now: float | None = None, max_age: float | None = None) -> Reading | None:
    """One heartbeat file judged; ``None`` for the file of a process that no longer runs (removed)."""
    now = time.time() if now is None else now
    max_age = MAX_AGE[kind] if max_age is None else max_age
    try:
        beat = json.loads(path.read_text())
    except FileNotFoundError:
        return Reading(path, False, f"{kind}: no heartbeat at {path} (not running, or not started yet)")
    except (OSError, ValueError):
        return Reading(path, False, f"{kind}: unreadable heartbeat at {path}")
    pid = beat.get("pid")
    if not _alive(pid):
        remove(path)
        return None
    age = now - float(beat.get("at") or 0)
    checks = beat.get("checks") or {}
    failing = ", ".join(f"{name} {value}" for name, value in sorted(checks.items()) if value != "ok")
    role = f" ({beat['role']})" if beat.get("role") else ""
    if age > max_age:
        return Reading(path, False, f"{kind} {pid}{role}: heartbeat {age:.0f}s old (stuck?)")
    if beat.get("status") != "ok":
        return Reading(path, False, f"{kind} {pid}{role}: unavailable: {failing or beat.get('status')}")
    return Reading(path, True, f"{kind} {pid}{role}: ok ({age:.0f}s ago)")


def probe(kind: str, *, data_dir: Path, path: Path | None = None,
          max_age: float | None = None) -> tuple[int, list[str]]:
    """The exit status and lines of ``billing <kind> --health``: 0 when at least one ``kind`` process runs
    and every running one is healthy."""
    paths = [path] if path is not None else sorted(health_dir(data_dir).glob(f"{kind}-*.json"))
    readings = [r for r in (read(p, kind, max_age=max_age) for p in paths) if r is not None]
    if not readings:
        return 1, [f"{kind}: no running {kind} has written a heartbeat under {health_dir(data_dir)}"]
    return (0 if all(r.healthy for r in readings) else 1), [r.line for r in readings]
