"""The one clock: timezone-aware UTC now (frozen in tests with freezegun)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
