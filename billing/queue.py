"""The retry queue as finance staff read it: every charge that is owed and not collected.

``paid`` and ``void`` (nothing is owed any more) are left out; ``uncollectible`` stays in, since that
money is still owed even though the retries have given up. Soonest retry first, then oldest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import unit_of_work
from billing.models import Charge, ChargeStatus, Customer, Subscription

NOT_IN_QUEUE = (ChargeStatus.paid, ChargeStatus.void)


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

    def as_json(self) -> dict:
        data = asdict(self)
        for key in ("next_retry_at", "notified_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data

    def as_cells(self) -> tuple[str, ...]:
        error = "/".join(x for x in (self.last_error_code, self.last_decline_code) if x) or "-"
        retry = "paused" if self.retry_paused else _when(self.next_retry_at)
        return (str(self.charge_id), self.customer_email, format_amount(self.amount, self.currency),
                self.currency.upper(), self.status, str(self.attempts), error, retry, _when(self.notified_at))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


# ISO 4217 currencies without a minor unit (Stripe's zero-decimal list).
ZERO_DECIMAL = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
                "xaf", "xof", "xpf"}


def format_amount(amount: int, currency: str) -> str:
    if currency.lower() in ZERO_DECIMAL:
        return str(amount)
    return f"{amount / 100:.2f}"


def unpaid_charges(session: Session | None = None, limit: int = 1000) -> list[QueueRow]:
    query = (
        select(Charge.id, Charge.subscription_id, Customer.email, Charge.amount, Charge.currency, Charge.status,
               Charge.attempts, Charge.last_error_code, Charge.last_decline_code, Charge.next_retry_at,
               Charge.retry_paused, Charge.notified_at)
        .join(Subscription, Subscription.id == Charge.subscription_id)
        .join(Customer, Customer.id == Subscription.customer_id)
        .where(Charge.status.not_in([s.value for s in NOT_IN_QUEUE]))
        .order_by(Charge.next_retry_at.asc().nulls_last(), Charge.created_at, Charge.id)
        .limit(limit)
    )
    if session is not None:
        return [QueueRow(*row) for row in session.execute(query).all()]
    with unit_of_work() as uow:
        return [QueueRow(*row) for row in uow.session.execute(query).all()]
