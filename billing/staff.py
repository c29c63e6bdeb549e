"""Finance staff: accounts, sign-in sessions and the slow-down after failed sign-ins.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommendation); a hash
made with older parameters is upgraded on the next successful sign-in.

A session is a random token in a signed cookie (HMAC with ``BILLING_SECRET_KEY``, so a forged or
truncated cookie is refused before the database is asked); the table stores its SHA-256 only. Logout
and ``billing staff revoke`` set ``revoked_at``: a stolen cookie stops working at once.

Failed sign-ins are counted per account and per client address over a window. Past a threshold, the
next attempt must wait a delay that doubles with every further failure (capped): guessing slows to a
crawl, while the real owner is locked out for minutes at most. A refused attempt is not checked and
not counted, so hammering does not extend the wait.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select, update

from billing.clock import utcnow
from billing.db import unit_of_work
from billing.models import LoginFailure, StaffRole, StaffSession, StaffUser
from billing.settings import get_settings

SESSION_LIFETIME = timedelta(hours=12)
FAILURE_WINDOW = timedelta(minutes=15)
ACCOUNT_FAILURES_ALLOWED = 5
IP_FAILURES_ALLOWED = 20
FIRST_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 12

_hasher = PasswordHasher()
# Verified against when the email is unknown, so the answer takes as long as for a known one.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class StaffError(Exception):
    """A refusal with a message fit for the operator."""


@dataclass(frozen=True)
class Staff:
    id: int
    email: str
    role: str

    @property
    def can_act(self) -> bool:
        return self.role == StaffRole.operator


@dataclass(frozen=True)
class SignedIn:
    staff: Staff
    session_id: int
    csrf_token: str



def normalize_email(email: str) -> str:
    return email.strip().lower()


# --- accounts --------------------------------------------------------------------------------------

def add_staff(email: str, password: str, role: str) -> Staff:
    email = normalize_email(email)
    if "@" not in email or len(email) > 320:
        raise StaffError(f"not an email address: {email!r}")
    try:
        role = StaffRole(role).value
    except ValueError:
        raise StaffError(f"role must be viewer or operator, not {role!r}") from None
    if len(password) < MIN_PASSWORD_LENGTH:
        raise StaffError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    with unit_of_work() as uow:
        if uow.session.scalar(select(StaffUser.id).where(StaffUser.email == email)) is not None:
            raise StaffError(f"a staff account for {email} already exists")
        user = StaffUser(email=email, password_hash=_hasher.hash(password), role=role)
        uow.session.add(user)
        uow.session.flush()
        staff = Staff(user.id, user.email, user.role)
        uow.commit()
    return staff


def revoke_sessions(email: str, now: datetime | None = None) -> int:
    """Sign the account out everywhere; returns how many live sessions ended."""
    now = now or utcnow()
    with unit_of_work() as uow:
        user_id = uow.session.scalar(select(StaffUser.id).where(StaffUser.email == normalize_email(email)))
        if user_id is None:
            raise StaffError(f"no staff account for {email}")
        result = uow.session.execute(update(StaffSession).where(StaffSession.staff_user_id == user_id,
                                                                StaffSession.revoked_at.is_(None))
                                     .values(revoked_at=now))
        uow.commit()
    return result.rowcount or 0


# --- the slow-down -----------------------------------------------------------------------------------

def _delay_after(failures: int, allowed: int) -> timedelta:
    if failures < allowed:
        return timedelta(0)
    return min(FIRST_DELAY * 2 ** (failures - allowed), MAX_DELAY)


def retry_after(email: str, ip: str, now: datetime | None = None) -> int:
    """Seconds this sign-in must still wait (0: go ahead), by the worse of account and address."""
    now = now or utcnow()
    since = now - FAILURE_WINDOW
    wait = timedelta(0)
    with unit_of_work() as uow:
        for column, value, allowed in ((LoginFailure.email, normalize_email(email), ACCOUNT_FAILURES_ALLOWED),
                                       (LoginFailure.ip, ip, IP_FAILURES_ALLOWED)):
            count, last = uow.session.execute(
                select(func.count(), func.max(LoginFailure.at)).where(column == value, LoginFailure.at > since)).one()
            if count and last is not None:
                wait = max(wait, last + _delay_after(count, allowed) - now)
    return max(0, int(wait.total_seconds() + 0.999))


def _record_failure(email: str, ip: str, now: datetime) -> None:
    with unit_of_work() as uow:
        uow.session.add(LoginFailure(email=normalize_email(email)[:320], ip=ip[:64], at=now))
        uow.commit()


class TooManyAttempts(StaffError):
    def __init__(self, seconds: int):
        super().__init__(f"Too many failed sign-ins. Try again in {seconds} seconds.")
        self.seconds = seconds


def authenticate(email: str, password: str, ip: str, now: datetime | None = None) -> tuple[Staff, str]:
    """Check the password and open a session: ``(staff, raw session token)``.

    Raises :class:`TooManyAttempts` while slowed down, :class:`StaffError` for a wrong email or password
    (one message for both, so the form does not tell which accounts exist).
    """
    now = now or utcnow()
    email = normalize_email(email)
    wait = retry_after(email, ip, now)
    if wait > 0:
        raise TooManyAttempts(wait)
    with unit_of_work() as uow:
        user = uow.session.scalars(select(StaffUser).where(StaffUser.email == email)).first()
        ok = False
        try:
            ok = _hasher.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or user.disabled_at is not None:
            uow.session.rollback()
            _record_failure(email, ip, now)
            raise StaffError("Wrong email or password.")
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        token = secrets.token_urlsafe(32)
        uow.session.add(StaffSession(token_hash=_sha256(token), staff_user_id=user.id,
                                     csrf_token=secrets.token_urlsafe(32), expires_at=now + SESSION_LIFETIME))
        # A success clears the account's count (not the address's: one good password on a shared
        # address does not license guessing at the other accounts).
        uow.session.execute(delete(LoginFailure).where(LoginFailure.email == email))
        staff = Staff(user.id, user.email, user.role)
        uow.commit()
    return staff, token


# --- sessions ----------------------------------------------------------------------------------------

def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _signature(token: str) -> str:
    key = (get_settings().secret_key or "").encode()
    return hmac.new(key, b"staff-session:" + token.encode(), hashlib.sha256).hexdigest()


def sign(token: str) -> str:
    return f"{token}.{_signature(token)}"


def unsign(cookie: str | None) -> str | None:
    if not cookie or "." not in cookie:
        return None
    token, _, signature = cookie.rpartition(".")
    return token if hmac.compare_digest(signature, _signature(token)) else None


def session_for(cookie: str | None, now: datetime | None = None) -> SignedIn | None:
    """The live session a cookie names, or ``None`` (unsigned, unknown, expired, revoked, disabled)."""
    token = unsign(cookie)
    if token is None:
        return None
    now = now or utcnow()
    with unit_of_work() as uow:
        row = uow.session.execute(
            select(StaffSession.id, StaffSession.csrf_token, StaffUser.id, StaffUser.email, StaffUser.role)
            .join(StaffUser, StaffUser.id == StaffSession.staff_user_id)
            .where(StaffSession.token_hash == _sha256(token), StaffSession.revoked_at.is_(None),
                   StaffSession.expires_at > now, StaffUser.disabled_at.is_(None))).first()
    if row is None:
        return None
    session_id, csrf, user_id, email, role = row
    return SignedIn(Staff(user_id, email, role), session_id, csrf)


def end_session(session_id: int, now: datetime | None = None) -> None:
    with unit_of_work() as uow:
        uow.session.execute(update(StaffSession).where(StaffSession.id == session_id)
                            .values(revoked_at=now or utcnow()))
        uow.commit()
