"""Leases on charge rows: "someone is working on this charge right now", without holding a connection.

Work on a charge that leaves the database (a charge attempt calling Stripe; the recovery page making
a PaymentIntent) takes the charge's lease first: ``charges.lease_token`` (who) and
``charges.lease_expires_at`` (until when, by the database's clock, the one clock every machine
shares). While the lease is live, a second delivery of the same task leaves (``busy``), staff actions
and the recovery page's return refuse, and webhooks about the charge are deferred. Nothing pins a
connection meanwhile, so concurrency is not capped by the pool, and a pooler in transaction mode
(PgBouncer) cannot silently drop the guard, as it would a session-level advisory lock.

The token is also the **fencing token**: the write that finishes the work only lands if the lease
still carries it (``WHERE lease_token = :token``). A holder that stalled past its lease, and was
taken over, writes nothing. For an attempt the token names it (``<attempt id>.<random>``); the random
part tells two takes of one resumed attempt apart.

**Resume delay: 30 s.** A lease lasts :data:`LEASE_SECONDS` and is renewed every
:data:`RENEW_EVERY` seconds by one background thread per process, in one statement for every lease
the process holds — so a Stripe call may take as long as it takes (the gateway's resends, the rate
limiter's waits) without the lease lapsing under a live worker. A worker killed mid-call stops
renewing, and its attempt is free to resume 30 s after the last renewal; the reconciler's sweep of
stale ``processing`` charges sends it again (it skips charges whose lease is live). 30 s is three
renewals: a process briefly starved of CPU or a database failover does not lose its lease, while a
dead worker's charge waits no longer than it takes the sweep to come round anyway. Taking over a
lease too early costs nothing but a wasted request: the attempt resends the same idempotency key, so
Stripe replays (or refuses as in use) rather than charging again, and fencing keeps the late
holder's outcome out of the books.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
RENEW_EVERY = 10.0



def free_sql(row: str = "") -> str:
    """The one rule for "this lease may be taken by ``:lease_token``", as SQL over the charge row
    (``row``: its alias, if any): nobody holds it, it lapsed, or it is ours already."""
    p = f"{row}." if row else ""
    return f"({p}lease_expires_at IS NULL OR {p}lease_expires_at <= clock_timestamp() OR {p}lease_token = :lease_token)"


FREE_SQL = free_sql()
EXPIRES_SQL = "clock_timestamp() + make_interval(secs => :lease_seconds)"

_TAKE = text(f"""
    UPDATE charges SET lease_token = :lease_token, lease_expires_at = {EXPIRES_SQL}
    WHERE id = :charge_id AND {FREE_SQL} RETURNING id""")
_RELEASE = text("UPDATE charges SET lease_token = NULL, lease_expires_at = NULL "
                "WHERE id = :charge_id AND lease_token = :lease_token")
_HELD = text("SELECT lease_expires_at > clock_timestamp() FROM charges WHERE id = :charge_id")
# SKIP LOCKED: a renewal never waits behind a row held by a long transaction; the next one gets it.
_RENEW = text(f"""
    UPDATE charges SET lease_expires_at = {EXPIRES_SQL}
    WHERE id IN (SELECT id FROM charges WHERE id = ANY(:ids) AND lease_token = ANY(:tokens)
                 FOR UPDATE SKIP LOCKED)""")


def new_token(attempt_id: int | None = None) -> str:
    return f"{attempt_id if attempt_id is not None else 'page'}.{secrets.token_hex(6)}"


def params(token: str) -> dict:
    return {"lease_token": token, "lease_seconds": LEASE_SECONDS}


def held(s: Session, charge_id: int) -> bool:
    """Whether someone holds a live lease on the charge. Call with the charge's row locked in ``s``:
    then no lease can be taken until that transaction ends (taking one writes the row)."""
    return bool(s.execute(_HELD, {"charge_id": charge_id}).scalar())


def _autocommit():
    from billing.db import autocommit_connection

    return autocommit_connection()


def take(charge_id: int, token: str) -> bool:
    with _autocommit() as conn:
        return conn.execute(_TAKE, {"charge_id": charge_id, **params(token)}).first() is not None


def release(charge_id: int, token: str) -> None:
    """Give the lease up (only if it is still ours), so the next try need not wait for it to lapse."""
    with _autocommit() as conn:
        conn.execute(_RELEASE, {"charge_id": charge_id, "lease_token": token})


@contextlib.contextmanager
def hold(charge_id: int) -> Iterator[str | None]:
    """Hold the charge's lease for work outside a transaction (renewed meanwhile); yields the token,
    or ``None`` when someone else holds it. Released on the way out."""
    token = new_token()
    if not take(charge_id, token):
        yield None
        return
    renewer.add(token, charge_id)
    try:
        yield token
    finally:
        renewer.discard(token)
        try:
            release(charge_id, token)
        except Exception:
            # It lapses by itself; a release that failed only makes the next holder wait for that.
            log.warning("could not release a charge lease", exc_info=True, extra={"charge_id": charge_id})


class Renewer:
    """One thread per process renews every lease the process holds, in one statement per round."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, token: str, charge_id: int) -> None:
        with self._lock:
            self._held[token] = charge_id
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="charge-lease-renewer", daemon=True)
                self._thread.start()

    def discard(self, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)

    def renew_now(self) -> int:
        """Renew every held lease; returns how many rows were renewed."""
        with self._lock:
            tokens, ids = list(self._held), list(set(self._held.values()))
        if not tokens:
            return 0
        with _autocommit() as conn:
            return conn.execute(_RENEW, {"ids": ids, "tokens": tokens, "lease_seconds": LEASE_SECONDS}).rowcount

    def _run(self) -> None:
        while not self._wake.wait(RENEW_EVERY):
            try:
                self.renew_now()
            except Exception:
                log.warning("could not renew charge leases", exc_info=True)


renewer = Renewer()
