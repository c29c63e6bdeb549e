"""Helpers for the finance console tests: accounts, signing in over HTTP, a seeded queue."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import psycopg

from billing import staff
from billing.models import ChargeStatus
from tests import factories

PASSWORD = "correct horse battery staple"
OPERATOR = "olga.operator@example.com"
VIEWER = "victor.viewer@example.com"
STAFF_TABLES = ["staff_sessions", "staff_users", "login_failures"]


def truncate_staff(database_url: str) -> None:
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(STAFF_TABLES)} RESTART IDENTITY CASCADE")


def add_accounts() -> None:
    staff.add_staff(OPERATOR, PASSWORD, "operator")
    staff.add_staff(VIEWER, PASSWORD, "viewer")


def hidden(html: str, name: str = "csrf_token") -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} in the page"
    return match.group(1)


def login(client, email: str = OPERATOR, password: str = PASSWORD, *, follow: bool = False):
    page = client.get("/finance/login")
    assert page.status_code == 200
    return client.post("/finance/login", data={"email": email, "password": password,
                                               "csrf_token": hidden(page.text), "next": "/finance/queue"},
                       follow_redirects=follow)


def act(client, charge_id: int, action: str, reason: str = "customer called; agreed on the phone"):
    page = client.get(f"/finance/charges/{charge_id}")
    assert page.status_code == 200, page.text
    return client.post(f"/finance/charges/{charge_id}/actions/{action}",
                       data={"csrf_token": hidden(page.text), "reason": reason}, follow_redirects=False)


# A demo-like retry queue: countries, decline codes, amounts, a grandfathered card, some recovered.
SEED = [
    # (name, country, previous_authorization, currency, amount, status, error, decline, attempts, days ago)
    ("Ada Lovelace", "GB", True, "gbp", 4900, "requires_payment_method", "card_declined", "insufficient_funds", 2, 3),
    ("Blaise Pascal", "FR", False, "eur", 1999, "authentication_required", "authentication_required", None, 1, 2),
    ("Carl Gauss", "DE", False, "eur", 2999, "requires_payment_method", "card_declined", "do_not_honor", 3, 6),
    ("Dorothy Vaughan", "US", False, "usd", 1500, "uncollectible", "card_declined", "lost_card", 1, 20),
    ("Emmy Noether", "DE", True, "eur", 9900, "requires_payment_method", "card_declined", "try_again_later", 1, 1),
    ("Grace Hopper", "US", False, "usd", 2500, "paid", "card_declined", "insufficient_funds", 2, 9),
    ("Hedy Lamarr", "AT", False, "eur", 1200, "void", "card_declined", "expired_card", 1, 15),
    ("Ida Rhodes", "US", False, "usd", 3500, "requires_payment_method", "card_declined", "generic_decline", 4, 8),
    ("Joan Clarke", "GB", True, "gbp", 1800, "paid", "authentication_required", None, 1, 12),
    ("Katherine Johnson", "US", False, "usd", 7200, "pending", None, None, 0, 0),
    ("Lise Meitner", "SE", False, "sek", 29900, "requires_payment_method", "card_declined", "card_velocity_exceeded",
     2, 4),
    ("Mary Somerville", "GB", False, "gbp", 2200, "authentication_required", "authentication_required", None, 1, 5),
]


def seed_queue(session, now: datetime | None = None, *, opened_and_emailed: bool = True) -> dict[str, int]:
    """Customers, cards, subscriptions and charges like a running installation's; returns name → charge id."""
    from billing.models import Notification, RecoveryToken

    now = now or datetime.now(UTC)
    ids = {}
    for i, (name, country, prev, currency, amount, status, error, decline, attempts, days) in enumerate(SEED):
        email = name.lower().replace(" ", ".") + "@example.com"
        customer = factories.make_customer(session, email=email, name=name, country=country)
        pm = factories.make_payment_method(session, customer, country=country, previous_authorization=prev,
                                           saved_at=datetime(2020, 6, 1, tzinfo=UTC) if prev
                                           else datetime(2024, 12, 1, tzinfo=UTC))
        sub = factories.make_subscription(session, customer, amount=amount, currency=currency)
        opened = now - timedelta(days=days, hours=i)
        failed = error is not None
        charge = factories.make_charge(
            session, sub, status=status, attempts=attempts, last_error_code=error, last_decline_code=decline,
            created_at=opened, updated_at=opened, first_failed_at=opened if failed else None,
            next_retry_at=opened + timedelta(days=days + 1) if status == ChargeStatus.requires_payment_method
            else None, notified_at=opened + timedelta(minutes=2) if failed and opened_and_emailed else None,
            paid_at=now - timedelta(days=1) if status == "paid" else None)
        if failed and opened_and_emailed:
            session.add(Notification(dedupe_key=f"seed-{charge.id}", kind="payment_failed", customer_id=customer.id,
                                     charge_id=charge.id, to_email=email, context={}, status="sent",
                                     send_after=opened, sent_at=opened + timedelta(minutes=2), tries=1))
            if i % 2 == 0:
                session.add(RecoveryToken(token_hash=f"{charge.id:064d}", purpose="recover", charge_id=charge.id,
                                          customer_id=customer.id, expires_at=now + timedelta(days=7),
                                          opened_at=opened + timedelta(hours=5)))
        ids[name] = charge.id
        _ = pm
    session.flush()
    return ids


class RecordingJobs:
    """A staff action's follow-up work, recorded (as if the broker took it) instead of sent to Celery."""

    def __init__(self):
        self.calls: list[tuple] = []

    def retry_charge(self, charge_id: int) -> None:
        self.calls.append(("retry_charge", charge_id))

    def relay_outbox(self) -> None:
        self.calls.append(("relay_outbox",))
