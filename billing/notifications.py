"""Customer emails through an outbox: rows written with the outcome, relayed to SMTP after commit.

The charging code calls :func:`enqueue` (or :func:`enqueue_decision`) in the transaction that records
a charge outcome, so an email exists exactly when the outcome does, and the dedupe key (unique in
``notifications``) makes a redelivered task write it once. :func:`relay_due` sends due rows later,
one row per transaction:

1. lock one due row with ``FOR UPDATE SKIP LOCKED`` (concurrent relays take different rows);
2. issue a fresh recovery token for it (the raw token lives only in the outgoing email), render it;
3. hand it to SMTP, with a ``Message-ID`` derived from the dedupe key;
4. mark it sent, set ``charges.notified_at`` on the first email, commit.

A crash between 3 and 4 sends the email again on the next run, with the same ``Message-ID``, which
is as close to exactly-once as SMTP allows. If SMTP fails, the token is rolled back to a savepoint,
the row stays pending with ``tries``, ``last_error`` and a later ``send_after`` (exponential
backoff), and the run stops if the server is unreachable; nothing is lost.

The outbox holds display data only (amount, period, merchant, last four digits, the decline in plain
words): never a token, link or secret. Logs carry notification and charge ids, never the address,
token or link.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Any
from urllib.parse import unquote, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from billing import recovery
from billing.db import unit_of_work
from billing.dunning import LINK_KINDS, Decision, NotificationKind, explain_decline
from billing.models import (
    Charge,
    ChargeStatus,
    Customer,
    Notification,
    NotificationStatus,
    PaymentMethod,
    RecoveryToken,
    Subscription,
)
from billing.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Reminders only make sense while the charge still waits for the customer.
_WAITING = frozenset({ChargeStatus.authentication_required.value, ChargeStatus.requires_payment_method.value})
# Context keys that smell of a secret are refused: the outbox is readable by anyone with the database.
_FORBIDDEN_CONTEXT_WORDS = ("token", "secret", "link", "url", "password")

BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=1)
# Below the database's idle-in-transaction timeout (60 s): the row lock is held while SMTP talks.
SMTP_TIMEOUT_SECONDS = 15.0

SUBJECTS: dict[NotificationKind, str] = {
    NotificationKind.authentication_required: "Action needed: authenticate your payment to {{ merchant_name }}",
    NotificationKind.payment_failed: "Your payment to {{ merchant_name }} failed: please update your card",
    NotificationKind.reminder: "Reminder: your payment to {{ merchant_name }} is still outstanding",
    NotificationKind.final_notice: "Final notice: your {{ merchant_name }} subscription is unpaid",
    NotificationKind.payment_succeeded: "Payment received: thank you",
}


# ---------------------------------------------------------------------------------------------- money

# Currencies Stripe counts in whole units (amount 1500 JPY is ¥1,500), and those with three decimals:
# https://docs.stripe.com/currencies#zero-decimal and #three-decimal.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}


def format_amount(amount: int, currency: str) -> str:
    """Minor units → what a customer reads: ``$12.34``, ``€5.00``, ``¥1,500``, ``12.345 KWD``."""
    code = currency.lower()
    places = 0 if code in ZERO_DECIMAL_CURRENCIES else 3 if code in THREE_DECIMAL_CURRENCIES else 2
    number = f"{amount / 10 ** places:,.{places}f}" if places else f"{amount:,d}"
    symbol = _SYMBOLS.get(code)
    return f"{symbol}{number}" if symbol else f"{number} {code.upper()}"


# ------------------------------------------------------------------------------------------ templates

_env = Environment(
    loader=PackageLoader("billing", "templates/email"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_env.filters["money"] = format_amount


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def render(kind: NotificationKind | str, context: Mapping[str, Any], *, link: str | None = None,
           **extra: Any) -> RenderedEmail:
    """Text + HTML for one email. ``link`` is passed separately because it never rests in the outbox."""
    kind = NotificationKind(kind)
    values = {"customer_name": "", "merchant_name": get_settings().merchant_name, "last4": None, "card_brand": None,
              "decline_explanation": None, "period_start": None, "period_end": None, "charge_status": None,
              "subscription_status": None, **context, **extra, "link": link}
    subject = _env.from_string(SUBJECTS[kind]).render(values)
    return RenderedEmail(subject=" ".join(subject.split()),
                         text=_env.get_template(f"{kind.value}.txt.j2").render(values),
                         html=_env.get_template(f"{kind.value}.html.j2").render(values))


# --------------------------------------------------------------------------------------------- enqueue

def failure_key(charge_id: int, attempt_number: int, kind: NotificationKind | str) -> str:
    """One email per failure event: the event is (charge, attempt)."""
    return f"charge-{charge_id}:attempt-{attempt_number}:{NotificationKind(kind).value}"


def reminder_key(charge_id: int, index: int) -> str:
    """One set of reminders per charge, however often it starts waiting on the customer."""
    return f"charge-{charge_id}:reminder-{index}"


def final_notice_key(charge_id: int) -> str:
    return f"charge-{charge_id}:final_notice"


def display_context(session: Session, charge: Charge, customer: Customer,
                    settings: Settings | None = None) -> dict[str, Any]:
    """What an email about ``charge`` shows, from the rows as they are now."""
    settings = settings or get_settings()
    ctx: dict[str, Any] = {
        "customer_name": customer.name,
        "merchant_name": settings.merchant_name,
        "amount": charge.amount,
        "currency": charge.currency,
        "period_start": charge.period_start.date().isoformat(),
        "period_end": charge.period_end.date().isoformat(),
    }
    subscription = session.get(Subscription, charge.subscription_id)
    pm_id = subscription.payment_method_id if subscription is not None else None
    pm = session.get(PaymentMethod, pm_id) if pm_id is not None else None
    if pm is not None:
        ctx.update(card_brand=pm.brand, last4=pm.last4)
    # The decline in plain words is added when the email is sent, from the charge's codes then: the
    # outcome's codes may not be on the charge yet when this runs.
    return ctx


def _check_context(context: Mapping[str, Any]) -> None:
    for key in context:
        if any(word in key.lower() for word in _FORBIDDEN_CONTEXT_WORDS):
            raise ValueError(f"notification context may not hold {key!r}: links are made at send time")


def enqueue(session: Session, *, kind: NotificationKind | str, charge: Charge, customer: Customer, dedupe_key: str,
            send_after: datetime | None = None, context: Mapping[str, Any] | None = None) -> bool:
    """Write one outbox row in the caller's transaction; ``False`` if ``dedupe_key`` was already written.

    ``INSERT … ON CONFLICT (dedupe_key) DO NOTHING``: a redelivered task or a concurrent worker
    deciding the same event writes nothing and does not abort the transaction. ``context`` adds to
    (and overrides) :func:`display_context`; display data only.
    """
    kind = NotificationKind(kind)
    ctx = display_context(session, charge, customer)
    if context:
        _check_context(context)
        ctx.update(context)
    values: dict[str, Any] = {
        "dedupe_key": dedupe_key, "kind": kind.value, "customer_id": customer.id, "charge_id": charge.id,
        "to_email": customer.email, "context": ctx, "status": NotificationStatus.pending.value, "tries": 0,
    }
    if send_after is not None:
        values["send_after"] = send_after
    stmt = (pg_insert(Notification).values(**values)
            .on_conflict_do_nothing(index_elements=[Notification.dedupe_key]).returning(Notification.id))
    notification_id = session.execute(stmt).scalar_one_or_none()
    if notification_id is not None:
        log.info("notification enqueued", extra={"notification_id": notification_id, "charge_id": charge.id,
                                                  "kind": kind.value})
    return notification_id is not None


def drop_pending_reminders(session: Session, charge_id: int,
                           kinds: Iterable[NotificationKind] = (NotificationKind.reminder,)) -> int:
    """The charge is settled: reminders not yet sent are dropped (kept as rows for the record)."""
    result = session.execute(
        update(Notification)
        .where(Notification.charge_id == charge_id, Notification.status == NotificationStatus.pending.value,
               Notification.kind.in_([NotificationKind(k).value for k in kinds]))
        .values(status=NotificationStatus.dropped.value).execution_options(synchronize_session=False))
    return result.rowcount or 0


def enqueue_decision(session: Session, decision: Decision, *, charge: Charge, customer: Customer,
                     attempt_number: int, context: Mapping[str, Any] | None = None) -> int:
    """Write the emails a dunning decision asks for, with the standard dedupe keys; returns rows written.

    A paid charge drops its pending reminders instead.
    """
    written = 0
    if decision.charge_status is ChargeStatus.paid and decision.first_failed_at is not None:
        drop_pending_reminders(session, charge.id)
    if decision.notify is not None:
        key = (final_notice_key(charge.id) if decision.notify is NotificationKind.final_notice
               else failure_key(charge.id, attempt_number, decision.notify))
        written += enqueue(session, kind=decision.notify, charge=charge, customer=customer, dedupe_key=key,
                           context=context)
    for index, at in enumerate(decision.reminders, start=1):
        written += enqueue(session, kind=NotificationKind.reminder, charge=charge, customer=customer,
                           dedupe_key=reminder_key(charge.id, index), send_after=at, context=context)
    if decision.give_up:
        drop_pending_reminders(session, charge.id)
    return written


# ----------------------------------------------------------------------------------------------- relay

@dataclass(frozen=True)
class RelayResult:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


class _ServerUnavailable(Exception):
    """SMTP could not be reached or dropped the connection: stop this run, try again later."""


class _Mailer:
    """One SMTP connection per relay run, opened on first use."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("SMTP URL must look like smtp://host:port")
        self._ssl = parts.scheme == "smtps"
        self._host = parts.hostname
        self._port = parts.port or (465 if self._ssl else 25)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        cls = smtplib.SMTP_SSL if self._ssl else smtplib.SMTP
        try:
            smtp = cls(self._host, self._port, timeout=SMTP_TIMEOUT_SECONDS)
            if self._user:
                smtp.login(self._user, self._password or "")
        except (OSError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected) as exc:
            raise _ServerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return smtp

    def send(self, message: EmailMessage) -> None:
        reused = self._smtp is not None
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            self._smtp.send_message(message)
        except smtplib.SMTPServerDisconnected as exc:
            self.close()
            if not reused:
                raise _ServerUnavailable(f"{type(exc).__name__}: {exc}") from exc
            # An idle connection the server closed: one fresh connection, then give up for this run.
            self._smtp = self._connect()
            try:
                self._smtp.send_message(message)
            except smtplib.SMTPServerDisconnected as exc2:
                self.close()
                raise _ServerUnavailable(f"{type(exc2).__name__}: {exc2}") from exc2
        except OSError as exc:
            self.close()
            raise _ServerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


def message_id(dedupe_key: str, mail_from: str) -> str:
    """Stable per outbox row, so a resend after a crash is recognisable as the same email."""
    domain = mail_from.rsplit("@", 1)[-1].strip("<> ") or "localhost"
    return f"<{hashlib.sha256(dedupe_key.encode()).hexdigest()[:40]}@{domain}>"


def build_message(row: Notification, customer: Customer | None, email: RenderedEmail, *, settings: Settings,
                  now: datetime) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = email.subject
    msg["From"] = formataddr((settings.merchant_name, settings.mail_from))
    msg["To"] = formataddr((customer.name if customer else "", row.to_email))
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(row.dedupe_key, settings.mail_from)
    # RFC 3834: tells mail servers not to answer with vacation replies.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(email.text)
    msg.add_alternative(email.html, subtype="html")
    return msg


def _backoff(tries: int) -> timedelta:
    return min(BACKOFF_BASE * 2 ** max(tries - 1, 0), BACKOFF_CAP)


def _mark_sent(session: Session, row: Notification, charge: Charge | None, now: datetime) -> None:
    row.status = NotificationStatus.sent.value
    row.sent_at = now
    row.tries += 1
    row.last_error = None
    if charge is not None:
        session.execute(update(Charge).where(Charge.id == charge.id, Charge.notified_at.is_(None))
                        .values(notified_at=now).execution_options(synchronize_session=False))


def _render_time_context(row: Notification, charge: Charge | None,
                         subscription: Subscription | None) -> dict[str, Any]:
    """What is only known when the email goes out: where the charge stands now."""
    extra: dict[str, Any] = {"charge_status": charge.status if charge else None,
                             "subscription_status": subscription.status if subscription else None}
    context = row.context or {}
    # A caller-supplied explanation wins; otherwise the charge's latest codes explain it.
    if "decline_explanation" not in context and charge is not None and (
            charge.last_decline_code or charge.last_error_code or charge.last_advice_code):
        extra["decline_explanation"] = explain_decline(charge.last_decline_code, charge.last_advice_code,
                                                       charge.last_error_code)
    return extra


# While a row's email is being handed to SMTP (outside any transaction) the row is not due for this
# long, so no other relay picks it up; if the relay dies mid-send, the row comes due again after it.
SEND_LEASE = timedelta(minutes=10)


def _relay_one(factory: sessionmaker[Session] | None, mailer: _Mailer, settings: Settings,
               now: datetime) -> str | None:
    """Send the next due row: "sent", "dropped", "failed" or None (none due). Raises
    :class:`_ServerUnavailable` after recording the failure when SMTP cannot be reached.

    Three steps, so no transaction stays open while SMTP talks (ARCHITECTURE practice 4): claim the
    row, issue its link and render the email (committed, with the row leased); send; record.
    """
    claimed = _claim_and_render(factory, settings, now)
    if claimed is None or isinstance(claimed, str):
        return claimed
    row_id, token_id, message, ids = claimed
    try:
        mailer.send(message)
    except Exception as exc:
        _record_failure(factory, row_id, token_id, exc, now)
        log.warning("notification not sent, will retry", extra={**ids, "error": type(exc).__name__},
                    exc_info=not isinstance(exc, _ServerUnavailable | smtplib.SMTPException))
        if isinstance(exc, _ServerUnavailable):
            raise
        return "failed"
    with unit_of_work(factory) as uow:
        row = uow.session.get(Notification, row_id, with_for_update=True)
        charge = uow.session.get(Charge, row.charge_id) if row.charge_id is not None else None
        _mark_sent(uow.session, row, charge, now)
        uow.commit()
    log.info("notification sent", extra=ids)
    return "sent"


def _claim_and_render(factory, settings: Settings, now: datetime):
    with unit_of_work(factory) as uow:
        session = uow.session
        row = session.scalars(
            select(Notification)
            .where(Notification.status == NotificationStatus.pending.value, Notification.send_after <= now)
            .order_by(Notification.send_after, Notification.id).limit(1).with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return None
        ids = {"notification_id": row.id, "charge_id": row.charge_id, "kind": row.kind}
        charge = session.get(Charge, row.charge_id) if row.charge_id is not None else None
        if row.kind == NotificationKind.reminder and (charge is None or charge.status not in _WAITING):
            row.status = NotificationStatus.dropped.value
            uow.commit()
            log.info("reminder dropped: charge no longer waiting", extra=ids)
            return "dropped"
        customer = session.get(Customer, row.customer_id)
        subscription = session.get(Subscription, charge.subscription_id) if charge is not None else None
        link = token_id = None
        if row.kind in LINK_KINDS and charge is not None:
            token = recovery.issue_token(session, customer_id=row.customer_id,
                                         purpose=recovery.Purpose.recover, charge_id=charge.id, now=now)
            token_id = session.scalars(select(RecoveryToken.id).where(
                RecoveryToken.token_hash == recovery.hash_token(token))).one()
            link = recovery.link(token, recovery.Purpose.recover)
        extra = _render_time_context(row, charge, subscription)
        email = render(row.kind, row.context or {}, link=link, **extra)
        message = build_message(row, customer, email, settings=settings, now=now)
        row.send_after = now + SEND_LEASE
        uow.commit()
        return row.id, token_id, message, ids


def _record_failure(factory, row_id: int, token_id: int | None, exc: Exception, now: datetime) -> None:
    """The email did not go out: neither does its link (the token is deleted); retry with backoff."""
    with unit_of_work(factory) as uow:
        row = uow.session.get(Notification, row_id, with_for_update=True)
        row.tries += 1
        row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
        row.send_after = now + _backoff(row.tries)
        if token_id is not None:
            uow.session.execute(delete(RecoveryToken).where(RecoveryToken.id == token_id))
        uow.commit()


def relay_due(*, now: datetime | None = None, limit: int = 100, smtp_url: str | None = None,
              session_factory: sessionmaker[Session] | None = None,
              clock: Callable[[], datetime] | None = None) -> RelayResult:
    """Send up to ``limit`` due outbox rows, one per transaction (the body of the ``relay_outbox`` task).

    ``now`` pins the clock (tests, ``--now``); otherwise each row is stamped with the current time.
    """
    settings = get_settings()
    mailer = _Mailer(smtp_url or settings.smtp_url)
    clock = clock or (lambda: datetime.now(UTC))
    counts = {"sent": 0, "failed": 0, "dropped": 0}
    try:
        for _ in range(limit):
            try:
                result = _relay_one(session_factory, mailer, settings, now or clock())
            except _ServerUnavailable:
                counts["failed"] += 1
                log.warning("SMTP server unavailable; relay stops until the next run")
                break
            except Exception:
                # A database error: the row (if any) stays pending; the next run picks it up.
                counts["failed"] += 1
                log.exception("outbox relay failed")
                break
            if result is None:
                break
            counts[result] += 1
    finally:
        mailer.close()
    return RelayResult(**counts)
