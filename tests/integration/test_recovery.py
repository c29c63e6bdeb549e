"""Recovery and setup links on the real database: hashing, expiry, purpose, single use."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import recovery
from billing.models import CardSetup, RecoveryToken, Subscription
from billing.recovery import TokenError, TokenProblem
from tests import factories

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def charge(clean_db, session_factory):
    with session_factory() as s:
        customer = factories.make_customer(s)
        factories.make_payment_method(s, customer)
        sub = factories.make_subscription(s, customer)
        charge = factories.make_charge(s, sub, status="authentication_required")
        s.commit()
        return charge


def issue(session_factory, charge, **kw):
    with session_factory() as s:
        customer_id = s.get(Subscription, charge.subscription_id).customer_id
        token = recovery.issue_token(s, customer_id=customer_id, purpose=kw.pop("purpose", "recover"),
                                     charge_id=charge.id, now=NOW, **kw)
        s.commit()
        return token


def test_only_the_hash_is_stored(charge, session_factory):
    token = issue(session_factory, charge)
    assert len(token) >= 43
    with session_factory() as s:
        row = s.scalars(select(RecoveryToken)).one()
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in (row.token_hash, str(row.id))
        assert row.purpose == "recover" and row.charge_id == charge.id
        assert row.expires_at == NOW + timedelta(days=14)
        assert row.used_at is None and row.opened_at is None


def test_tokens_are_unique(charge, session_factory):
    assert len({issue(session_factory, charge) for _ in range(20)}) == 20


def test_link_uses_the_public_url():
    assert recovery.link("abc", "recover") == "http://billing.test/recover/abc"
    assert recovery.link("abc", recovery.Purpose.setup) == "http://billing.test/setup/abc"


def test_verify_returns_the_row(charge, session_factory):
    token = issue(session_factory, charge)
    with session_factory() as s:
        row = recovery.verify(s, token, "recover", now=NOW + timedelta(days=1))
        assert row.charge_id == charge.id


@pytest.mark.parametrize("bad", ["", "x", "not-a-token" * 20, "A" * 43])
def test_unknown_token(charge, session_factory, bad):
    issue(session_factory, charge)
    with session_factory() as s, pytest.raises(TokenError) as err:
        recovery.verify(s, bad, "recover", now=NOW)
    assert err.value.reason is TokenProblem.unknown


def test_expired_token(charge, session_factory):
    token = issue(session_factory, charge, ttl=timedelta(hours=1))
    with session_factory() as s:
        recovery.verify(s, token, "recover", now=NOW + timedelta(minutes=59))
        with pytest.raises(TokenError) as err:
            recovery.verify(s, token, "recover", now=NOW + timedelta(hours=1))
    assert err.value.reason is TokenProblem.expired


def test_wrong_purpose(charge, session_factory):
    token = issue(session_factory, charge)
    with session_factory() as s, pytest.raises(TokenError) as err:
        recovery.verify(s, token, "setup", now=NOW)
    assert err.value.reason is TokenProblem.wrong_purpose


def test_consume_once(charge, session_factory):
    token = issue(session_factory, charge)
    with session_factory() as s:
        row = recovery.verify(s, token, "recover", now=NOW)
        recovery.consume(s, row, NOW + timedelta(minutes=1))
        assert row.used_at == NOW + timedelta(minutes=1)
        with pytest.raises(TokenError) as err:
            recovery.consume(s, row, NOW + timedelta(minutes=2))
        assert err.value.reason is TokenProblem.used
        s.commit()
    with session_factory() as s, pytest.raises(TokenError) as err:
        recovery.verify(s, token, "recover", now=NOW + timedelta(minutes=3))
    assert err.value.reason is TokenProblem.used


def test_concurrent_consumers_one_wins(charge, session_factory):
    token = issue(session_factory, charge)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def use():
        with session_factory() as s:
            row = recovery.verify(s, token, "recover", now=NOW)
            barrier.wait()
            try:
                recovery.consume(s, row, NOW)
                s.commit()
                results.append("won")
            except TokenError as exc:
                results.append(exc.reason.value)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["used", "used", "used", "won"]


def test_mark_opened_keeps_the_first_time(charge, session_factory):
    token = issue(session_factory, charge)
    with session_factory() as s:
        row = recovery.verify(s, token, "recover", now=NOW)
        recovery.mark_opened(s, row, NOW + timedelta(hours=1))
        recovery.mark_opened(s, row, NOW + timedelta(hours=2))
        s.commit()
    with session_factory() as s:
        row = s.scalars(select(RecoveryToken)).one()
        assert row.opened_at == NOW + timedelta(hours=1)
        assert row.used_at is None  # opening is not using


def test_setup_token_bound_to_a_card_setup(clean_db, session_factory):
    with session_factory() as s:
        customer = factories.make_customer(s)
        setup = CardSetup(customer_id=customer.id, setup_intent_id="seti_123", status="requires_payment_method")
        s.add(setup)
        s.flush()
        token = recovery.issue_token(s, customer_id=customer.id, purpose="setup", card_setup_id=setup.id, now=NOW)
        s.commit()
    with session_factory() as s:
        row = recovery.verify(s, token, "setup", now=NOW)
        assert row.card_setup_id == setup.id and row.charge_id is None
        with pytest.raises(TokenError) as err:
            recovery.verify(s, token, "recover", now=NOW)
        assert err.value.reason is TokenProblem.wrong_purpose


def test_issue_checks_its_arguments(charge, session_factory):
    with session_factory() as s:
        with pytest.raises(ValueError, match="charge_id"):
            recovery.issue_token(s, customer_id=1, purpose="recover")
        with pytest.raises(ValueError):
            recovery.issue_token(s, customer_id=1, purpose="pay", charge_id=charge.id)
        with pytest.raises(ValueError, match="ttl"):
            recovery.issue_token(s, customer_id=1, purpose="recover", charge_id=charge.id, ttl=timedelta(0))


def test_token_error_message_never_holds_the_token(charge, session_factory):
    token = issue(session_factory, charge)
    with session_factory() as s, pytest.raises(TokenError) as err:
        recovery.verify(s, token, "setup", now=NOW)
    assert token not in str(err.value) and str(err.value) == "recovery link wrong_purpose"
