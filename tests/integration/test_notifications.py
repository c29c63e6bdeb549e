"""The outbox relay against a real SMTP server (aiosmtpd) and the real PostgreSQL."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import notifications
from billing.dunning import DunningConfig, NotificationKind, decide
from billing.models import Charge, Customer, Notification, RecoveryToken, Subscription
from billing.notifications import enqueue, relay_due
from billing.outcomes import OutcomeKind, PaymentOutcome
from tests import factories
from tests.integration.conftest import SmtpSink, free_port

LINK = re.compile(r"http://billing\.test/recover/([A-Za-z0-9_-]+)")


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_charge(session_factory, *, amount=1999, currency="eur", status="requires_payment_method",
                email=None, **charge_kw) -> tuple[int, int]:
    with session_factory() as s:
        customer = factories.make_customer(s, name="Ada Lovelace", **({"email": email} if email else {}))
        factories.make_payment_method(s, customer, brand="mastercard", last4="4444")
        sub = factories.make_subscription(s, customer, amount=amount, currency=currency)
        charge = factories.make_charge(s, sub, status=status, **charge_kw)
        s.commit()
        return charge.id, customer.id


def put(session_factory, charge_id, kind=NotificationKind.payment_failed, key=None, **kw) -> bool:
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        customer = s.get(Customer, s.get(Subscription, charge.subscription_id).customer_id)
        written = enqueue(s, kind=kind, charge=charge, customer=customer,
                          dedupe_key=key or f"charge-{charge_id}:attempt-1:{kind}", **kw)
        s.commit()
        return written


def rows(session_factory) -> list[Notification]:
    with session_factory() as s:
        return list(s.scalars(select(Notification).order_by(Notification.id)))


def relay(session_factory, smtp, **kw):
    kw.setdefault("now", utcnow() + timedelta(seconds=1))
    return relay_due(smtp_url=smtp.url, session_factory=session_factory, **kw)


def parts(msg):
    text = msg.get_body(preferencelist=("plain",)).get_content()
    html = msg.get_body(preferencelist=("html",)).get_content()
    return text, html


# --------------------------------------------------------------------------------------------- content

def test_payment_failed_email(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, last_decline_code="insufficient_funds",
                               last_error_code="card_declined", email="ada@example.org")
    assert put(session_factory, charge_id)

    result = relay(session_factory, smtp_server)

    assert result.sent == 1 and result.failed == 0
    (msg,) = smtp_server.wait_for(1)
    assert msg["To"].addresses[0].addr_spec == "ada@example.org"
    assert msg["From"].addresses[0].addr_spec == "billing@example.com"
    assert "update your card" in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"
    text, html = parts(msg)
    token = LINK.search(text).group(1)
    assert f"http://billing.test/recover/{token}" in html
    for body in (text, html):
        assert "€19.99" in body
        assert "enough funds" in body
        assert "4444" in body
        assert "Ada Lovelace" in body
    assert msg["Message-ID"] == notifications.message_id(f"charge-{charge_id}:attempt-1:payment_failed",
                                                         "billing@example.com")
    with session_factory() as s:
        (tok,) = s.scalars(select(RecoveryToken)).all()
        # The link's token is a live recovery token for this charge; only its hash rests in the database.
        assert tok.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert tok.charge_id == charge_id and tok.purpose == "recover"
        row = s.scalars(select(Notification)).one()
        assert row.status == "sent" and row.tries == 1 and row.sent_at is not None
        assert token not in str(row.context)
        assert s.get(Charge, charge_id).notified_at == row.sent_at


def test_zero_decimal_currency(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, amount=1500, currency="jpy")
    put(session_factory, charge_id)
    relay(session_factory, smtp_server)
    text, html = parts(smtp_server.wait_for(1)[0])
    assert "¥1,500" in text and "¥1,500" in html
    assert "15.00" not in text


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (1999, "eur", "€19.99"), (5, "usd", "$0.05"), (123456, "gbp", "£1,234.56"), (1500, "JPY", "¥1,500"),
    (100000, "krw", "100,000 KRW"), (1234, "kwd", "1.234 KWD"), (2500, "chf", "25.00 CHF")])
def test_format_amount(amount, currency, shown):
    assert notifications.format_amount(amount, currency) == shown


def test_authentication_required_email(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, status="authentication_required")
    put(session_factory, charge_id, NotificationKind.authentication_required)
    relay(session_factory, smtp_server)
    msg = smtp_server.wait_for(1)[0]
    assert "authenticate your payment" in msg["Subject"].lower()
    text, html = parts(msg)
    assert LINK.search(text) and LINK.search(html)
    assert "Authenticate your payment" in html


def test_reminder_follows_the_charge(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, status="authentication_required")
    put(session_factory, charge_id, NotificationKind.reminder, key="r1")
    relay(session_factory, smtp_server)
    text, _ = parts(smtp_server.wait_for(1)[0])
    assert "authenticate" in text and LINK.search(text)


def test_final_notice_has_no_link(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, status="uncollectible")
    put(session_factory, charge_id, NotificationKind.final_notice)
    relay(session_factory, smtp_server)
    msg = smtp_server.wait_for(1)[0]
    text, html = parts(msg)
    assert "Final notice" in msg["Subject"]
    assert "/recover/" not in text and "/recover/" not in html
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(RecoveryToken)) == 0


def test_html_is_escaped(clean_db, session_factory, smtp_server):
    charge_id, customer_id = make_charge(session_factory)
    with session_factory() as s:
        s.get(Customer, customer_id).name = "<script>x</script>"
        s.commit()
    put(session_factory, charge_id)
    relay(session_factory, smtp_server)
    text, html = parts(smtp_server.wait_for(1)[0])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>x</script>" in text


def test_context_refuses_secrets(clean_db, session_factory):
    charge_id, _ = make_charge(session_factory)
    for key in ("token", "recovery_link", "client_secret", "url"):
        with pytest.raises(ValueError, match="links are made at send time"):
            put(session_factory, charge_id, context={key: "x"})
    assert rows(session_factory) == []


# ---------------------------------------------------------------------------------------------- dedupe

def test_enqueue_twice_one_row_one_email(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory)
    assert put(session_factory, charge_id) is True
    assert put(session_factory, charge_id) is False
    assert len(rows(session_factory)) == 1
    assert relay(session_factory, smtp_server).sent == 1
    assert relay(session_factory, smtp_server).sent == 0
    assert put(session_factory, charge_id) is False  # even after it was sent
    assert relay(session_factory, smtp_server).sent == 0
    assert len(smtp_server.wait_for(1)) == 1


def test_enqueue_in_a_failed_transaction_writes_nothing(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory)
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        customer = s.get(Customer, s.get(Subscription, charge.subscription_id).customer_id)
        enqueue(s, kind=NotificationKind.payment_failed, charge=charge, customer=customer, dedupe_key="k")
        s.rollback()
    assert rows(session_factory) == []


def test_enqueue_decision_writes_failure_and_reminders_once(clean_db, session_factory):
    charge_id, _ = make_charge(session_factory, status="authentication_required")
    now = utcnow()
    decision = decide(PaymentOutcome(OutcomeKind.authentication_required), failures=1, first_failed_at=None,
                      now=now, config=DunningConfig())
    for _ in range(2):  # a redelivered task
        with session_factory() as s:
            charge = s.get(Charge, charge_id)
            customer = s.get(Customer, s.get(Subscription, charge.subscription_id).customer_id)
            notifications.enqueue_decision(s, decision, charge=charge, customer=customer, attempt_number=1)
            s.commit()
    got = rows(session_factory)
    assert [r.kind for r in got] == ["authentication_required", "reminder", "reminder", "reminder"]
    assert [r.send_after for r in got[1:]] == list(decision.reminders)


# ------------------------------------------------------------------------------------ SMTP down and up

def test_smtp_down_then_up_sends_each_row_once(clean_db, session_factory):
    from aiosmtpd.controller import Controller

    sink = SmtpSink("127.0.0.1", free_port())
    t0 = utcnow() + timedelta(seconds=1)
    first, _ = make_charge(session_factory)
    second, _ = make_charge(session_factory)
    put(session_factory, first)
    put(session_factory, second)

    before = [(r.send_after, r.tries) for r in rows(session_factory)]
    for _ in range(3):  # a long outage: the relay keeps trying, every run stops at the first row
        down = relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory)
        assert (down.sent, down.failed, down.dead) == (0, 1, 0)

    # An outage is not the rows' fault: nothing is charged a try, nothing backs off or dies.
    assert [(r.send_after, r.tries) for r in rows(session_factory)] == before
    assert {r.status for r in rows(session_factory)} == {"pending"}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(RecoveryToken)) == 0  # deleted with the unsent email

    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        assert relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory).sent == 2
        assert relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory).sent == 0
        messages = sink.wait_for(2)
    finally:
        controller.stop()
    assert len(messages) == 2
    assert len({m["Message-ID"] for m in messages}) == 2
    assert [(r.status, r.tries, r.last_error) for r in rows(session_factory)] == [("sent", 1, None)] * 2


def test_backoff_grows_and_is_capped():
    assert notifications._backoff(1) == timedelta(minutes=1)
    assert notifications._backoff(2) == timedelta(minutes=2)
    assert notifications._backoff(5) == timedelta(minutes=16)
    assert notifications._backoff(30) == notifications.BACKOFF_CAP


class Crash(BaseException):
    """The process dies: no exception handler runs, the transaction is never committed."""


def test_crash_after_smtp_resends_with_the_same_message_id(clean_db, session_factory, smtp_server, monkeypatch):
    charge_id, _ = make_charge(session_factory)
    put(session_factory, charge_id)
    real = notifications._mark_sent

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(notifications, "_mark_sent", crash)
    with pytest.raises(Crash):
        relay(session_factory, smtp_server)
    assert rows(session_factory)[0].status == "pending"
    monkeypatch.setattr(notifications, "_mark_sent", real)
    # Leased while it was being sent: not picked up again at once (another relay may still be
    # sending it), but as soon as the lease runs out.
    assert relay(session_factory, smtp_server).sent == 0
    assert relay(session_factory, smtp_server,
                 now=utcnow() + notifications.SEND_LEASE + timedelta(seconds=2)).sent == 1
    first, second = smtp_server.wait_for(2)
    assert first["Message-ID"] == second["Message-ID"]
    assert rows(session_factory)[0].status == "sent"


# ------------------------------------------------------------------------------------------ concurrency

def test_concurrent_relays_never_send_a_row_twice(clean_db, session_factory, smtp_server):
    count = 30
    for _ in range(count):
        charge_id, _ = make_charge(session_factory)
        put(session_factory, charge_id)
    results = []
    start = threading.Barrier(4)

    def run():
        start.wait()
        results.append(relay(session_factory, smtp_server))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert sum(r.sent for r in results) == count and sum(r.failed for r in results) == 0
    messages = smtp_server.wait_for(count)
    assert len(messages) == count
    assert len({m["Message-ID"] for m in messages}) == count
    assert {r.status for r in rows(session_factory)} == {"sent"}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(RecoveryToken)) == count


# -------------------------------------------------------------------------------------------- reminders

def test_reminders_dropped_on_success(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, status="authentication_required")
    soon = utcnow() + timedelta(days=1)
    put(session_factory, charge_id, NotificationKind.authentication_required)
    for i in (1, 2):
        put(session_factory, charge_id, NotificationKind.reminder, key=f"charge-{charge_id}:reminder-{i}",
            send_after=soon + timedelta(days=i))
    assert relay(session_factory, smtp_server).sent == 1

    with session_factory() as s:
        s.get(Charge, charge_id).status = "paid"
        assert notifications.drop_pending_reminders(s, charge_id) == 2
        s.commit()

    assert relay(session_factory, smtp_server, now=soon + timedelta(days=30)).sent == 0
    assert [r.status for r in rows(session_factory)] == ["sent", "dropped", "dropped"]
    assert len(smtp_server.wait_for(1)) == 1


def test_due_reminder_for_a_settled_charge_is_dropped_at_send_time(clean_db, session_factory, smtp_server):
    charge_id, _ = make_charge(session_factory, status="paid")
    put(session_factory, charge_id, NotificationKind.reminder, key="r")
    result = relay(session_factory, smtp_server)
    assert (result.sent, result.dropped) == (0, 1)
    assert rows(session_factory)[0].status == "dropped"
    assert smtp_server.messages == []


def test_paid_decision_drops_reminders(clean_db, session_factory):
    charge_id, _ = make_charge(session_factory, status="authentication_required")
    put(session_factory, charge_id, NotificationKind.reminder, key="r", send_after=utcnow() + timedelta(days=1))
    paid = decide(PaymentOutcome(OutcomeKind.succeeded), failures=2, first_failed_at=utcnow(), now=utcnow(),
                  config=DunningConfig())
    with session_factory() as s:
        charge = s.get(Charge, charge_id)
        customer = s.get(Customer, s.get(Subscription, charge.subscription_id).customer_id)
        assert notifications.enqueue_decision(s, paid, charge=charge, customer=customer, attempt_number=2) == 0
        s.commit()
    assert rows(session_factory)[0].status == "dropped"


# ------------------------------------------------------------------------------------------------- logs

def test_logs_never_carry_the_token_or_link(clean_db, session_factory, smtp_server, caplog):
    charge_id, _ = make_charge(session_factory)
    put(session_factory, charge_id)
    with caplog.at_level(logging.DEBUG):
        relay(session_factory, smtp_server)
    token = LINK.search(parts(smtp_server.wait_for(1)[0])[0]).group(1)
    sent = [r for r in caplog.records if r.getMessage() == "notification sent"]
    assert sent and sent[0].charge_id == charge_id and sent[0].notification_id
    ours = [r for r in caplog.records if r.name.startswith("billing")]  # not the test SMTP server's own log
    assert ours
    for record in ours:
        dump = f"{record.getMessage()} {record.__dict__}"
        assert token not in dump and "/recover/" not in dump


def test_smtps_url_uses_tls(monkeypatch):
    used = []

    class FakeSSL:
        def __init__(self, host, port, timeout):
            used.append((host, port))

        def send_message(self, msg):
            pass

        def quit(self):
            pass

    monkeypatch.setattr(notifications.smtplib, "SMTP_SSL", FakeSSL)
    mailer = notifications._Mailer("smtps://mail.example.com")
    mailer.send(notifications.EmailMessage())
    mailer.close()
    assert used == [("mail.example.com", 465)]
