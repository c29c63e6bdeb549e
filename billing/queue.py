"""The retry queue as finance staff read it: every charge that is owed and not collected.

``paid`` is never in it. ``void`` (written off: nothing is owed any more) is left out unless asked for
by the status filter; ``uncollectible`` stays in, since that money is still owed even though the
retries have given up; so does ``needs_review`` (Stripe refused the request itself: staff decide), which
has no scheduled retry and so sorts after the charges that have one. Soonest retry first by default.

One query serves the console's page, its CSV export and ``billing queue``. It runs in two steps so a
page costs the same with ten rows or a million: (1) the page's charge ids, read in the order of one
of the ``ix_charges_queue_*`` partial indexes (every query repeats their ``status <> 'paid'``
predicate so the planner can use them) with the filters applied; (2) the display columns of just
those ids, joined to customers, cards, the newest email and the newest recovery-page visit.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from billing import cards, money
from billing.db import unit_of_work
from billing.dunning import explain_decline, explain_refusal
from billing.models import Charge, ChargeStatus, Customer, Notification, PaymentMethod, RecoveryToken, Subscription
from billing.text import CONTROL_MESSAGE, has_control_characters

NOT_IN_QUEUE = (ChargeStatus.paid, ChargeStatus.void)
QUEUE_STATUSES = tuple(s.value for s in ChargeStatus if s != ChargeStatus.paid)

# Sort keys → column. Each has a partial index (column, id) on the open charges.
SORTS = {
    "next_retry": Charge.next_retry_at,
    "created": Charge.created_at,
    "amount": Charge.amount,
    "attempts": Charge.attempts,
}
MAX_PAGE_SIZE = 500


class QueueFilterError(ValueError):
    """A filter value that makes no sense (unknown status, malformed date, …)."""


@dataclass(frozen=True)
class QueueFilter:
    status: str | None = None
    decline_code: str | None = None
    country: str | None = None
    # Charges opened on or after ``date_from`` and on or before ``date_to`` (whole UTC days).
    date_from: date | None = None
    date_to: date | None = None
    sort: str = "next_retry"
    descending: bool = False

    @classmethod
    def parse(cls, *, status: str | None = None, decline_code: str | None = None, country: str | None = None,
              date_from: str | date | None = None, date_to: str | date | None = None, sort: str | None = None,
              direction: str | None = None) -> QueueFilter:
        """From form fields or CLI flags: blank means "any"; anything else is checked."""
        given = {"status": status, "decline_code": decline_code, "country": country, "from": date_from,
                 "to": date_to, "sort": sort, "direction": direction}
        for name, value in given.items():
            # NUL would reach PostgreSQL (which refuses it in text) and CR/LF the page: refused, named.
            if isinstance(value, str) and has_control_characters(value):
                raise QueueFilterError(f"{name} {CONTROL_MESSAGE}")
        status = (status or "").strip() or None
        if status is not None and status not in QUEUE_STATUSES:
            raise QueueFilterError(f"status must be one of {', '.join(QUEUE_STATUSES)}")
        country = (country or "").strip().upper() or None
        if country is not None and (len(country) != 2 or not country.isalpha()):
            raise QueueFilterError("country must be a two-letter ISO code, e.g. DE")
        sort = (sort or "").strip() or "next_retry"
        if sort not in SORTS:
            raise QueueFilterError(f"sort must be one of {', '.join(SORTS)}")
        direction = (direction or "").strip() or "asc"
        if direction not in ("asc", "desc"):
            raise QueueFilterError("direction must be asc or desc")
        return cls(status=status, decline_code=(decline_code or "").strip() or None, country=country,
                   date_from=_date(date_from, "from"), date_to=_date(date_to, "to"), sort=sort,
                   descending=direction == "desc")

    def as_params(self) -> dict[str, str]:
        """The filter as query-string fields (for links: pages, sort headers, CSV)."""
        params = {"status": self.status, "decline_code": self.decline_code, "country": self.country,
                  "date_from": self.date_from.isoformat() if self.date_from else None,
                  "date_to": self.date_to.isoformat() if self.date_to else None,
                  "sort": self.sort if self.sort != "next_retry" else None,
                  "direction": "desc" if self.descending else None}
        return {k: v for k, v in params.items() if v}


def _date(value: str | date | None, name: str) -> date | None:
    if value is None or isinstance(value, date):
        return value
    value = value.strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise QueueFilterError(f"date {name} must look like 2025-01-31") from None


@dataclass(frozen=True)
class QueueRow:
    charge_id: int
    subscription_id: int
    customer_email: str
    amount: int
    currency: str
    status: str
    attempts: int
    last_error_code: str | None
    last_decline_code: str | None
    next_retry_at: datetime | None
    retry_paused: bool
    notified_at: datetime | None
    customer_name: str = ""
    explanation: str | None = None
    last_emailed_at: datetime | None = None
    recovery_opened_at: datetime | None = None
    card_country: str | None = None
    previous_authorization: bool = False
    created_at: datetime | None = None
    subscription_status: str | None = None

    def as_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data

    @property
    def error(self) -> str:
        return "/".join(x for x in (self.last_error_code, self.last_decline_code) if x) or "-"

    def as_cells(self) -> tuple[str, ...]:
        retry = "paused" if self.retry_paused else _when(self.next_retry_at)
        return (str(self.charge_id), self.customer_email, format_amount(self.amount, self.currency),
                self.currency.upper(), self.status, str(self.attempts), self.error, retry, _when(self.notified_at),
                _when(self.recovery_opened_at), self.card_country or "-", "yes" if self.previous_authorization else "")


CSV_COLUMNS = [f.name for f in fields(QueueRow)]


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


# Kept for code that imported it from here; the facts live in billing.money.
ZERO_DECIMAL = money.ZERO_DECIMAL_CURRENCIES


def format_amount(amount: int | Decimal, currency: str) -> str:
    """The amount as a bare number for a column (``1234.56``, ``1500``, ``1.230``): the currency has its own."""
    return money.format_amount(amount, currency, style="plain")




def _where(query: Select, flt: QueueFilter) -> Select:
    # Repeated literally so the partial indexes (WHERE status <> 'paid') qualify.
    query = query.where(Charge.status != ChargeStatus.paid.value)
    if flt.status:
        query = query.where(Charge.status == flt.status)
    else:
        query = query.where(Charge.status != ChargeStatus.void.value)
    if flt.decline_code:
        # Declines without a decline code (authentication_required, no card) are named by their error code.
        query = query.where(or_(Charge.last_decline_code == flt.decline_code,
                                and_(Charge.last_decline_code.is_(None), Charge.last_error_code == flt.decline_code)))
    if flt.date_from:
        query = query.where(Charge.created_at >= datetime.combine(flt.date_from, time(), UTC))
    if flt.date_to:
        query = query.where(Charge.created_at < datetime.combine(flt.date_to + timedelta(days=1), time(), UTC))
    if flt.country:
        card = PaymentMethod.__table__.alias("card")
        query = (query.join(Subscription, Subscription.id == Charge.subscription_id)
                 .join(Customer, Customer.id == Subscription.customer_id)
                 .join(card, card.c.id == cards.card_on_file_sql())
                 .where(card.c.country == flt.country))
    return query


def _ordered(query: Select, flt: QueueFilter) -> Select:
    column = SORTS[flt.sort]
    if flt.descending:
        return query.order_by(column.desc().nulls_first(), Charge.id.desc())
    return query.order_by(column.asc().nulls_last(), Charge.id.asc())


@dataclass
class QueuePage:
    rows: list[QueueRow]
    total: int
    page: int
    page_size: int
    filter: QueueFilter = field(default_factory=QueueFilter)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def count(session: Session, flt: QueueFilter) -> int:
    return session.scalar(_where(select(func.count()).select_from(Charge), flt)) or 0


def page_ids(session: Session, flt: QueueFilter, *, limit: int, offset: int = 0) -> list[int]:
    query = _ordered(_where(select(Charge.id), flt), flt).limit(limit).offset(offset)
    return list(session.scalars(query))


def rows_for(session: Session, charge_ids: list[int]) -> list[QueueRow]:
    """Display rows for ``charge_ids``, in that order."""
    if not charge_ids:
        return []
    card = PaymentMethod.__table__.alias("card")
    last_email = (select(func.max(Notification.sent_at)).where(Notification.charge_id == Charge.id)
                  .scalar_subquery())
    opened = (select(func.max(RecoveryToken.opened_at)).where(RecoveryToken.charge_id == Charge.id)
              .scalar_subquery())
    query = (
        select(Charge.id, Charge.subscription_id, Customer.email, Charge.amount, Charge.currency, Charge.status,
               Charge.attempts, Charge.last_error_code, Charge.last_decline_code, Charge.next_retry_at,
               Charge.retry_paused, Charge.notified_at, Customer.name, Charge.last_advice_code, last_email, opened,
               card.c.country, card.c.previous_authorization, Charge.created_at, Subscription.status)
        .join(Subscription, Subscription.id == Charge.subscription_id)
        .join(Customer, Customer.id == Subscription.customer_id)
        .outerjoin(card, card.c.id == cards.card_on_file_sql())
        .where(Charge.id.in_(charge_ids))
    )
    by_id = {}
    for (cid, sub_id, email, amount, currency, status, attempts, error, decline, next_retry, paused, notified, name,
         advice, emailed, opened_at, country, prev_auth, created, sub_status) in session.execute(query):
        if status == ChargeStatus.needs_review:
            explanation = explain_refusal(error)
        else:
            explanation = explain_decline(decline, advice, error) if (error or decline or advice) else None
        by_id[cid] = QueueRow(cid, sub_id, email, amount, currency, status, attempts, error, decline, next_retry,
                              paused, notified, name, explanation, emailed, opened_at, country, bool(prev_auth),
                              created, sub_status)
    return [by_id[cid] for cid in charge_ids if cid in by_id]


def page(session: Session, flt: QueueFilter, *, page: int = 1, page_size: int = 50) -> QueuePage:
    page_size = max(1, min(page_size, MAX_PAGE_SIZE))
    total = count(session, flt)
    last = max(1, -(-total // page_size))
    page = max(1, min(page, last))
    ids = page_ids(session, flt, limit=page_size, offset=(page - 1) * page_size)
    return QueuePage(rows_for(session, ids), total, page, page_size, flt)


def iter_rows(session: Session, flt: QueueFilter, *, chunk: int = 1000, limit: int | None = None) -> Iterator[QueueRow]:
    """Every row under ``flt`` in order, read a chunk at a time (CSV export, ``billing queue``)."""
    offset = 0
    while True:
        size = chunk if limit is None else min(chunk, limit - offset)
        if size <= 0:
            return
        ids = page_ids(session, flt, limit=size, offset=offset)
        yield from rows_for(session, ids)
        if len(ids) < size:
            return
        offset += len(ids)


def _cell(value) -> str:
    if value is None:
        return ""
    text = str(value)
    # A customer-typed name starting with = + - @ (or a tab or CR before one) would run as a formula in a
    # spreadsheet (OWASP "CSV Injection").
    return "'" + text if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(rows: Iterator[QueueRow]) -> Iterator[str]:
    """CSV text, header first, a chunk of lines at a time (amounts in minor units, times in ISO 8601)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for n, row in enumerate(rows, start=1):
        data = row.as_json()
        writer.writerow([_cell(data[c]) for c in CSV_COLUMNS])
        if n % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def unpaid_charges(session: Session | None = None, limit: int = 1000,
                   flt: QueueFilter | None = None) -> list[QueueRow]:
    flt = flt or QueueFilter()
    if session is not None:
        return list(iter_rows(session, flt, limit=limit))
    with unit_of_work() as uow:
        return list(iter_rows(uow.session, flt, limit=limit))

