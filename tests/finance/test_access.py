"""Who reaches what: anonymous → the login page only; viewers read; operators act; CSRF on every form;
sessions that really end; the slow-down after failed sign-ins."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from billing import staff
from billing.db import unit_of_work
from billing.models import AuditEntry, Charge
from billing.web.app import create_app
from billing.web.finance import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from tests.finance import support

ANONYMOUS_GETS = ["/finance/", "/finance/queue", "/finance/queue?status=void", "/finance/queue.csv",
                  "/finance/overview", "/finance/charges/1", "/finance/charges/999999"]
ANONYMOUS_POSTS = ["/finance/logout", "/finance/charges/1/actions/retry_now", "/finance/charges/1/actions/void"]


def _seeded() -> dict[str, int]:
    with unit_of_work() as uow:
        ids = support.seed_queue(uow.session)
        uow.commit()
    return ids


def _audit_count() -> int:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.count()).select_from(AuditEntry))


def test_every_finance_route_sends_anonymous_users_to_the_login(accounts):
    """Through the real app (the console mounted in it), every registered route is covered."""
    from billing.web.finance import create_finance_app

    sub_app = create_finance_app()
    registered = {(m, r.path) for r in sub_app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    exempt = {("GET", "/login"), ("POST", "/login"), ("GET", "/static/finance.css")}
    covered = {("GET", "/"), ("GET", "/queue"), ("GET", "/queue.csv"), ("GET", "/overview"),
               ("GET", "/charges/{charge_id}"), ("POST", "/logout"), ("POST", "/charges/{charge_id}/actions/{action}")}
    assert registered - exempt == covered, "a new route needs a line in this test"

    with TestClient(create_app()) as client:
        for path in ANONYMOUS_GETS:
            r = client.get(path, follow_redirects=False)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/finance/login?next="), path
        for path in ANONYMOUS_POSTS:
            r = client.post(path, data={"reason": "x", "csrf_token": "x"}, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/finance/login"), path
        # A forged or tampered cookie is no session either.
        client.cookies.set(SESSION_COOKIE, "forged.0000", path="/finance")
        assert client.get("/finance/queue", follow_redirects=False).status_code == 303
        assert client.get("/finance/login").status_code == 200
        assert client.get("/finance/static/finance.css").headers["content-type"].startswith("text/css")


def test_login_sets_a_strict_cookie_and_logout_revokes_the_session(console):
    r = support.login(console)
    assert r.status_code == 303 and r.headers["location"] == "/finance/queue"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/finance" in cookie
    stolen = console.cookies.get(SESSION_COOKIE)
    assert console.get("/finance/queue").status_code == 200

    page = console.get("/finance/queue")
    r = console.post("/finance/logout", data={"csrf_token": support.hidden(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/finance/login"
    # The old cookie, replayed, is dead: the session row is revoked, not just the cookie dropped.
    console.cookies.set(SESSION_COOKIE, stolen, path="/finance")
    assert console.get("/finance/queue", follow_redirects=False).status_code == 303


def test_revoking_an_account_ends_its_sessions(console):
    support.login(console)
    assert console.get("/finance/queue").status_code == 200
    assert staff.revoke_sessions(support.OPERATOR) == 1
    assert console.get("/finance/queue", follow_redirects=False).status_code == 303


def test_wrong_password_is_refused_with_one_message(console):
    r = support.login(console, password="not the password")
    assert r.status_code == 401 and "Wrong email or password." in r.text
    r = support.login(console, email="nobody@example.com")
    assert r.status_code == 401 and "Wrong email or password." in r.text
    assert SESSION_COOKIE not in console.cookies


def test_the_login_form_needs_its_csrf_token(console):
    console.get("/finance/login")
    base = {"email": support.OPERATOR, "password": support.PASSWORD}
    assert console.post("/finance/login", data=base, follow_redirects=False).status_code == 403
    r = console.post("/finance/login", data={**base, "csrf_token": "guessed"}, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    # The cookie half alone is not enough either (the token must match it).
    console.cookies.delete(LOGIN_CSRF_COOKIE, path="/finance")
    page = console.get("/finance/login")
    token = support.hidden(page.text)
    console.cookies.delete(LOGIN_CSRF_COOKIE, path="/finance")
    assert console.post("/finance/login", data={**base, "csrf_token": token}).status_code == 403
    assert SESSION_COOKIE not in console.cookies


def test_actions_and_logout_refuse_a_wrong_csrf_token(console, jobs):
    cid = _seeded()["Ada Lovelace"]
    support.login(console)
    for token in ("", "not-the-token"):
        r = console.post(f"/finance/charges/{cid}/actions/pause_retries",
                         data={"csrf_token": token, "reason": "testing"}, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
        assert console.post("/finance/logout", data={"csrf_token": token}).status_code == 403
    assert _audit_count() == 0 and jobs.calls == []
    with unit_of_work() as uow:
        assert uow.session.get(Charge, cid).retry_paused is False
    # Another session's token does not fit this session either.
    other = TestClient(console.app)
    support.login(other)
    foreign = support.hidden(other.get(f"/finance/charges/{cid}").text)
    r = console.post(f"/finance/charges/{cid}/actions/pause_retries", data={"csrf_token": foreign, "reason": "x"})
    assert r.status_code == 403


def test_viewers_read_but_cannot_act(console, jobs):
    cid = _seeded()["Carl Gauss"]
    support.login(console, support.VIEWER)
    assert console.get("/finance/queue").status_code == 200
    assert console.get("/finance/overview").status_code == 200
    page = console.get(f"/finance/charges/{cid}")
    assert page.status_code == 200 and "needs the operator role" in page.text and "formaction" not in page.text
    token = support.hidden(page.text)
    for action in ("retry_now", "pause_retries", "resend_recovery_email", "void", "cancel_subscription"):
        r = console.post(f"/finance/charges/{cid}/actions/{action}", data={"csrf_token": token, "reason": "because"})
        assert r.status_code == 403, action
    assert _audit_count() == 0 and jobs.calls == []
    with unit_of_work() as uow:
        charge = uow.session.get(Charge, cid)
        assert (charge.status, charge.retry_paused) == ("requires_payment_method", False)


def test_failed_logins_slow_down_per_account(console):
    for _ in range(staff.ADDRESS_FAILURES_ALLOWED):
        assert support.login(console, password="wrong password!").status_code == 401
    # Now even the right password waits, and is told for how long.
    r = support.login(console)
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    assert 0 < int(r.headers["Retry-After"]) <= staff.FIRST_DELAY.total_seconds()
    # Another account from elsewhere is not affected.
    assert support.login(TestClient(console.app), support.VIEWER).status_code == 303
    # Once the delay has passed, the right password works again and clears the count.
    _age_failures(staff.FIRST_DELAY.total_seconds() + 1)
    assert support.login(console).status_code == 303
    with unit_of_work() as uow:
        assert uow.session.execute(text("SELECT count(*) FROM login_failures WHERE email = :e"),
                                   {"e": support.OPERATOR}).scalar_one() == 0


def test_the_delay_doubles_with_each_failure_past_the_threshold(accounts):
    ip = "198.51.100.7"
    for _ in range(staff.ADDRESS_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError):
            staff.authenticate(support.OPERATOR, "wrong password!", ip)
    first = staff.retry_after(support.OPERATOR, ip)
    assert 0 < first <= 30
    _age_failures(31)
    with pytest.raises(staff.StaffError, match="Wrong"):
        staff.authenticate(support.OPERATOR, "wrong again!!", ip)
    assert 30 < staff.retry_after(support.OPERATOR, ip) <= 60
    # While slowed down, attempts are refused unchecked and do not count.
    with pytest.raises(staff.TooManyAttempts):
        staff.authenticate(support.OPERATOR, support.PASSWORD, ip)
    with unit_of_work() as uow:
        assert uow.session.execute(text("SELECT count(*) FROM login_failures")).scalar_one() == 6


def test_guessing_from_one_address_does_not_lock_other_accounts_out(accounts):
    ip = "203.0.113.9"
    for n in range(staff.ACCOUNT_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError, match="Wrong"):
            staff.authenticate(f"guess{n}@example.com", "wrong password!", ip)
    # The guessed-at account from that address waits…
    for _ in range(staff.ADDRESS_FAILURES_ALLOWED):
        with pytest.raises(staff.StaffError, match="Wrong"):
            staff.authenticate(support.VIEWER, "wrong password!", ip)
    with pytest.raises(staff.TooManyAttempts):
        staff.authenticate(support.VIEWER, support.PASSWORD, ip)
    # …but a colleague behind the same (office) address signs in at once.
    assert staff.authenticate(support.OPERATOR, support.PASSWORD, ip)[0].email == support.OPERATOR


def _age_failures(seconds: float) -> None:
    with unit_of_work() as uow:
        uow.session.execute(text("UPDATE login_failures SET at = at - make_interval(secs => :s)"), {"s": seconds})
        uow.commit()
