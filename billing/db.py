"""Engine and the unit of work: the one owner of every transaction.

Callers never sprinkle ``commit()``: they open :func:`unit_of_work`, do their reads and writes, and
call ``uow.commit()`` once; leaving the block without it rolls back (cosmicpython's
``service_layer/unit_of_work.py``). Work that must reach the outside world only if the transaction
lands (enqueueing a Celery task) is registered with ``uow.after_commit(fn)`` and runs after the
commit succeeded, never before (warehouse's ``_after_commit_hook``).

Connections: no ping on every checkout (it was a round trip per transaction). A connection idle in
the pool for a while is pinged before use; one that dies under a statement invalidates the pool's
older connections, and the charge path's steps, which are safe to run twice, are sent again on a
fresh one (:func:`retry_on_disconnect`). A worker's pool is sized from its concurrency
(:func:`configure_pool`); the single-statement steps run in autocommit (:func:`autocommit_connection`).
https://docs.sqlalchemy.org/en/20/core/pooling.html#dealing-with-disconnects
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from billing.settings import Settings, get_settings

log = logging.getLogger(__name__)


def resolve_database_url(settings: Settings) -> str:
    """The configured URL, else the embedded PostgreSQL under the data dir (started on first use)."""
    if settings.database_url:
        url = settings.database_url
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url
    from billing import embedded

    return embedded.database_url(settings.data_dir)


# A connection back in the pool for longer than this is pinged before it is handed out again; one
# reused sooner is trusted (a dead one fails its first statement, which invalidates the whole pool and
# is retried: :func:`retry_on_disconnect`). Under load connections come back within milliseconds, so
# the hot path pays no ping; after a quiet spell, or a database restart, one ping per connection.
IDLE_PING_AFTER = 10.0
# Connections are replaced after this long, before a server's or proxy's idle limits cut them.
POOL_RECYCLE = 1800
# The web app and the CLI: room for a server's threadpool (40 threads by default) at one or two each.
DEFAULT_POOL = (10, 50)
_pool_for: tuple[int, int] | None = None


def pool_for_concurrency(concurrency: int) -> tuple[int, int]:
    """(pool_size, max_overflow) for a worker running ``concurrency`` tasks at once.

    A charge task holds one connection at a time, and none across its Stripe call; a webhook task
    holds two (its per-object lock and a transaction); the lease renewer one. So ``concurrency + 1``
    connections are kept and as many again may open for webhook bursts."""
    return concurrency + 1, concurrency + 1


def configure_pool(concurrency: int) -> None:
    """Size this process's pool for its concurrency (``billing worker`` calls it before any engine exists)."""
    global _pool_for
    _pool_for = pool_for_concurrency(concurrency)
    reset_engine()


def make_engine(url: str, **kwargs) -> Engine:
    # hide_parameters: a database error's text (printed by tracebacks and log.exception) would otherwise
    # quote the bound values, a customer's email or name among them.
    kwargs.setdefault("hide_parameters", True)
    size, overflow = _pool_for or DEFAULT_POOL
    kwargs.setdefault("pool_size", size)
    kwargs.setdefault("max_overflow", overflow)
    engine = create_engine(url, pool_pre_ping=False, pool_recycle=POOL_RECYCLE, pool_use_lifo=True, **kwargs)

    @event.listens_for(engine, "connect")
    def _set_timeouts(dbapi_conn, _record):
        # A stuck lock must surface as an error, not hang a worker thread forever.
        with dbapi_conn.cursor() as cur:
            cur.execute("SET lock_timeout = '10s'; SET idle_in_transaction_session_timeout = '60s'")
        dbapi_conn.commit()

    @event.listens_for(engine, "checkin")
    def _note_checkin(_dbapi_conn, record):
        if record is not None:
            record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy):
        idle_since = record.info.get("checked_in")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_AFTER:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool drops this connection and hands out another (a fresh one if need be).
            raise DisconnectionError("pooled connection was dropped") from exc

    return engine


@functools.cache
def get_engine() -> Engine:
    return make_engine(resolve_database_url(get_settings()))


@functools.cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def reset_engine() -> None:
    """Forget the cached engine (tests and forked worker processes)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    _session_factory.cache_clear()


T = TypeVar("T")


def is_disconnect(exc: BaseException) -> bool:
    """The database connection was lost (server restart, failover, network): SQLAlchemy has already
    invalidated the pool's older connections, so trying again gets a fresh one."""
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_on_disconnect(fn: Callable[[], T], *, tries: int = 3) -> T:
    """Run ``fn`` (a whole transaction, or one statement in autocommit, that is safe to run again)
    and run it again when the connection drops under it."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except DBAPIError as exc:
            if not is_disconnect(exc) or attempt == tries:
                raise
            log.warning("database connection lost; trying again", extra={"try": attempt})
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def autocommit_connection() -> Iterator[Connection]:
    """A pooled connection in autocommit: each statement is its own transaction, with no BEGIN or
    COMMIT sent, for the single-statement steps of the charge path."""
    with get_engine().connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


class UnitOfWork:
    def __init__(self, session: Session):
        self.session = session
        self._after_commit: list[Callable[[], None]] = []
        self.committed = False

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after_commit.append(fn)

    def commit(self) -> None:
        self.session.commit()
        self.committed = True
        hooks, self._after_commit = self._after_commit, []
        for fn in hooks:
            # The transaction has landed; a failing hook must not pretend otherwise. Whatever it
            # was meant to start is picked up again by the periodic sweeps.
            try:
                fn()
            except Exception:
                log.exception("after-commit hook failed", extra={"hook": getattr(fn, "__name__", repr(fn))})


@contextlib.contextmanager
def unit_of_work(factory: sessionmaker[Session] | None = None) -> Iterator[UnitOfWork]:
    session = (factory or _session_factory())()
    uow = UnitOfWork(session)
    try:
        yield uow
    finally:
        # close() ends any transaction not committed (rolled back as the connection goes back to the
        # pool) and detaches the objects without expiring them, so what a block read stays readable.
        session.close()
