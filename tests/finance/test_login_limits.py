"""The sign-in slow-down holds under concurrency, never locks the rightful owner out, and keys on the
client address as BILLING_TRUSTED_PROXIES lets us know it."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from billing import staff
from billing.db import unit_of_work
from billing.web.finance import create_finance_app
from tests.conftest import environ_applied
from tests.finance import support

WRONG = "not the password at all"


def _age_failures(seconds: float) -> None:
    with unit_of_work() as uow:
        uow.session.execute(text("UPDATE login_failures SET at = at - make_interval(secs => :s)"), {"s": seconds})
        uow.commit()


def _recorded_addresses() -> list[str]:
    with unit_of_work() as uow:
        return list(uow.session.execute(text("SELECT ip FROM login_failures ORDER BY id")).scalars())


def _failures(email: str) -> int:
    with unit_of_work() as uow:
        return uow.session.execute(text("SELECT count(*) FROM login_failures WHERE email = :e"),
                                   {"e": email}).scalar_one()


# --- atomic: reserve, then verify -------------------------------------------------------------------------

def test_forty_concurrent_wrong_passwords_are_mostly_never_checked(accounts, monkeypatch):
    verified = []
    real_verify = staff._verify
    lock = threading.Lock()

    def counting_verify(account, password):
        with lock:
            verified.append(password)
        return real_verify(account, password)

    monkeypatch.setattr(staff, "_verify", counting_verify)
    answers: list[str] = []
    start = threading.Barrier(40)

    def guess(n: int) -> None:
        start.wait()
        try:
            staff.authenticate(support.OPERATOR, f"guess number {n:02d}", "198.51.100.66")
            answers.append("signed in")
        except staff.TooManyAttempts:
            answers.append("slow down")
        except staff.StaffError:
            answers.append("wrong")

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    # Each attempt is counted before its password is checked, so the count stops them as they arrive.
    # (On a loaded machine an attempt may also be told to slow down because the account's lock was
    # busy for too long; never may more than the allowance be checked.)
    assert 1 <= len(verified) <= staff.ADDRESS_FAILURES_ALLOWED
    assert sorted(answers) == ["slow down"] * (40 - len(verified)) + ["wrong"] * len(verified)
    assert _failures(support.OPERATOR) == len(verified)


# --- progressive, never a lockout ---------------------------------------------------------------------------

def test_the_delay_doubles_up_to_its_cap_and_the_owner_always_gets_in(accounts):
    ip = "198.51.100.7"
    for _ in range(staff.ADDRESS_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError, match="Wrong"):
            staff.authenticate(support.OPERATOR, WRONG, ip)
    delays = []
    for _ in range(7):
        wait = staff.retry_after(support.OPERATOR, ip)
        delays.append(wait)
        with pytest.raises(staff.TooManyAttempts) as refused:
            staff.authenticate(support.OPERATOR, support.PASSWORD, ip)  # even the right one waits…
        assert refused.value.seconds == wait
        _age_failures(wait + 1)
        with pytest.raises(staff.StaffError, match="Wrong"):
            staff.authenticate(support.OPERATOR, WRONG, ip)  # …and the guesser gets one try per delay
    assert delays == [30, 60, 120, 240, 480, 900, 900]
    assert max(delays) == staff.MAX_DELAY.total_seconds()

    # The owner, once the delay has passed, signs in, and that clears the account's count.
    _age_failures(staff.retry_after(support.OPERATOR, ip) + 1)
    assert staff.authenticate(support.OPERATOR, support.PASSWORD, ip)[0].email == support.OPERATOR
    assert _failures(support.OPERATOR) == 0
    assert staff.retry_after(support.OPERATOR, ip) == 0


def test_guessing_from_many_addresses_slows_the_account_not_forever(accounts):
    for n in range(staff.ACCOUNT_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError, match="Wrong"):
            staff.authenticate(support.OPERATOR, WRONG, f"198.51.100.{n + 1}")
    # One address each, so no (account, address) pair is past its threshold; the account is.
    with pytest.raises(staff.TooManyAttempts) as refused:
        staff.authenticate(support.OPERATOR, support.PASSWORD, "203.0.113.200")
    assert 0 < refused.value.seconds <= staff.FIRST_DELAY.total_seconds()
    # Other accounts are untouched.
    assert staff.authenticate(support.VIEWER, support.PASSWORD, "198.51.100.1")[0].email == support.VIEWER
    _age_failures(staff.FIRST_DELAY.total_seconds() + 1)
    assert staff.authenticate(support.OPERATOR, support.PASSWORD, "203.0.113.200")[0].email == support.OPERATOR
    assert _failures(support.OPERATOR) == 0


def test_failures_past_the_window_are_forgotten(accounts):
    ip = "198.51.100.8"
    for _ in range(staff.ADDRESS_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError):
            staff.authenticate(support.OPERATOR, WRONG, ip)
    assert staff.retry_after(support.OPERATOR, ip) > 0
    _age_failures((staff.FAILURE_WINDOW + timedelta(seconds=1)).total_seconds())
    assert staff.retry_after(support.OPERATOR, ip) == 0
    with pytest.raises(staff.StaffError, match="Wrong"):
        staff.authenticate(support.OPERATOR, WRONG, ip)
    assert _failures(support.OPERATOR) == 1  # the forgotten rows are cleared as the account goes


# --- the client address over HTTP ----------------------------------------------------------------------------

def _console(peer: str) -> TestClient:
    app = FastAPI()
    app.mount("/finance", create_finance_app())
    return TestClient(app, client=(peer, 40000))


def _login(client: TestClient, password: str, forwarded_for: str | None = None):
    page = client.get("/finance/login")
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return client.post("/finance/login", data={"email": support.OPERATOR, "password": password,
                                               "csrf_token": support.hidden(page.text), "next": "/finance/queue"},
                       headers=headers, follow_redirects=False)


def test_forwarded_for_from_loopback_is_not_believed_by_default(accounts):
    with _console("127.0.0.1") as client:
        for n in range(staff.ADDRESS_FAILURES_ALLOWED):
            assert _login(client, WRONG, forwarded_for=f"198.51.100.{n + 1}").status_code == 401
        # A fresh made-up address per guess does not buy a fresh allowance.
        r = _login(client, WRONG, forwarded_for="198.51.100.99")
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert set(_recorded_addresses()) == {"127.0.0.1"}


def test_forwarded_for_is_read_from_the_right_behind_a_trusted_proxy(accounts):
    with environ_applied({"BILLING_TRUSTED_PROXIES": "127.0.0.1"}), _console("127.0.0.1") as client:
        # The client may write anything on the left; the proxy appended the address it saw.
        for n in range(staff.ADDRESS_FAILURES_ALLOWED):
            r = _login(client, WRONG, forwarded_for=f"10.0.0.{n}, 203.0.113.50")
            assert r.status_code == 401
        assert _login(client, support.PASSWORD, forwarded_for="10.0.0.77, 203.0.113.50").status_code == 429
        assert set(_recorded_addresses()) == {"203.0.113.50"}
        # The owner, at another address behind the same proxy, is not held up by that guesser.
        assert _login(client, support.PASSWORD, forwarded_for="203.0.113.51").status_code == 303


def test_an_account_hammered_past_the_lock_timeout_is_told_to_slow_down(accounts, database_url):
    import psycopg

    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (staff._LOGIN_LOCK_CLASS, support.OPERATOR))
        with pytest.raises(staff.TooManyAttempts):
            staff.authenticate(support.OPERATOR, support.PASSWORD, "198.51.100.9")
    assert _failures(support.OPERATOR) == 0
    assert staff.authenticate(support.OPERATOR, support.PASSWORD, "198.51.100.9")[0].email == support.OPERATOR
