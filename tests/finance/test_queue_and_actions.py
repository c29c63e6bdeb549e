"""The queue's filters, sort, pages and CSV against a seeded database; each action's rules and its
audit entry; the overview; ``billing queue`` with the same filters."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import select

from billing import charging, finance
from billing import queue as q
from billing.db import unit_of_work
from billing.models import AuditEntry, Charge, Notification, Subscription
from tests import factories
from tests.finance import support
from tests.integration.test_cli import run_billing

REASON = "customer called; agreed on the phone"


@pytest.fixture
def seeded(accounts):
    with unit_of_work() as uow:
        ids = support.seed_queue(uow.session)
        uow.commit()
    return ids


def _ids(html: str) -> list[int]:
    import re

    return [int(x) for x in re.findall(r'href="/finance/charges/(\d+)"', html)]


def _charge(cid: int) -> Charge:
    with unit_of_work() as uow:
        return uow.session.get(Charge, cid)


def test_queue_lists_open_charges_with_every_column(console, seeded):
    support.login(console)
    page = console.get("/finance/queue").text
    open_names = [s[0] for s in support.SEED if s[5] not in ("paid", "void")]
    assert sorted(_ids(page)) == sorted(seeded[n] for n in open_names)
    for text in ("Ada Lovelace", "ada.lovelace@example.com", "£49.00", "insufficient_funds",
                 "The card did not have enough funds available.", "prev. auth", "GB"):
        assert text in page, text
    # Default order: soonest retry first, charges without a retry after.
    rows = q.unpaid_charges()
    retries = [r.next_retry_at for r in rows if r.next_retry_at]
    assert retries == sorted(retries) and rows[-1].next_retry_at is None


@pytest.mark.parametrize(("params", "expected"), [
    ({"status": "authentication_required"}, ["Blaise Pascal", "Mary Somerville"]),
    ({"status": "void"}, ["Hedy Lamarr"]),
    ({"decline_code": "insufficient_funds"}, ["Ada Lovelace"]),
    ({"decline_code": "authentication_required"}, ["Blaise Pascal", "Mary Somerville"]),
    ({"country": "de"}, ["Carl Gauss", "Emmy Noether"]),
    ({"country": "US", "status": "requires_payment_method"}, ["Ida Rhodes"]),
])
def test_queue_filters(console, seeded, params, expected):
    support.login(console)
    r = console.get("/finance/queue", params=params)
    assert r.status_code == 200
    assert sorted(_ids(r.text)) == sorted(seeded[n] for n in expected)


def test_queue_date_range_and_bad_filters(console, seeded):
    support.login(console)
    today = datetime.now(UTC).date()
    r = console.get("/finance/queue", params={"date_from": (today - timedelta(days=3)).isoformat(),
                                              "date_to": today.isoformat()})
    expected = [s[0] for s in support.SEED if s[5] not in ("paid", "void") and s[9] <= 2]
    got = set(_ids(r.text))
    assert {seeded[n] for n in expected} <= got
    assert seeded["Carl Gauss"] not in got and seeded["Dorothy Vaughan"] not in got
    for bad in ({"status": "paid"}, {"country": "Germany"}, {"date_from": "31/01/2025"}, {"sort": "email"}):
        r = console.get("/finance/queue", params=bad)
        assert r.status_code == 400 and 'role="alert"' in r.text, bad


def test_queue_sort_and_pages_cover_every_row_once(console, accounts):
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session, country="DE")
        factories.make_payment_method(uow.session, customer, country="DE")
        sub = factories.make_subscription(uow.session, customer)
        base = datetime(2025, 3, 1, tzinfo=UTC)
        for i in range(120):
            factories.make_charge(uow.session, sub, period_index=i, status="requires_payment_method",
                                  amount=1000 + (i * 37) % 500, attempts=i % 5, created_at=base + timedelta(hours=i),
                                  next_retry_at=None if i % 10 == 0 else base + timedelta(days=30, hours=-i))
        uow.commit()
    support.login(console)
    for sort, direction in (("amount", "desc"), ("next_retry", "asc"), ("created", "asc"), ("attempts", "desc")):
        seen = []
        for page_no in (1, 2, 3):
            r = console.get("/finance/queue", params={"sort": sort, "direction": direction, "page": page_no})
            assert f"page {page_no} of 3" in r.text
            seen += _ids(r.text)
        assert len(seen) == len(set(seen)) == 120, sort
        with unit_of_work() as uow:
            charges = {c.id: c for c in uow.session.scalars(select(Charge))}
        key = {"amount": "amount", "next_retry": "next_retry_at", "created": "created_at", "attempts": "attempts"}[sort]
        values = [getattr(charges[i], key) for i in seen]
        present = [v for v in values if v is not None]
        assert present == sorted(present, reverse=direction == "desc"), sort
        if sort == "next_retry":
            assert all(v is None for v in values[-12:])  # nulls last ascending


def test_csv_export_follows_the_filter(console, seeded):
    support.login(console)
    r = console.get("/finance/queue.csv", params={"country": "GB"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sorted(int(x["charge_id"]) for x in rows) == sorted(seeded[n] for n in ("Ada Lovelace", "Mary Somerville"))
    ada = next(x for x in rows if x["customer_name"] == "Ada Lovelace")
    assert (ada["amount"], ada["currency"], ada["card_country"], ada["previous_authorization"]) == (
        "4900", "gbp", "GB", "True")
    assert ada["explanation"] == "The card did not have enough funds available."
    # The CSV is the queue: same rows as the page under the same filter.
    page = console.get("/finance/queue", params={"status": "requires_payment_method"})
    export = console.get("/finance/queue.csv", params={"status": "requires_payment_method"})
    assert [int(x["charge_id"]) for x in csv.DictReader(io.StringIO(export.text))] == _ids(page.text)


def test_csv_cells_cannot_become_formulas(console, accounts):
    with unit_of_work() as uow:
        customer = factories.make_customer(uow.session, name="=HYPERLINK(\"http://evil\")")
        factories.make_payment_method(uow.session, customer)
        factories.make_charge(uow.session, factories.make_subscription(uow.session, customer),
                              status="requires_payment_method")
        uow.commit()
    support.login(console)
    row = next(csv.DictReader(io.StringIO(console.get("/finance/queue.csv").text)))
    assert row["customer_name"].startswith("'=")


def test_each_action_changes_the_charge_and_is_audited(console, seeded, jobs):
    support.login(console)
    ada, carl, blaise = seeded["Ada Lovelace"], seeded["Carl Gauss"], seeded["Blaise Pascal"]
    with unit_of_work() as uow:
        factories_reminder = Notification(dedupe_key=f"charge-{carl}:reminder-1", kind="reminder",
                                          customer_id=uow.session.get(Subscription, _charge(carl).subscription_id)
                                          .customer_id, charge_id=carl, to_email="x@example.com", context={},
                                          status="pending", send_after=datetime.now(UTC) + timedelta(days=1))
        uow.session.add(factories_reminder)
        uow.commit()

    r = support.act(console, ada, "pause_retries", REASON)
    assert r.status_code == 303 and r.headers["location"].endswith("done=pause_retries")
    assert _charge(ada).retry_paused is True
    assert "Automatic retries are paused" in console.get(r.headers["location"]).text
    # Paused: the scheduled retry sweep passes it by, even long after its retry time…
    later = datetime.now(UTC) + timedelta(days=60)
    picked: list[int] = []
    charging.retry_due(now=later, enqueue=picked.append)
    assert ada not in picked and carl in picked
    # …and picks it up again once resumed.
    assert support.act(console, ada, "resume_retries", REASON).status_code == 303
    picked.clear()
    charging.retry_due(now=later, enqueue=picked.append)
    assert ada in picked

    assert support.act(console, ada, "retry_now", REASON).status_code == 303
    assert jobs.calls == [("retry_charge", ada)]

    assert support.act(console, blaise, "resend_recovery_email", REASON).status_code == 303
    assert support.act(console, blaise, "resend_recovery_email", "asked again").status_code == 303
    with unit_of_work() as uow:
        keys = uow.session.scalars(select(Notification.dedupe_key).where(Notification.charge_id == blaise,
                                                                          Notification.status == "pending")).all()
    assert len(keys) == 2 and len(set(keys)) == 2 and all(":resend-" in k for k in keys)
    assert jobs.calls[-2:] == [("relay_outbox",), ("relay_outbox",)]

    assert support.act(console, carl, "void", "written off: customer went bankrupt").status_code == 303
    carl_row = _charge(carl)
    assert (carl_row.status, carl_row.next_retry_at) == ("void", None)
    with unit_of_work() as uow:
        assert uow.session.scalar(select(Notification.status).where(
            Notification.dedupe_key == f"charge-{carl}:reminder-1")) == "dropped"

    assert support.act(console, ada, "cancel_subscription", REASON).status_code == 303
    with unit_of_work() as uow:
        assert uow.session.get(Subscription, _charge(ada).subscription_id).status == "canceled"

    with unit_of_work() as uow:
        entries = uow.session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.charge_id) for e in entries] == [
        ("pause_retries", ada), ("resume_retries", ada), ("retry_now", ada), ("resend_recovery_email", blaise),
        ("resend_recovery_email", blaise), ("void", carl), ("cancel_subscription", ada)]
    assert all(e.actor == support.OPERATOR and e.reason and e.subscription_id for e in entries)
    assert entries[3].details["dedupe_key"] in keys and entries[5].details["dropped_reminders"] == 1
    assert entries[5].reason == "written off: customer went bankrupt"
    # The detail page shows the staff actions in its timeline.
    page = console.get(f"/finance/charges/{ada}").text
    assert page.count("by olga.operator@example.com") == 4 and REASON in page


def test_refused_actions_change_nothing_and_write_no_audit(console, seeded, jobs):
    support.login(console)
    ada, dorothy, blaise = seeded["Ada Lovelace"], seeded["Dorothy Vaughan"], seeded["Blaise Pascal"]
    cases = [
        (ada, "void", "   ", "a written reason is required"),
        (dorothy, "retry_now", REASON, "the charge is uncollectible"),
        (blaise, "retry_now", REASON, "authenticate"),
        (ada, "resume_retries", REASON, "not paused"),
        (ada, "explode", REASON, "unknown action"),
    ]
    for cid, action, reason, words in cases:
        r = support.act(console, cid, action, reason)
        assert r.status_code == 409 and words in r.text, (action, r.text[:200])
    assert console.get("/finance/charges/999999").status_code == 404
    with unit_of_work() as uow:
        assert uow.session.scalars(select(AuditEntry)).all() == []
    assert jobs.calls == []
    # A charge being attempted right now is left alone.
    with charging.lease(ada) as ours:
        assert ours
        with pytest.raises(finance.ActionRefused, match="running"):
            finance.perform("void", ada, actor="x@example.com", reason="r", jobs=jobs)
    assert _charge(ada).status == "requires_payment_method"


def test_the_audit_log_cannot_be_rewritten(console, seeded, database_url):
    support.login(console)
    support.act(console, seeded["Ada Lovelace"], "pause_retries", REASON)
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        for stmt in ("UPDATE audit_log SET reason = 'nothing to see'", "DELETE FROM audit_log",
                     "TRUNCATE audit_log"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(stmt)
        assert conn.execute("SELECT reason FROM audit_log").fetchall() == [(REASON,)]


def test_overview_figures_and_charts(console, seeded):
    support.login(console)
    with unit_of_work() as uow:
        o = finance.overview(uow.session)
    totals = {(s, c): (n, a) for s, c, n, a in o.totals}
    assert totals[("requires_payment_method", "eur")] == (2, 2999 + 9900)
    decline = dict(o.by_decline)
    assert decline["insufficient_funds"] == {"recovered": 1, "waiting": 1, "lost": 0}
    assert decline["lost_card"]["lost"] == 1
    assert dict(o.by_country)["GB"] == {"recovered": 1, "waiting": 2, "lost": 0}
    assert dict((c, (n, a)) for c, n, a in o.previous_authorization) == {"eur": (1, 9900), "gbp": (2, 4900 + 1800)}
    assert sum(f for _, f, _ in o.weekly) == sum(1 for s in support.SEED if s[6])
    page = console.get("/finance/overview").text
    assert page.count("<svg") == 3 and "Recovery rate per week" in page and "£67.00" in page


def test_billing_queue_flags_and_json(base_env, seeded):
    rows = json.loads(run_billing("queue", "--json", "--country", "GB", env=base_env).stdout)
    assert sorted(r["customer_name"] for r in rows) == ["Ada Lovelace", "Mary Somerville"]
    ada = next(r for r in rows if r["customer_name"] == "Ada Lovelace")
    assert ada["previous_authorization"] is True and ada["explanation"].startswith("The card did not")
    assert ada["recovery_opened_at"] and ada["last_emailed_at"]
    by_amount = json.loads(run_billing("queue", "--json", "--sort", "amount", "--desc", env=base_env).stdout)
    assert [r["amount"] for r in by_amount] == sorted((r["amount"] for r in by_amount), reverse=True)
    void = json.loads(run_billing("queue", "--json", "--status", "void", env=base_env).stdout)
    assert [r["customer_name"] for r in void] == ["Hedy Lamarr"]
    limited = json.loads(run_billing("queue", "--json", "--limit", "3", env=base_env).stdout)
    assert len(limited) == 3
    table = run_billing("queue", "--decline-code", "do_not_honor", env=base_env)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if not set(line.strip()) <= {"─", " "}]
    assert lines[0].split()[:3] == ["charge", "customer", "amount"]
    assert len(lines) == 2 and "carl.gauss@example.com" in lines[1] and "do_not_honor" in lines[1]
    bad = run_billing("queue", "--country", "Germany", env=base_env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: country must be")
    none = run_billing("queue", "--country", "JP", env=base_env)
    assert none.stdout.strip() == "no charge matches these filters"
