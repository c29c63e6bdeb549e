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
is as close to exactly-once as SMTP allows.

Failures are contained per row (ARCHITECTURE practice 8). A row that cannot be rendered, built (an
address a header cannot hold safely) or accepted by the server stays ``pending`` with ``tries``,
``last_error`` (stage, error class and SMTP code only) and a later ``send_after`` (exponential
backoff); after :data:`MAX_TRIES` it is ``dead``, at once if the server refused the mailbox for good
(5.1.x / 5.2.x). Its link is deleted with it, and the run goes on with the next row. An outage is not
a row's failure: when the server cannot be reached the run stops and the row goes back untouched, so
a night without SMTP costs no email a try. Names are display text, cleaned of control characters
before they reach a header; addresses are refused, never repaired.

At send time an email that is no longer true is dropped (:func:`still_true`: one table of the
charge statuses each kind is about), so a delayed "payment failed" never reaches a customer who has
paid meanwhile.

The outbox holds display data only (amount, period, merchant, last four digits, the decline in plain
words): never a token, link or secret. Logs carry notification and charge ids, never the address,
token or link.
"""

from __future__ import annotations

import hashlib
import logging
import re
import smtplib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email import message_from_bytes
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from billing import metrics, money, recovery, state, templating
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
from billing.text import has_control_characters, is_control

log = logging.getLogger(__name__)

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

# Currency facts live in billing.money; these names stay for code that imported them from here.
ZERO_DECIMAL_CURRENCIES = money.ZERO_DECIMAL_CURRENCIES
THREE_DECIMAL_CURRENCIES = money.THREE_DECIMAL_CURRENCIES


def format_amount(amount: int | Decimal, currency: str) -> str:
    """Minor units → what a customer reads: ``$12.34``, ``€5.00``, ``¥1,500``, ``12.345 KWD``."""
    return money.format_amount(amount, currency)


# ------------------------------------------------------------------------------------------ templates
# One environment for every page and email (billing.templating): the HTML parts are escaped, the
# text parts and the subject are not.

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
    subject = templating.text_from_string(SUBJECTS[kind]).render(values)
    return RenderedEmail(subject=" ".join(subject.split()),
                         text=templating.render(f"email/{kind.value}.txt.j2", values),
                         html=templating.render(f"email/{kind.value}.html.j2", values))


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
    # Not sent this run because of an error, to be tried again (the row a run stopped on included).
    failed: int = 0
    dropped: int = 0
    # Given up this run: refused for good by the server, or out of tries.
    dead: int = 0


# After this many failed tries a row is given up (``dead``). With the backoff below that is about two
# hours of trying: long enough for a mail server's bad afternoon, short enough to be seen the same day.
MAX_TRIES = 8

# While a row's email is being handed to SMTP (outside any transaction) the row is not due for this
# long, so no other relay picks it up; if the relay dies mid-send, the row comes due again after it.
SEND_LEASE = timedelta(minutes=10)

# The one rule for "is this email still true?": the charge statuses in which an email of each kind
# still describes its charge when its time comes. An email about a charge that has moved on (paid,
# written off, held for staff) is dropped then, whatever its kind. A failure's email still goes out
# while a retry is in flight: that retry's own failure is not emailed again.
_WAITING = frozenset(s.value for s in state.WAITING_ON_CUSTOMER)
_IN_FLIGHT = frozenset(s.value for s in state.IN_FLIGHT)
STILL_TRUE: dict[str, frozenset[str]] = {
    NotificationKind.authentication_required.value: _WAITING | _IN_FLIGHT,
    NotificationKind.payment_failed.value: _WAITING | _IN_FLIGHT,
    NotificationKind.reminder.value: _WAITING,
    NotificationKind.final_notice.value: frozenset({ChargeStatus.uncollectible.value}),
    NotificationKind.payment_succeeded.value: frozenset({ChargeStatus.paid.value}),
}


# Held for staff (a request Stripe refused): an email to the customer is neither true nor false yet —
# staff may void the charge, or retry it into a decline the customer must hear about — so it waits.
HOLD_WHILE = frozenset({ChargeStatus.needs_review.value})
HOLD_RECHECK = timedelta(hours=1)


def held(kind: str, charge: Charge | None) -> bool:
    """Whether an email of ``kind`` waits (neither sent nor dropped) while its charge is held for staff."""
    return charge is not None and str(kind) in STILL_TRUE and charge.status in HOLD_WHILE


def release_held(session: Session, charge_id: int, now: datetime) -> int:
    """The charge waits on the customer again: its failure emails held during a staff review are due
    now (reminders keep their own schedule). Returns how many were released."""
    kinds = [NotificationKind.payment_failed.value, NotificationKind.authentication_required.value]
    result = session.execute(
        update(Notification).where(Notification.charge_id == charge_id,
                                   Notification.status == NotificationStatus.pending.value,
                                   Notification.kind.in_(kinds), Notification.send_after > now)
        .values(send_after=now).execution_options(synchronize_session=False))
    return result.rowcount or 0


def still_true(kind: str, charge: Charge | None) -> bool:
    """Whether an email of ``kind`` still describes ``charge`` (kinds not about a charge always do)."""
    statuses = STILL_TRUE.get(str(kind))
    return statuses is None or (charge is not None and charge.status in statuses)


class _ServerUnavailable(Exception):
    """Not this row's fault: the server cannot be reached, closes on us (421) or refuses our sender.

    The run stops. ``mid_message``: the connection died while this row's message was on it, so the row
    is charged one try (a message that kills the connection every time must not block the line
    forever); otherwise the row is released untouched, and an outage costs no row a try.
    """

    def __init__(self, reason: str, *, mid_message: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.mid_message = mid_message


class Unsendable(ValueError):
    """This row's email cannot be built safely (an address with control characters, …). The message is
    fixed text: it ends up in ``last_error`` and logs, which never carry an address or a name."""


_ENHANCED = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")


def _code(exc: BaseException) -> str:
    """``SMTPDataError 451 4.3.0`` from an exception: its class and SMTP codes, never its text."""
    code, text = getattr(exc, "smtp_code", None), getattr(exc, "smtp_error", b"")
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code, text = next(iter(exc.recipients.values()))
    enhanced = _ENHANCED.match(text.decode("ascii", "replace") if isinstance(text, bytes) else str(text or ""))
    return " ".join(str(p) for p in (type(exc).__name__, code, enhanced and enhanced.group(1)) if p)


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
        except (OSError, smtplib.SMTPException) as exc:
            raise _ServerUnavailable(_code(exc)) from exc
        return smtp

    def send(self, message: EmailMessage) -> None:
        """Hand ``message`` over; raises :class:`_ServerUnavailable` for what is not the message's fault
        and lets every other SMTP error (refused recipient, refused data, …) through."""
        reused = self._smtp is not None
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            self._send_once(message)
        except _ServerUnavailable as exc:
            if not (reused and isinstance(exc.__cause__, smtplib.SMTPServerDisconnected)):
                raise
            # An idle connection the server closed: one fresh connection, then give up for this run.
            self._smtp = self._connect()
            self._send_once(message)

    def _send_once(self, message: EmailMessage) -> None:
        # smtplib's exceptions are OSErrors too: the SMTP answers are told apart first.
        try:
            self._smtp.send_message(message)
        except smtplib.SMTPSenderRefused as exc:
            # MAIL FROM refused: our sender (BILLING_MAIL_FROM) or the server, the same for every row.
            self.close()
            raise _ServerUnavailable(_code(exc)) from exc
        except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as exc:
            codes = ([c for c, _ in exc.recipients.values()] if isinstance(exc, smtplib.SMTPRecipientsRefused)
                     else [exc.smtp_code])
            if 421 in codes:  # "service not available, closing transmission channel" (RFC 5321 4.2.3)
                self.close()
                raise _ServerUnavailable(_code(exc)) from exc
            raise
        except smtplib.SMTPServerDisconnected as exc:
            self.close()
            raise _ServerUnavailable(_code(exc), mid_message=True) from exc
        except smtplib.SMTPException:
            # Something this message needs that the server lacks (SMTPUTF8, …): the row's failure.
            self.close()
            raise
        except OSError as exc:  # reset, timeout: the connection died with this message on it
            self.close()
            raise _ServerUnavailable(_code(exc), mid_message=True) from exc
        except Exception:
            # Anything else (a message the generator cannot take) leaves the conversation in an unknown
            # state: the next message gets a fresh connection.
            self.close()
            raise

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


def header_text(value: str | None) -> str:
    """A display name or subject fit for a header: control characters become spaces and whitespace
    runs one space, so nothing a customer typed can end a header line and start another. A name is
    display text, so the email still goes out (to the right address) rather than failing."""
    return " ".join("".join(" " if is_control(c) else c for c in value or "").split())


# RFC 5322 "specials" in a display name make the header's folding drop the quotes that protect them
# (Python 3.11: a long "Bob <x@evil>, Eve …" comes out as two mailboxes), and "=?" starts an RFC 2047
# encoded-word that the header machinery decodes — CR LF included — on the way out. A display name is
# only decoration, so these are taken out of it rather than trusted to quoting.
_NAME_SPECIALS = frozenset('"<>,;:@\\()[]')


def display_name(value: str | None) -> str:
    """A customer's or merchant's name as a header display name: header text without RFC 5322
    specials or encoded-word openers, so it can only ever be one phrase before one address."""
    text = header_text(value).replace("=?", "= ?")
    return " ".join("".join(" " if c in _NAME_SPECIALS else c for c in text).split())


def mailbox(display_name_: str | None, addr_spec: str) -> Address:
    """A header-safe mailbox, or :class:`Unsendable`. The address is never repaired (which address
    did somebody mean by ``a@b.example\\r\\nBcc: …``?): one with control characters or spaces, or one
    the RFC 5322 parser (``email.headerregistry.Address``) does not take whole, is refused."""
    if not addr_spec or has_control_characters(addr_spec) or any(c.isspace() for c in addr_spec):
        raise Unsendable("the address has control characters or spaces")
    try:
        address = Address(display_name=display_name(display_name_), addr_spec=addr_spec)
    except Exception:  # the parser's errors quote the address
        raise Unsendable("the address is not a valid email address") from None
    if not address.username or not address.domain:
        raise Unsendable("the address is not a valid email address")
    return address


def build_message(row: Notification, customer: Customer | None, email: RenderedEmail, *, settings: Settings,
                  now: datetime, sender: Address | None = None) -> EmailMessage:
    """The email for ``row``; :class:`Unsendable` if its address cannot be put in a header safely.

    Headers go through ``email.policy.default``, which refuses CR and LF in any header value.
    """
    msg = EmailMessage(policy=email_policy.default)
    msg["Subject"] = header_text(email.subject)
    msg["From"] = sender or mailbox(settings.merchant_name, settings.mail_from)
    msg["To"] = mailbox(customer.name if customer else "", row.to_email)
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(row.dedupe_key, settings.mail_from)
    # RFC 3834: tells mail servers not to answer with vacation replies.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(email.text)
    msg.add_alternative(email.html, subtype="html")
    _check_headers(msg, row.to_email)
    return msg


def _check_headers(msg: EmailMessage, to_email: str) -> None:
    """Read the serialised message back as a mail server would: exactly our headers, and one ``To``
    mailbox that is the row's address. Anything else (a header the email package's folding or
    decoding let a name inject) makes the row unsendable instead of sent."""
    parsed = message_from_bytes(msg.as_bytes(), policy=email_policy.default)
    names = [name.lower() for name in parsed.keys()]
    if sorted(names) != sorted(_HEADER_NAMES):
        raise Unsendable("the message's headers did not survive serialisation")
    recipients = getaddresses([str(parsed["To"])])
    if len(recipients) != 1 or recipients[0][1].lower() != to_email.lower():
        raise Unsendable("the message's recipient did not survive serialisation")


_HEADER_NAMES = ("subject", "from", "to", "date", "message-id", "auto-submitted", "content-type", "mime-version")


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


# ------------------------------------------------------------------------------------- per-row failure

@dataclass(frozen=True)
class _Failure:
    """Why a row was not sent. ``reason`` goes to ``last_error`` and logs: a stage, an error class and
    SMTP codes, never an address, a name or the server's free text (which often quotes the address)."""

    stage: str  # render | build | smtp
    reason: str
    permanent: bool = False

    @classmethod
    def of(cls, stage: str, exc: BaseException) -> _Failure:
        detail = str(exc) if isinstance(exc, Unsendable) else _code(exc)
        return cls(stage, f"{stage}: {detail}"[:1000], permanent=_is_permanent(exc))


def _is_permanent(exc: BaseException) -> bool:
    """The server refused the recipient's mailbox for good: asking again will not change that.

    RFC 5321 4.2.1: a 5xx is a "permanent negative completion"; RFC 3463 says which are about the
    address: enhanced codes 5.1.x (bad mailbox, bad domain) and 5.2.x (mailbox disabled). Other 5xx
    at RCPT, such as 5.7.1 "relay access denied", usually mean the server's configuration, which is
    the same for every row: those back off like a temporary failure instead of killing every email.
    Without an enhanced code, 550, 551 and 553 count as the mailbox's.
    """
    if not isinstance(exc, smtplib.SMTPRecipientsRefused):
        return False
    for code, text in exc.recipients.values():
        enhanced = _ENHANCED.match(text.decode("ascii", "replace") if isinstance(text, bytes) else str(text))
        if enhanced:
            if enhanced.group(1).startswith(("5.1.", "5.2.")):
                return True
        elif code in (550, 551, 553):
            return True
    return False


def _fail(row: Notification, failure: _Failure, now: datetime) -> str:
    """One more failed try on ``row`` (locked by the caller): back off, or give up. Returns the outcome."""
    row.tries += 1
    row.last_error = failure.reason
    if failure.permanent or row.tries >= MAX_TRIES:
        row.status = NotificationStatus.dead.value
        row.send_after = now  # when it was given up, for the console's timeline
        return "dead"
    row.send_after = now + _backoff(row.tries)
    return "failed"


def _observe_failure(failure: _Failure, outcome: str, ids: Mapping[str, Any]) -> None:
    result = "retry" if outcome == "failed" else "dead"
    metrics.OUTBOX_FAILURES.labels(stage=failure.stage, result=result).inc()
    log.log(logging.WARNING if result == "retry" else logging.ERROR,
            "notification not sent, will retry" if result == "retry" else "notification given up",
            extra={**ids, "error": failure.reason})


@dataclass(frozen=True)
class _Claimed:
    row_id: int
    token_id: int | None
    message: EmailMessage
    ids: dict[str, Any]
    # The row's send time before the lease, given back if the run stops through no fault of the row.
    send_after: datetime


def _claim_and_render(factory, settings: Settings, sender: Address, now: datetime) -> _Claimed | str | None:
    """Lock the next due row; drop it if no longer true; else issue its link, render and build it.

    Rendering and building run in a savepoint: if they fail (a template error, an unsafe address), the
    link is rolled back and the row is failed right here, in the same transaction, and the relay goes
    on with the next row.
    """
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
        if held(row.kind, charge):
            row.send_after = now + HOLD_RECHECK  # no try used: nothing is wrong with the email
            uow.commit()
            return "held"
        if not still_true(row.kind, charge):
            row.status = NotificationStatus.dropped.value
            uow.commit()
            log.info("notification dropped: its charge has moved on",
                     extra={**ids, "charge_status": charge.status if charge else None})
            return "dropped"
        stage = "render"
        try:
            with session.begin_nested():
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
                stage = "build"
                message = build_message(row, customer, email, settings=settings, now=now, sender=sender)
        except Exception as exc:  # contained per row: one bad row never stops the others
            failure = _Failure.of(stage, exc)
            outcome = _fail(row, failure, now)
            uow.commit()
            _observe_failure(failure, outcome, ids)
            return outcome
        original_send_after = row.send_after
        row.send_after = now + SEND_LEASE
        uow.commit()
        return _Claimed(row.id, token_id, message, ids, original_send_after)


def _record_failure(factory, claimed: _Claimed, failure: _Failure, now: datetime) -> str:
    """The email did not go out: neither does its link (the token is deleted); back off or give up."""
    with unit_of_work(factory) as uow:
        row = uow.session.get(Notification, claimed.row_id, with_for_update=True)
        outcome = _fail(row, failure, now)
        if claimed.token_id is not None:
            uow.session.execute(delete(RecoveryToken).where(RecoveryToken.id == claimed.token_id))
        uow.commit()
    _observe_failure(failure, outcome, claimed.ids)
    return outcome


def _release(factory, claimed: _Claimed) -> None:
    """The server is away: the row goes back as it was (no try counted), its link is deleted."""
    with unit_of_work(factory) as uow:
        row = uow.session.get(Notification, claimed.row_id, with_for_update=True)
        row.send_after = claimed.send_after
        if claimed.token_id is not None:
            uow.session.execute(delete(RecoveryToken).where(RecoveryToken.id == claimed.token_id))
        uow.commit()


def _relay_one(factory: sessionmaker[Session] | None, mailer: _Mailer, settings: Settings, sender: Address,
               now: datetime) -> str | None:
    """Send the next due row: "sent", "dropped", "held", "failed", "dead" or None (none due). Raises
    :class:`_ServerUnavailable` after putting the row back (or charging it a try, if it was mid-message).

    Three steps, so no transaction stays open while SMTP talks (ARCHITECTURE practice 4): claim the
    row, issue its link and render the email (committed, with the row leased); send; record.
    """
    claimed = _claim_and_render(factory, settings, sender, now)
    if claimed is None or isinstance(claimed, str):
        return claimed
    try:
        mailer.send(claimed.message)
    except _ServerUnavailable as exc:
        if exc.mid_message:
            _record_failure(factory, claimed, _Failure("smtp", f"smtp: {exc.reason}"), now)
        else:
            _release(factory, claimed)
        raise
    except Exception as exc:  # the server refused this message: the row's own failure
        return _record_failure(factory, claimed, _Failure.of("smtp", exc), now)
    with unit_of_work(factory) as uow:
        row = uow.session.get(Notification, claimed.row_id, with_for_update=True)
        charge = uow.session.get(Charge, row.charge_id) if row.charge_id is not None else None
        _mark_sent(uow.session, row, charge, now)
        uow.commit()
    log.info("notification sent", extra=claimed.ids)
    return "sent"


def dead_count(session: Session) -> int:
    """Emails given up, for the console (on the partial index ``ix_notifications_dead``)."""
    return session.scalar(select(func.count()).select_from(Notification)
                          .where(Notification.status == NotificationStatus.dead.value)) or 0


def relay_due(*, now: datetime | None = None, limit: int = 100, smtp_url: str | None = None,
              session_factory: sessionmaker[Session] | None = None,
              clock: Callable[[], datetime] | None = None) -> RelayResult:
    """Send up to ``limit`` due outbox rows, one per transaction (the body of the ``relay_outbox`` task).

    Each row is tried on its own: one that cannot be rendered, built or accepted is failed (or given
    up) and the run goes on with the next; the run stops early only when the server is away. ``now``
    pins the clock (tests, ``--now``); otherwise each row is stamped with the current time.
    """
    settings = get_settings()
    try:
        sender = mailbox(settings.merchant_name, settings.mail_from)
    except Unsendable:
        # Every email would fail the same way: nothing is tried, nothing is charged a try.
        log.error("BILLING_MAIL_FROM is not a valid email address; no email is sent until it is fixed")
        return RelayResult()
    mailer = _Mailer(smtp_url or settings.smtp_url)
    clock = clock or (lambda: datetime.now(UTC))
    counts = {"sent": 0, "failed": 0, "dropped": 0, "dead": 0}
    try:
        for _ in range(limit):
            try:
                result = _relay_one(session_factory, mailer, settings, sender, now or clock())
            except _ServerUnavailable as exc:
                counts["failed"] += 1
                metrics.OUTBOX_SERVER_UNAVAILABLE.inc()
                log.warning("SMTP server unavailable; relay stops until the next run", extra={"error": exc.reason})
                break
            except Exception:
                # A database error: the row (if any) stays pending; the next run picks it up.
                counts["failed"] += 1
                log.exception("outbox relay failed")
                break
            if result is None:
                break
            if result != "held":
                counts[result] += 1
    finally:
        mailer.close()
    return RelayResult(**counts)
