"""This installation's id: the tag (``metadata.installation``) on every Stripe object it creates.

Two installations often share one Stripe account (staging beside production), and a database restored
from a backup repeats ids that Stripe has already seen. Our ids in Stripe metadata then name rows of
someone else; the installation id tells whose they are (warehouse tags its Stripe objects with
``billing_service`` and ``domain`` metadata for the same reason). :mod:`billing.ownership` compares it
before a PaymentIntent found by metadata moves anything.

``BILLING_INSTALLATION_ID`` when set; else the id migration 0007 generated once and stored in the
``installations`` row, read once per process and database. Changing the id later makes what was
created under the old one foreign: set it before the first charge, or leave it to the database.
"""

from __future__ import annotations

import functools
import secrets
from datetime import datetime

from sqlalchemy import text

from billing.settings import get_settings

METADATA_KEY = "installation"


def generate() -> str:
    return f"inst_{secrets.token_hex(8)}"


def installation_id() -> str:
    """The configured id, else the one stored in the database."""
    configured = get_settings().installation_id
    if configured:
        return configured
    return _stored(_database_key())[0]


def tagging_started_at() -> datetime:
    """When this installation began tagging its objects (migration 0007 ran): an attempt started
    before sent its metadata without ``installation`` and ``attempt_key``."""
    return _stored(_database_key())[1]


def _database_key() -> str:
    from billing.db import get_engine

    return get_engine().url.render_as_string(hide_password=False)


@functools.cache
def _stored(database: str) -> tuple[str, datetime]:
    """The stored row (inserted here if someone deleted it: the migration's insert is the rule)."""
    from billing.db import get_engine

    with get_engine().begin() as conn:
        row = conn.execute(text("SELECT installation_id, created_at FROM installations WHERE id = 1")).first()
        if row is None:
            conn.execute(text("INSERT INTO installations (id, installation_id) VALUES (1, :iid) "
                              "ON CONFLICT (id) DO NOTHING"), {"iid": generate()})
            row = conn.execute(text("SELECT installation_id, created_at FROM installations WHERE id = 1")).one()
    return row[0], row[1]
