"""ORM tables. Money is integer minor units; times are timezone-aware UTC.

Statuses are ``str`` enums spelled as SPEC.md spells them (Stripe's words where they mean the same),
stored as text with a CHECK constraint so a typo can never reach the database.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SubscriptionStatus(enum.StrEnum):
    active = "active"
    past_due = "past_due"
    unpaid = "unpaid"
    canceled = "canceled"


class ChargeStatus(enum.StrEnum):
    pending = "pending"
    processing = "processing"
    paid = "paid"
    authentication_required = "authentication_required"
    requires_payment_method = "requires_payment_method"
    uncollectible = "uncollectible"
    void = "void"
    # Stripe refused the request itself (400/404 ``invalid_request_error``: an amount under the
    # currency's minimum, a deleted customer), not the card: the customer is not told, nothing retries
    # it; staff fix the cause and retry, or void it.
    needs_review = "needs_review"




class Interval(enum.StrEnum):
    day = "day"
    week = "week"
    month = "month"
    year = "year"


class AttemptPhase(enum.StrEnum):
    """Recovery points of one attempt (rocket-rides-atomic: started → finished).

    ``started``: committed before the Stripe call; on resume the same idempotency key is reused and
    Stripe is asked first whether a PaymentIntent with our metadata already exists.
    ``finished``: the outcome is recorded and applied.
    """

    started = "started"
    finished = "finished"


class NotificationStatus(enum.StrEnum):
    # Waiting to go out, possibly after failed tries (``tries``, ``last_error``, a later ``send_after``).
    pending = "pending"
    sent = "sent"
    # No longer true when its time came (the charge moved on): kept for the record, never sent.
    dropped = "dropped"
    # Given up: refused for good by the mail server, or failed too many times. Shown to staff.
    dead = "dead"


def _check_in(column: str, enum_cls: type[enum.StrEnum]) -> CheckConstraint:
    values = ", ".join(f"'{v.value}'" for v in enum_cls)
    return CheckConstraint(f"{column} IN ({values})", name=f"{column}_valid")


def _now_default():
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200))
    country: Mapped[str | None] = mapped_column(String(2))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    # The idempotency key of this customer's creation at Stripe (``customer-<id>-<random>``), drawn once
    # before the first try and resent on every retry: ids repeat after a restore or in another
    # installation on the account, the random part does not.
    stripe_create_key: Mapped[str | None] = mapped_column(String(80), unique=True)
    default_payment_method_id: Mapped[int | None] = mapped_column(
        ForeignKey("payment_methods.id", use_alter=True, ondelete="SET NULL"))
    created_at: Mapped[datetime] = _now_default()

    default_payment_method: Mapped[PaymentMethod | None] = relationship(
        foreign_keys=[default_payment_method_id], post_update=True)


class PaymentMethod(Base):
    __tablename__ = "payment_methods"
    __table_args__ = (
        # A card saved twice (same fingerprint) stays one row per customer.
        Index("uq_payment_methods_customer_fingerprint", "customer_id", "fingerprint", unique=True,
              postgresql_where=text("fingerprint IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    stripe_payment_method_id: Mapped[str] = mapped_column(String(64), unique=True)
    brand: Mapped[str | None] = mapped_column(String(32))
    last4: Mapped[str | None] = mapped_column(String(4))
    exp_month: Mapped[int | None] = mapped_column(Integer)
    exp_year: Mapped[int | None] = mapped_column(Integer)
    country: Mapped[str | None] = mapped_column(String(2))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    mandate_id: Mapped[str | None] = mapped_column(String(64))
    setup_intent_id: Mapped[str | None] = mapped_column(String(64))
    saved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Saved before the SCA cutoffs: charged off-session under a previous authorization agreement.
    previous_authorization: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    detached_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()


class CardSetup(Base):
    """A SetupIntent we created for a customer, followed until it is final."""

    __tablename__ = "card_setups"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    setup_intent_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(40))
    payment_method_id: Mapped[int | None] = mapped_column(ForeignKey("payment_methods.id", ondelete="SET NULL"))
    last_error_code: Mapped[str | None] = mapped_column(String(64))
    last_error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_default()
    updated_at: Mapped[datetime] = _now_default()


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        _check_in("status", SubscriptionStatus),
        _check_in("interval", Interval),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("interval_count > 0", name="interval_count_positive"),
        # The billing run's query: active subscriptions whose next period has started.
        Index("ix_subscriptions_due", "next_charge_at", postgresql_where=text("status = 'active'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    payment_method_id: Mapped[int | None] = mapped_column(ForeignKey("payment_methods.id", ondelete="SET NULL"))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    interval: Mapped[str] = mapped_column(String(8))
    interval_count: Mapped[int] = mapped_column(Integer, default=1)
    # Periods are computed from the anchor (period k starts at anchor + k intervals), so a 31st
    # anchor gives Feb 28/29 and then Mar 31 again instead of drifting.
    anchor_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_period_index: Mapped[int] = mapped_column(Integer, default=0)
    next_charge_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    current_period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    current_period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default=SubscriptionStatus.active)
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()

    customer: Mapped[Customer] = relationship()
    payment_method: Mapped[PaymentMethod | None] = relationship()


class Charge(Base):
    """One per subscription period: the unit that is charged at most once."""

    __tablename__ = "charges"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period_index"),
        _check_in("status", ChargeStatus),
        # Scheduled dunning retries that have come due.
        Index("ix_charges_give_up_due", "give_up_at", postgresql_where=text("give_up_at IS NOT NULL")),
        Index("ix_charges_retry_requested", "retry_requested_at",
              postgresql_where=text("retry_requested_at IS NOT NULL")),
        Index("ix_charges_retry_due", "next_retry_at",
              postgresql_where=text("status = 'requires_payment_method' AND retry_paused = false")),
        # Charges a crashed relay or worker left behind (swept by the reconciler).
        Index("ix_charges_in_flight", "updated_at", postgresql_where=text("status IN ('pending', 'processing')")),
        # The retry queue (finance): every charge that is not paid, newest first.
        Index("ix_charges_queue", "status", "created_at", postgresql_where=text("status <> 'paid'")),
        # One per sort key of the finance console's queue, with the id as tie-breaker, so the first
        # page (and every next one) is an index range scan however long the queue grows.
        Index("ix_charges_queue_next_retry", "next_retry_at", "id", postgresql_where=text("status <> 'paid'")),
        Index("ix_charges_queue_created", "created_at", "id", postgresql_where=text("status <> 'paid'")),
        Index("ix_charges_queue_amount", "amount", "id", postgresql_where=text("status <> 'paid'")),
        Index("ix_charges_queue_attempts", "attempts", "id", postgresql_where=text("status <> 'paid'")),
        Index("ix_charges_queue_decline", "last_decline_code", "created_at",
              postgresql_where=text("status <> 'paid'")),
        # Recovery rate per week: charges by when they first failed.
        Index("ix_charges_first_failed", "first_failed_at", postgresql_where=text("first_failed_at IS NOT NULL")),
        # The billing run's "no open charge" check (billing.charging.run_due): open charges only, so it
        # does not grow with a subscription's paid history. Its predicate is the run's, word for word.
        Index("ix_charges_open", "subscription_id",
              postgresql_where=text("status NOT IN ('paid', 'uncollectible', 'void')")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"))
    period_index: Mapped[int] = mapped_column(Integer)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32), default=ChargeStatus.pending)
    payment_intent_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error_code: Mapped[str | None] = mapped_column(String(64))
    last_decline_code: Mapped[str | None] = mapped_column(String(64))
    last_advice_code: Mapped[str | None] = mapped_column(String(64))
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Card declines that count toward the retry schedule: abandoned attempts and staff retries do not.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # When dunning gives the charge up (first failure + horizon); apart from next_retry_at, which is
    # only ever the next automatic retry.
    give_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A staff "retry now" not yet claimed by a worker: a durable request the retry sweep re-enqueues.
    retry_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The idempotency key of the PaymentIntent the recovery page makes for a period that has none
    # (``recover-charge-<id>-<random>``, also in its metadata). Kept while that PaymentIntent can be
    # paid; a new one is drawn when it was canceled or the key is spent (billing.customer_pages).
    recovery_key: Mapped[str | None] = mapped_column(String(80), unique=True)
    # Who is working on this charge outside any transaction (a charge attempt calling Stripe, the
    # recovery page making a PaymentIntent), as a fencing token its later writes must still find, and
    # until when by the database's clock: free when either is NULL or the time has passed
    # (billing.leases). Replaces a session-level advisory lock, which pinned a connection per call.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()
    updated_at: Mapped[datetime] = _now_default()

    subscription: Mapped[Subscription] = relationship()
    attempt_rows: Mapped[list[Attempt]] = relationship(back_populates="charge", order_by="Attempt.number")


class Attempt(Base):
    """One try at collecting a charge: our idempotency key and how far it got."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("charge_id", "number"),
        _check_in("phase", AttemptPhase),
        Index("ix_attempts_unfinished", "started_at", postgresql_where=text("phase = 'started'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    charge_id: Mapped[int] = mapped_column(ForeignKey("charges.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    phase: Mapped[str] = mapped_column(String(16), default=AttemptPhase.started)
    payment_method_id: Mapped[int | None] = mapped_column(ForeignKey("payment_methods.id", ondelete="SET NULL"))
    stripe_payment_method_id: Mapped[str | None] = mapped_column(String(64))
    mandate_id: Mapped[str | None] = mapped_column(String(64))
    payment_intent_id: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str | None] = mapped_column(String(40))
    error_code: Mapped[str | None] = mapped_column(String(64))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    advice_code: Mapped[str | None] = mapped_column(String(64))
    # A staff "retry now": recorded, but its decline does not advance the retry schedule.
    manual: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = _now_default()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    charge: Mapped[Charge] = relationship(back_populates="attempt_rows")


class Notification(Base):
    """The outbox: one row per email, written in the transaction that decided to send it."""

    __tablename__ = "notifications"
    __table_args__ = (
        _check_in("status", NotificationStatus),
        Index("ix_notifications_due", "send_after", postgresql_where=text("status = 'pending'")),
        # The console's and the metrics' count of emails given up.
        Index("ix_notifications_dead", "send_after", postgresql_where=text("status = 'dead'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # Exactly one email per failure event: the dedupe key names the event (e.g. charge 7, attempt 2).
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    charge_id: Mapped[int | None] = mapped_column(ForeignKey("charges.id", ondelete="CASCADE"), index=True)
    to_email: Mapped[str] = mapped_column(String(320))
    context: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.pending)
    send_after: Mapped[datetime] = _now_default()
    tries: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()


class RecoveryToken(Base):
    """A link for a customer: only the SHA-256 of the token is stored; bound to one charge or setup."""

    __tablename__ = "recovery_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(16))  # recover | setup
    charge_id: Mapped[int | None] = mapped_column(ForeignKey("charges.id", ondelete="CASCADE"), index=True)
    card_setup_id: Mapped[int | None] = mapped_column(ForeignKey("card_setups.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()


class WebhookEvent(Base):
    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    stripe_event_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(80))
    object_id: Mapped[str | None] = mapped_column(String(64), index=True)
    event_created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    received_at: Mapped[datetime] = _now_default()
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(40))


class AuditEntry(Base):
    """Append-only (a trigger refuses UPDATE and DELETE): who did what, to which charge, and why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = _now_default()
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    charge_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    subscription_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)


class StaffRole(enum.StrEnum):
    # Reads the queue, the charges and the overview.
    viewer = "viewer"
    # Also acts on charges: retry, pause, resume, resend, void, cancel.
    operator = "operator"


class StaffUser(Base):
    """A finance console account. Only the argon2 hash of the password is stored."""

    __tablename__ = "staff_users"
    __table_args__ = (_check_in("role", StaffRole),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_default()


class StaffSession(Base):
    """A signed-in browser. The cookie carries a random token; only its SHA-256 is stored, so a
    session is revoked by setting ``revoked_at`` (logout, or ``billing staff revoke``)."""

    __tablename__ = "staff_sessions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    staff_user_id: Mapped[int] = mapped_column(ForeignKey("staff_users.id", ondelete="CASCADE"), index=True)
    # The synchronizer token every form of this session must send back.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now_default()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LoginFailure(Base):
    """One sign-in attempt that has not succeeded, counted per account and per (account, client address)
    to slow guessing down. The row is written *before* the password is checked (a reservation), so
    concurrent guesses are counted as they arrive; a success deletes the account's rows."""

    __tablename__ = "login_failures"
    __table_args__ = (
        Index("ix_login_failures_email_at", "email", "at"),
        Index("ix_login_failures_email_ip_at", "email", "ip", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    ip: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = _now_default()


class ApiKeyScope(enum.StrEnum):
    # GET (and HEAD/OPTIONS) only.
    read = "read"
    # Every route of the JSON API.
    write = "write"


class ApiKey(Base):
    """A key for the JSON API (``Authorization: Bearer <key>``), made by ``billing api-key create``.

    Only the SHA-256 of the key is stored: keys are 256 random bits, so a fast hash leaves nothing to
    guess, and a stolen table gives no key. ``prefix`` is the key's first characters, not secret, for
    people to tell keys apart. Revoking sets ``revoked_at``; every request checks it.
    """

    __tablename__ = "api_keys"
    __table_args__ = (_check_in("scope", ApiKeyScope),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    scope: Mapped[str] = mapped_column(String(8))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = _now_default()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Installation(Base):
    """This installation's identity, one row: the id that tags its Stripe objects when
    ``BILLING_INSTALLATION_ID`` is not set (generated by migration 0007), and since when objects are
    tagged (billing.installation, billing.ownership)."""

    __tablename__ = "installations"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    installation_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = _now_default()
