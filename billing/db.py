"""Engine and the unit of work: the one owner of every transaction.

Callers never sprinkle ``commit()``: they open :func:`unit_of_work`, do their reads and writes, and
call ``uow.commit()`` once; leaving the block without it rolls back (cosmicpython's
``service_layer/unit_of_work.py``). Work that must reach the outside world only if the transaction
lands (enqueueing a Celery task) is registered with ``uow.after_commit(fn)`` and runs after the
commit succeeded, never before (warehouse's ``_after_commit_hook``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

from sqlalchemy import Engine, create_engine, event
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


def make_engine(url: str, **kwargs) -> Engine:
    # A charge task holds two connections (its in-flight lock and a transaction), a webhook task up to
    # three: room for a worker's default 16 threads at once without waiting on the pool.
    # hide_parameters: a database error's text (printed by tracebacks and log.exception) would otherwise
    # quote the bound values, a customer's email or name among them.
    kwargs.setdefault("hide_parameters", True)
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=50, **kwargs)

    @event.listens_for(engine, "connect")
    def _set_timeouts(dbapi_conn, _record):
        # A stuck lock must surface as an error, not hang a worker thread forever.
        with dbapi_conn.cursor() as cur:
            cur.execute("SET lock_timeout = '10s'; SET idle_in_transaction_session_timeout = '60s'")
        dbapi_conn.commit()

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
