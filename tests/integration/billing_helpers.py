"""Helpers for tests that charge through the sandbox: enrol customers with real saved cards, enqueue
charges to the real worker, read back statuses; and API keys for the tests that call ``/api/``."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from billing.models import Charge
from billing.stripe_gateway import get_gateway
from tests import factories

# A charge in one of these has been decided (it left pending/processing).
SETTLED = {"paid", "authentication_required", "requires_payment_method", "uncollectible", "void"}


def enrol(session_factory, sandbox, card: str, *, email: str | None = None, amount: int = 2500,
          currency: str = "eur", due: datetime | None = None, declines_later: str | None = None,
          with_card: bool = True) -> int:
    """A customer whose ``card`` was saved through a real SetupIntent (3-D Secure completed when
    asked) and a subscription due now; returns the subscription id."""
    gw = get_gateway()
    email = email or f"{card.lower()}-{random.randrange(10**9)}@example.com"
    cus = gw.create_customer(email=email, name=card, idempotency_key=f"test-cus-{email}")
    details = setup = None
    if with_card:
        setup = gw.create_setup_intent(customer_id=cus, payment_method=card, idempotency_key=f"test-si-{email}")
        if setup.status == "requires_action":
            sandbox.control.complete_3ds(setup.setup_intent_id)
            setup = gw.retrieve_setup_intent(setup.setup_intent_id)
        assert setup.status == "succeeded", setup
        details = gw.retrieve_payment_method(setup.payment_method_id)
        if declines_later:
            sandbox.control.decline_later(details.payment_method_id, declines_later)
    with session_factory() as s:
        customer = factories.make_customer(s, email=email, stripe_customer_id=cus)
        if details is not None:
            factories.make_payment_method(s, customer, stripe_payment_method_id=details.payment_method_id,
                                          last4=details.last4, country=details.country,
                                          fingerprint=details.fingerprint, mandate_id=setup.mandate_id)
        due = due or datetime.now(UTC) - timedelta(minutes=1)
        sub = factories.make_subscription(s, customer, amount=amount, currency=currency, anchor_at=due,
                                          next_charge_at=due)
        s.commit()
        return sub.id


def enqueue(charge_id: int) -> None:
    """Hand a charge to the real worker, as the billing run does."""
    from workers.tasks import enqueue_charge

    enqueue_charge(charge_id)


def charge_statuses(session_factory) -> dict[int, str]:
    with session_factory() as s:
        return dict(s.execute(select(Charge.id, Charge.status)).all())


def api_key_headers(scope: str = "write") -> dict[str, str]:
    """``Authorization`` for the JSON API, with a fresh key made in the test database (as ``billing
    api-key create`` would), for in-process clients and ``billing web`` subprocesses alike."""
    from billing import apikeys

    created = apikeys.create(f"test-{scope}-{uuid.uuid4().hex[:12]}", scope)
    return {"Authorization": f"Bearer {created.key}"}


def lease_runs_out(charge_id: int) -> None:
    """The worker holding the charge's lease died ``LEASE_SECONDS`` ago: its lease has lapsed (what
    the clock would do, without the wait)."""
    from sqlalchemy import text

    from billing.db import unit_of_work

    with unit_of_work() as uow:
        uow.session.execute(text("UPDATE charges SET lease_expires_at = clock_timestamp() - interval '1 second' "
                                 "WHERE id = :id AND lease_expires_at IS NOT NULL"), {"id": charge_id})
        uow.commit()
