"""Recovery and setup links: the only way a customer reaches a page about their own payment.

A link carries a random token (``secrets.token_urlsafe(32)``, 256 bits). Only its SHA-256 is stored,
so a copy of the database holds no usable link, and the lookup is by that hash: the comparison the
database does is on a digest the caller cannot steer byte by byte, which makes it safe against timing
attacks by construction, with no ``compare_digest`` to forget. A token is bound to one customer and
one charge (``recover``) or card setup (``setup``), expires, and is consumed once.

The raw token exists only in memory between :func:`issue_token` and the email (or HTTP response) that
carries it; never log it or the link.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from billing.clock import utcnow
from billing.models import RecoveryToken
from billing.settings import get_settings

DEFAULT_TTL = timedelta(days=14)
# token_urlsafe(32) is 43 characters; anything far longer is not ours and is not worth hashing.
_MAX_TOKEN_LENGTH = 128


class Purpose(enum.StrEnum):
    recover = "recover"
    setup = "setup"


class TokenProblem(enum.StrEnum):
    unknown = "unknown"
    expired = "expired"
    used = "used"
    wrong_purpose = "wrong_purpose"


class TokenError(Exception):
    """The link cannot be used; ``reason`` says why (pages show a matching message, never the token)."""

    def __init__(self, reason: TokenProblem | str):
        self.reason = TokenProblem(reason)
        super().__init__(f"recovery link {self.reason.value}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()



def issue_token(session: Session, *, customer_id: int, purpose: Purpose | str, charge_id: int | None = None,
                card_setup_id: int | None = None, ttl: timedelta = DEFAULT_TTL,
                now: datetime | None = None) -> str:
    """Store a new token's hash and return the raw token (flushed, committed by the caller's unit of work)."""
    purpose = Purpose(purpose)
    if purpose is Purpose.recover and charge_id is None:
        raise ValueError("a recover link needs a charge_id")
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    token = secrets.token_urlsafe(32)
    session.add(RecoveryToken(token_hash=hash_token(token), purpose=purpose.value, customer_id=customer_id,
                              charge_id=charge_id, card_setup_id=card_setup_id,
                              expires_at=(now or utcnow()) + ttl))
    session.flush()
    return token


def link(token: str, purpose: Purpose | str) -> str:
    """``{BILLING_PUBLIC_URL}/recover/{token}`` or ``…/setup/{token}``."""
    return f"{get_settings().public_url.rstrip('/')}/{Purpose(purpose).value}/{token}"


def verify(session: Session, token: str, purpose: Purpose | str, *, now: datetime | None = None,
           allow_used: bool = False) -> RecoveryToken:
    """The token's row if the link may be used now, else :class:`TokenError`.

    Checked in this order so the message is the most useful one: unknown, wrong purpose, used, expired.
    ``allow_used`` accepts a link already used up (not an expired one): a page reporting the result
    of what the link was used for, e.g. a payment the webhook settled a moment before the page asked.
    """
    purpose = Purpose(purpose)
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
        raise TokenError(TokenProblem.unknown)
    row = session.scalars(select(RecoveryToken).where(RecoveryToken.token_hash == hash_token(token))).one_or_none()
    if row is None:
        raise TokenError(TokenProblem.unknown)
    if row.purpose != purpose.value:
        raise TokenError(TokenProblem.wrong_purpose)
    if row.used_at is not None and not allow_used:
        raise TokenError(TokenProblem.used)
    if row.expires_at <= (now or utcnow()):
        raise TokenError(TokenProblem.expired)
    return row


def mark_opened(session: Session, token_row: RecoveryToken, now: datetime | None = None) -> None:
    """Record the first time the page was opened (finance sees whether the email was acted on)."""
    now = now or utcnow()
    session.execute(update(RecoveryToken).where(RecoveryToken.id == token_row.id, RecoveryToken.opened_at.is_(None))
                    .values(opened_at=now).execution_options(synchronize_session=False))
    if token_row.opened_at is None:
        set_committed_value(token_row, "opened_at", now)


def consume(session: Session, token_row: RecoveryToken, now: datetime | None = None) -> None:
    """Use the link up. A conditional UPDATE, so of two concurrent requests exactly one wins; the
    other (and any later one) gets ``TokenError(used)``."""
    now = now or utcnow()
    won = session.execute(
        update(RecoveryToken).where(RecoveryToken.id == token_row.id, RecoveryToken.used_at.is_(None))
        .values(used_at=now).returning(RecoveryToken.id).execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if won is None:
        raise TokenError(TokenProblem.used)
    set_committed_value(token_row, "used_at", now)


def consume_for_charge(session: Session, charge_id: int, now: datetime | None = None) -> int:
    """Use up every recovery link of a charge that has been paid, whoever paid it (the page, the
    webhook, a retry): a link to a settled payment must not open a payment page again."""
    result = session.execute(
        update(RecoveryToken).where(RecoveryToken.charge_id == charge_id,
                                    RecoveryToken.purpose == Purpose.recover.value, RecoveryToken.used_at.is_(None))
        .values(used_at=now or utcnow()).execution_options(synchronize_session=False))
    return result.rowcount or 0
