"""Finance staff: accounts, sign-in sessions and the slow-down after failed sign-ins.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommendation); a hash
made with older parameters is upgraded on the next successful sign-in.

A session is a random token in a signed cookie (HMAC with ``BILLING_SECRET_KEY``, so a forged or
truncated cookie is refused before the database is asked); the table stores its SHA-256 only. Logout
and ``billing staff revoke`` set ``revoked_at``: a stolen cookie stops working at once.

The slow-down after failed sign-ins (OWASP "Authentication Cheat Sheet", login throttling):

* **Reserve, then verify.** Under a per-account advisory lock, the attempt is counted (a
  ``login_failures`` row written and committed) *before* the password is checked; a success deletes
  the account's rows afterwards. Forty concurrent guesses therefore meet the count one after another,
  and only the first few are ever verified, instead of all forty reading "no failures yet".
* **Progressive delay, never a lockout.** Past a threshold, the next attempt must wait a delay that
  doubles with every further failure, capped at :data:`MAX_DELAY`; a refused attempt is not checked and
  not counted, so hammering does not extend the wait. The rightful owner can always sign in once the
  delay has passed, and a success clears the account's count.
* **Keyed by account, and by (account, address).** Guessing at one account from one address slows
  after :data:`ADDRESS_FAILURES_ALLOWED` failures; from many addresses after
  :data:`ACCOUNT_FAILURES_ALLOWED`. There is no limit on an address alone: one guesser behind an
  office's shared address cannot lock the other accounts at that address out. The address is the one
  :func:`billing.web.client.client_address` derives (``BILLING_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.clock import utcnow
from billing.db import unit_of_work
from billing.models import LoginFailure, StaffRole, StaffSession, StaffUser
from billing.settings import get_settings

SESSION_LIFETIME = timedelta(hours=12)
# Failures older than this are forgotten.
FAILURE_WINDOW = timedelta(hours=1)
# Failures allowed before the delay starts: at one account from one client address, and at one account
# from all addresses together (guessing spread over many addresses).
ADDRESS_FAILURES_ALLOWED = 5
ACCOUNT_FAILURES_ALLOWED = 20
FIRST_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(minutes=15)
# Keeps these advisory lock keys apart from any other use ("lg").
_LOGIN_LOCK_CLASS = 0x6C67
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


def _wait(session: Session, email: str, ip: str, now: datetime) -> timedelta:
    """How long this attempt must still wait, by the worse of (account, address) and account."""
    since = now - FAILURE_WINDOW
    wait = timedelta(0)
    recent = (LoginFailure.email == email, LoginFailure.at > since)
    for where, allowed in (((*recent, LoginFailure.ip == ip), ADDRESS_FAILURES_ALLOWED),
                           (recent, ACCOUNT_FAILURES_ALLOWED)):
        count, last = session.execute(select(func.count(), func.max(LoginFailure.at)).where(*where)).one()
        if count and last is not None:
            wait = max(wait, last + _delay_after(count, allowed) - now)
    return wait


def _seconds(wait: timedelta) -> int:
    return max(0, int(wait.total_seconds() + 0.999))


def retry_after(email: str, ip: str, now: datetime | None = None) -> int:
    """Seconds a sign-in to ``email`` from ``ip`` must still wait (0: go ahead)."""
    now = now or utcnow()
    with unit_of_work() as uow:
        return _seconds(_wait(uow.session, normalize_email(email), ip[:64], now))


class TooManyAttempts(StaffError):
    def __init__(self, seconds: int):
        super().__init__(f"Too many failed sign-ins. Try again in {seconds} seconds.")
        self.seconds = seconds


@dataclass(frozen=True)
class _Account:
    id: int
    email: str
    role: str
    password_hash: str
    disabled: bool


def _reserve(email: str, ip: str, now: datetime) -> _Account | None:
    """Count this attempt before its password is checked, or refuse it (:class:`TooManyAttempts`).

    The advisory lock makes "read the count, add one" a single step per account: a concurrent attempt
    at the same account waits for this commit and then sees the row. Returns the account (``None``
    when the email is unknown; the attempt is counted all the same).
    """
    with unit_of_work() as uow:
        s = uow.session
        # Waiting long for the lock means the account is being hammered: that attempt is told to slow down.
        s.execute(text("SET LOCAL lock_timeout = '2s'"))
        try:
            s.execute(text("SELECT pg_advisory_xact_lock(:c, hashtext(:k))"), {"c": _LOGIN_LOCK_CLASS, "k": email})
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                raise TooManyAttempts(_seconds(FIRST_DELAY)) from None
            raise
        wait = _wait(s, email, ip, now)
        if wait > timedelta(0):
            raise TooManyAttempts(_seconds(wait))
        # Rows past the window say nothing any more; this account's are cleared as it goes.
        s.execute(delete(LoginFailure).where(LoginFailure.email == email, LoginFailure.at <= now - FAILURE_WINDOW))
        s.add(LoginFailure(email=email, ip=ip, at=now))
        user = s.scalars(select(StaffUser).where(StaffUser.email == email)).first()
        account = (_Account(user.id, user.email, user.role, user.password_hash, user.disabled_at is not None)
                   if user is not None else None)
        uow.commit()
    return account


def _verify(account: _Account | None, password: str) -> bool:
    try:
        return _hasher.verify(account.password_hash if account else _DUMMY_HASH, password) and account is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def authenticate(email: str, password: str, ip: str, now: datetime | None = None) -> tuple[Staff, str]:
    """Check the password and open a session: ``(staff, raw session token)``.

    Raises :class:`TooManyAttempts` while slowed down (the password is then not checked at all),
    :class:`StaffError` for a wrong email or password (one message for both, so the form does not tell
    which accounts exist). A wrong password needs no further write: its reservation is the failure.
    """
    now = now or utcnow()
    email = normalize_email(email)[:320]
    ip = ip[:64]
    account = _reserve(email, ip, now)
    if not _verify(account, password) or account.disabled:
        raise StaffError("Wrong email or password.")
    with unit_of_work() as uow:
        user = uow.session.get(StaffUser, account.id, with_for_update=True)
        if user is None or user.disabled_at is not None:
            raise StaffError("Wrong email or password.")
        if user.password_hash == account.password_hash and _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        token = secrets.token_urlsafe(32)
        uow.session.add(StaffSession(token_hash=_sha256(token), staff_user_id=user.id,
                                     csrf_token=secrets.token_urlsafe(32), expires_at=now + SESSION_LIFETIME))
        # A success clears the account's count, from every address: the owner has proved who they are.
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
    # Bytes: a cookie is attacker-typed, and compare_digest refuses non-ASCII text with a TypeError.
    return token if hmac.compare_digest(signature.encode("utf-8", "replace"), _signature(token).encode()) else None


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
