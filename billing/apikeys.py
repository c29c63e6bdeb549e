"""Keys for the JSON API: made by ``billing api-key create``, sent as ``Authorization: Bearer <key>``.

A key is ``bk_`` and 32 random bytes (256 bits, URL-safe base64). The database keeps only its SHA-256:
with that much entropy a fast hash leaves nothing to guess (a slow password hash would only slow every
request down), and a copy of the table lets no one in. Lookup is by that hash (unique index), then the
stored and computed digests are compared with :func:`hmac.compare_digest`.

Nothing is cached: every request reads the key's row, so ``billing api-key revoke`` takes effect on
the next request in every process at once. ``last_used_at`` is written at most once a minute per key,
by one conditional UPDATE that concurrent requests cannot turn into more writes.

Names are for people (``ci``, ``crm-sync``): unique, at most 100 characters, no control characters
(a name is printed in terminals and logs, where a CR, an ESC or a bidi override could forge a line).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from billing.clock import utcnow
from billing.db import unit_of_work
from billing.models import ApiKey, ApiKeyScope

KEY_PREFIX = "bk_"
KEY_BYTES = 32
# What people see of a key in ``billing api-key list``: the marker and 7 of its ~43 random characters.
DISPLAY_PREFIX_LENGTH = 10
MAX_NAME_LENGTH = 100
LAST_USED_RESOLUTION = timedelta(minutes=1)
DEFAULT_SCOPE = ApiKeyScope.write

# The shape of a key we could have made; anything else is refused without a database round trip.
_KEY_SHAPE = re.compile(r"bk_[A-Za-z0-9_-]{32,64}")
# Compared against when no row matched, so a miss costs what a hit costs.
_NO_MATCH = "0" * 64
# Unicode control (Cc), format (Cf: bidi overrides, zero-width), surrogate, private-use and unassigned
# characters, and the line and paragraph separators.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiKeyError(Exception):
    """A refusal with a message fit for the operator."""


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as the rest of the product sees it: never the key itself, nor its hash."""

    id: int
    name: str
    scope: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def allows(self, method: str) -> bool:
        """A ``read`` key may only read; a ``write`` key may do everything."""
        return self.scope == ApiKeyScope.write or method.upper() in _READ_METHODS


@dataclass(frozen=True)
class CreatedKey:
    info: ApiKeyInfo
    key: str = field(repr=False)  # the plaintext, shown to the operator once and stored nowhere


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """The name as stored (surrounding blanks dropped), or :class:`ApiKeyError` saying what is wrong."""
    name = name.strip()
    if not name:
        raise ApiKeyError("the name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ApiKeyError(f"the name must have at most {MAX_NAME_LENGTH} characters, not {len(name)}")
    bad = next((ch for ch in name if unicodedata.category(ch) in _REFUSED_CATEGORIES), None)
    if bad is not None:
        raise ApiKeyError(f"the name must not contain control characters (found U+{ord(bad):04X})")
    return name


def check_scope(scope: str) -> str:
    try:
        return ApiKeyScope(scope).value
    except ValueError:
        raise ApiKeyError(f"the scope must be read or write, not {scope!r}") from None


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(id=row.id, name=row.name, scope=row.scope, prefix=row.prefix, created_at=row.created_at,
                      last_used_at=row.last_used_at, revoked_at=row.revoked_at)


def create(name: str, scope: str = DEFAULT_SCOPE) -> CreatedKey:
    """A new key; its plaintext is in the answer and nowhere else, ever."""
    name, scope = check_name(name), check_scope(scope)
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    with unit_of_work() as uow:
        if uow.session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
            raise ApiKeyError(f"an API key named {name!r} already exists")
        row = ApiKey(name=name, scope=scope, key_hash=hash_key(key), prefix=key[:DISPLAY_PREFIX_LENGTH])
        uow.session.add(row)
        try:
            uow.session.flush()
        except IntegrityError:
            # Another ``create`` with the same name committed between our check and our insert.
            raise ApiKeyError(f"an API key named {name!r} already exists") from None
        uow.session.refresh(row)  # created_at, from the database's clock
        created = CreatedKey(info=_info(row), key=key)
        uow.commit()
    return created


def list_keys() -> list[ApiKeyInfo]:
    """Every key, revoked ones included, oldest first."""
    with unit_of_work() as uow:
        return [_info(row) for row in uow.session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))]


def revoke(name: str, now: datetime | None = None) -> tuple[ApiKeyInfo, bool]:
    """Revoke the key named ``name``: ``(key, whether this call revoked it)``; revoking twice is no error."""
    now = now or utcnow()
    with unit_of_work() as uow:
        row = uow.session.scalars(select(ApiKey).where(ApiKey.name == name.strip())).one_or_none()
        if row is None:
            raise ApiKeyError(f"no API key named {name!r}")
        if row.revoked_at is not None:
            return _info(row), False
        row.revoked_at = now
        info = _info(row)
        uow.commit()
    return info, True


def verify(key: str | None, now: datetime | None = None) -> ApiKeyInfo | None:
    """The live key ``key`` is, or None (unknown, malformed or revoked). Read from the database every time."""
    if not key or not _KEY_SHAPE.fullmatch(key):
        return None
    digest = hash_key(key)
    now = now or utcnow()
    with unit_of_work() as uow:
        row = uow.session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
        matched = hmac.compare_digest(row.key_hash if row is not None else _NO_MATCH, digest)
        if row is None or not matched or row.revoked_at is not None:
            return None
        info = _info(row)
        if row.last_used_at is None or row.last_used_at <= now - LAST_USED_RESOLUTION:
            _touch(uow.session, row.id, now)
            uow.commit()
    return info


def _touch(session, key_id: int, now: datetime) -> None:
    """Record a use, unless one was recorded within the last minute (by any process): one UPDATE whose
    WHERE re-checks that, so a burst of concurrent requests writes the row once."""
    session.execute(update(ApiKey)
                    .where(ApiKey.id == key_id,
                           or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION))
                    .values(last_used_at=now)
                    .execution_options(synchronize_session=False))
