"""The outbox contains its failures per row: one bad row never stops the others.

Against a real SMTP server (aiosmtpd, some of them refusing what a real server refuses) and the real
PostgreSQL. Bad rows are written straight into the database, past the API's validation, because
that is what an older row, an import or a bug elsewhere leaves behind.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text

from billing import notifications
from billing.dunning import NotificationKind
from billing.metrics import BacklogCollector
from billing.models import Notification, RecoveryToken
from billing.notifications import MAX_TRIES, relay_due
from tests.finance import support
from tests.integration.conftest import SmtpSink, free_port
from tests.integration.test_notifications import make_charge, put, rows

EVIL_NAME = "Eve Mallory\r\nBcc: victim@example.net\r\nX-Injected: yes"


def utcnow() -> datetime:
    return datetime.now(UTC)


class PickySink(SmtpSink):
    """An SMTP server with opinions: answers ``refuse[address]`` at RCPT for some mailboxes, and
    ``data_answers`` (one per message, in order) at DATA while there are any."""

    def __init__(self, refuse: dict[str, str] | None = None, data_answers: list[str] | None = None):
        super().__init__("127.0.0.1", free_port())
        self.refuse = refuse or {}
        self.data_answers = list(data_answers or [])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # aiosmtpd handler hook
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_answers:
            return self.data_answers.pop(0)
        return await super().handle_DATA(server, session, envelope)


@contextlib.contextmanager
def serving(sink: SmtpSink):
    from aiosmtpd.controller import Controller

    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


def three_charges(session_factory, *, bad_email: str | None = None) -> tuple[int, list[int]]:
    """A bad row first in line (its ``send_after`` earliest), then two good ones; (bad, [good, good])."""
    bad, _ = make_charge(session_factory, email=bad_email)
    good = [make_charge(session_factory)[0] for _ in range(2)]
    for charge_id in (bad, *good):
        put(session_factory, charge_id)
    with session_factory() as s:
        s.execute(text("UPDATE notifications SET send_after = send_after - interval '1 minute' "
                       "WHERE charge_id = :c"), {"c": bad})
        s.commit()
    return bad, good


def row_of(session_factory, charge_id: int) -> Notification:
    with session_factory() as s:
        return s.scalars(select(Notification).where(Notification.charge_id == charge_id)).one()


def tokens(session_factory, charge_id: int) -> int:
    with session_factory() as s:
        return s.scalar(select(func.count()).select_from(RecoveryToken).where(RecoveryToken.charge_id == charge_id))


def failures(stage: str, result: str) -> float:
    return REGISTRY.get_sample_value("billing_outbox_failures_total", {"stage": stage, "result": result}) or 0.0


def to_addresses(message) -> list[str]:
    return [a.addr_spec for a in message["To"].addresses]


# ---------------------------------------------------------------------------------- a CR/LF in a name

def test_a_crlf_name_cannot_stop_other_mail_nor_add_a_header(clean_db, session_factory, smtp_server):
    three_charges(session_factory, bad_email="eve@example.org")
    with session_factory() as s:  # past the API's validation, as an old or imported row would be
        s.execute(text("UPDATE customers SET name = :n WHERE email = 'eve@example.org'"), {"n": EVIL_NAME})
        s.commit()

    result = relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=smtp_server.url,
                       session_factory=session_factory)

    # The name is display text: cleaned, and the customer still gets their email, to their address only.
    assert (result.sent, result.failed, result.dead) == (3, 0, 0)
    messages = smtp_server.wait_for(3)
    eve = next(m for m in messages if "eve@example.org" in str(m["To"]))
    assert to_addresses(eve) == ["eve@example.org"]
    # Control characters become spaces and RFC 5322 specials are taken out: one phrase before one address.
    assert eve["To"].addresses[0].display_name == "Eve Mallory Bcc victim example.net X-Injected yes"
    for message in messages:
        assert message["Bcc"] is None and message["X-Injected"] is None
        assert "victim@example.net" not in to_addresses(message)
    assert {r.status for r in rows(session_factory)} == {"sent"}


# ------------------------------------------------------------- an address no header can hold: dead at N

def test_an_unsafe_address_backs_off_then_dies_and_the_others_go_out(clean_db, session_factory, smtp_server,
                                                                      database_url):
    bad, good = three_charges(session_factory, bad_email="ada@example.org")
    with session_factory() as s:
        s.execute(text("UPDATE notifications SET to_email = :e WHERE charge_id = :c"),
                  {"e": "ada@example.org\r\nBcc: victim@example.net", "c": bad})
        s.commit()
    retry_before, dead_before = failures("build", "retry"), failures("build", "dead")

    t0 = utcnow() + timedelta(seconds=1)
    first = relay_due(now=t0, smtp_url=smtp_server.url, session_factory=session_factory)

    assert (first.sent, first.failed, first.dead) == (2, 1, 0)
    assert sorted(a for m in smtp_server.wait_for(2) for a in to_addresses(m)) == sorted(
        {row_of(session_factory, c).to_email for c in good})
    row = row_of(session_factory, bad)
    assert (row.status, row.tries) == ("pending", 1)
    assert row.send_after == t0 + notifications.BACKOFF_BASE
    assert row.last_error == "build: the address has control characters or spaces"
    assert tokens(session_factory, bad) == 0  # the link went with the email that was never sent
    assert all(tokens(session_factory, c) == 1 for c in good)

    # Each later run tries it once more, backing off further, until it is given up.
    for tries in range(2, MAX_TRIES + 1):
        at = row.send_after
        assert relay_due(now=at - timedelta(seconds=1), smtp_url=smtp_server.url,
                         session_factory=session_factory) == notifications.RelayResult()  # not due yet
        result = relay_due(now=at, smtp_url=smtp_server.url, session_factory=session_factory)
        row = row_of(session_factory, bad)
        assert row.tries == tries
        if tries < MAX_TRIES:
            assert (result.failed, result.dead, row.status) == (1, 0, "pending")
            assert row.send_after == at + notifications._backoff(tries)
        else:
            assert (result.failed, result.dead, row.status) == (0, 1, "dead")

    assert relay_due(now=row.send_after + timedelta(days=30), smtp_url=smtp_server.url,
                     session_factory=session_factory) == notifications.RelayResult()
    assert len(smtp_server.messages) == 2  # each good row once, the bad one never
    assert "victim" not in row.last_error and "ada@" not in row.last_error
    assert failures("build", "retry") == retry_before + MAX_TRIES - 1
    assert failures("build", "dead") == dead_before + 1
    _dead_rows_are_visible(bad, database_url)


def _dead_rows_are_visible(charge_id: int, database_url: str) -> None:
    """Staff see it: a count on the overview, the row on the charge's timeline, and a gauge."""
    gauges = {m.name: m.samples[0].value for m in BacklogCollector("billing").collect() if m.samples}
    assert gauges["billing_outbox_dead"] == 1

    from billing.web.finance import create_finance_app

    support.truncate_staff(database_url)
    support.add_accounts()
    app = FastAPI()
    app.mount("/finance", create_finance_app())
    with TestClient(app) as client:
        assert support.login(client).status_code == 303
        overview = client.get("/finance/overview")
        assert overview.status_code == 200
        assert "Emails given up: <strong>1</strong>" in overview.text
        timeline = client.get(f"/finance/charges/{charge_id}")
        assert "Email given up: payment_failed" in timeline.text
        assert f"not sent after {MAX_TRIES} tries" in timeline.text


# ------------------------------------------------------------------------- a template that cannot render

def test_a_row_that_cannot_render_fails_alone(clean_db, session_factory, smtp_server):
    bad, _ = three_charges(session_factory)
    with session_factory() as s:
        s.execute(text("""UPDATE notifications SET context = jsonb_set(context, '{amount}', '"lots"')
                          WHERE charge_id = :c"""), {"c": bad})
        s.commit()

    result = relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=smtp_server.url,
                       session_factory=session_factory)

    assert (result.sent, result.failed) == (2, 1)
    assert len(smtp_server.wait_for(2)) == 2
    row = row_of(session_factory, bad)
    assert (row.status, row.tries) == ("pending", 1) and row.last_error.startswith("render: ")
    assert tokens(session_factory, bad) == 0


# ------------------------------------------------------------------------- the server refuses a recipient

def test_a_refused_mailbox_is_dead_at_once_and_the_others_are_delivered(clean_db, session_factory):
    sink = PickySink(refuse={"gone@example.org": "550 5.1.1 <gone@example.org>: Recipient address rejected"})
    bad, _ = three_charges(session_factory, bad_email="gone@example.org")
    dead_before = failures("smtp", "dead")

    with serving(sink):
        result = relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=sink.url, session_factory=session_factory)
        messages = sink.wait_for(2)

    assert (result.sent, result.failed, result.dead) == (2, 0, 1)
    assert "gone@example.org" not in [a for m in messages for a in to_addresses(m)]
    row = row_of(session_factory, bad)
    assert (row.status, row.tries) == ("dead", 1)
    assert row.last_error == "smtp: SMTPRecipientsRefused 550 5.1.1"  # codes only: the address is not kept
    assert tokens(session_factory, bad) == 0
    assert failures("smtp", "dead") == dead_before + 1


def test_a_temporary_refusal_backs_off_and_is_delivered_later(clean_db, session_factory):
    sink = PickySink(refuse={"busy@example.org": "450 4.2.1 Mailbox busy, try later"})
    bad, _ = three_charges(session_factory, bad_email="busy@example.org")
    t0 = utcnow() + timedelta(seconds=1)

    with serving(sink):
        first = relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory)
        assert (first.sent, first.failed, first.dead) == (2, 1, 0)
        row = row_of(session_factory, bad)
        assert (row.status, row.tries, row.last_error) == ("pending", 1, "smtp: SMTPRecipientsRefused 450 4.2.1")
        sink.refuse.clear()
        assert relay_due(now=row.send_after, smtp_url=sink.url, session_factory=session_factory).sent == 1
        messages = sink.wait_for(3)

    assert len(messages) == 3
    assert (row_of(session_factory, bad).status, row_of(session_factory, bad).tries) == ("sent", 2)


def test_a_misconfigured_relay_is_not_a_dead_mailbox(clean_db, session_factory):
    """5.7.1 "relay access denied" is the server's configuration, the same for every row: rows back off
    (and are seen failing) instead of all dying in one run."""
    sink = PickySink()
    for charge_id in [make_charge(session_factory)[0] for _ in range(3)]:
        put(session_factory, charge_id)
    with session_factory() as s:
        sink.refuse = {e: "554 5.7.1 Relay access denied" for e in s.scalars(select(Notification.to_email))}

    with serving(sink):
        result = relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=sink.url, session_factory=session_factory)

    assert (result.sent, result.failed, result.dead) == (0, 3, 0)
    assert {(r.status, r.tries) for r in rows(session_factory)} == {("pending", 1)}


# ------------------------------------------------------------------------------------ the server is away

def test_smtp_down_marks_nothing_and_each_row_goes_out_exactly_once_when_back(clean_db, session_factory):
    sink = PickySink()
    for _ in range(5):
        put(session_factory, make_charge(session_factory)[0])
    t0 = utcnow() + timedelta(seconds=1)

    # A long night without a mail server: runs every few minutes, far more of them than MAX_TRIES.
    for n in range(MAX_TRIES * 2):
        down = relay_due(now=t0 + timedelta(minutes=5 * n), smtp_url=sink.url, session_factory=session_factory)
        assert (down.sent, down.failed, down.dead) == (0, 1, 0)
    assert {(r.status, r.tries, r.last_error) for r in rows(session_factory)} == {("pending", 0, None)}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(RecoveryToken)) == 0

    later = t0 + timedelta(hours=8)
    with serving(sink):
        assert relay_due(now=later, smtp_url=sink.url, session_factory=session_factory).sent == 5
        assert relay_due(now=later + timedelta(days=1), smtp_url=sink.url, session_factory=session_factory).sent == 0
        messages = sink.wait_for(5)

    assert len(messages) == 5 and len({m["Message-ID"] for m in messages}) == 5
    assert {(r.status, r.tries) for r in rows(session_factory)} == {("sent", 1)}


def test_a_server_closing_the_channel_charges_no_row(clean_db, session_factory):
    """421 at DATA ("service not available, closing transmission channel") is the server's state."""
    sink = PickySink(data_answers=["421 4.3.2 Shutting down"])
    for _ in range(3):
        put(session_factory, make_charge(session_factory)[0])
    t0 = utcnow() + timedelta(seconds=1)

    with serving(sink):
        stopped = relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory)
        assert (stopped.sent, stopped.failed, stopped.dead) == (0, 1, 0)
        assert {(r.status, r.tries) for r in rows(session_factory)} == {("pending", 0)}
        assert relay_due(now=t0, smtp_url=sink.url, session_factory=session_factory).sent == 3
        assert len(sink.wait_for(3)) == 3


def test_an_invalid_sender_tries_nothing(clean_db, session_factory, smtp_server, monkeypatch):
    put(session_factory, make_charge(session_factory)[0])
    from billing.settings import get_settings

    monkeypatch.setattr(get_settings(), "mail_from", "billing@example.com\r\nBcc: everyone@example.net")
    assert relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=smtp_server.url,
                     session_factory=session_factory) == notifications.RelayResult()
    assert [(r.status, r.tries) for r in rows(session_factory)] == [("pending", 0)]


# --------------------------------------------------------------- an email about a charge that moved on

@pytest.mark.parametrize(("kind", "was", "now_is"), [
    (NotificationKind.payment_failed, "requires_payment_method", "paid"),
    (NotificationKind.authentication_required, "authentication_required", "paid"),
    (NotificationKind.final_notice, "uncollectible", "paid"),
    (NotificationKind.reminder, "authentication_required", "paid"),
    (NotificationKind.payment_failed, "requires_payment_method", "void"),
    (NotificationKind.final_notice, "uncollectible", "void"),
])
def test_an_email_about_a_charge_that_moved_on_is_dropped(clean_db, session_factory, smtp_server, kind, was,
                                                          now_is):
    charge_id, _ = make_charge(session_factory, status=was)
    put(session_factory, charge_id, kind)
    with session_factory() as s:  # paid from a page opened earlier, written off by staff, held for review
        s.execute(text("UPDATE charges SET status = :s WHERE id = :c"), {"s": now_is, "c": charge_id})
        s.commit()

    result = relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=smtp_server.url,
                       session_factory=session_factory)

    assert (result.sent, result.dropped) == (0, 1)
    assert [r.status for r in rows(session_factory)] == ["dropped"]
    assert tokens(session_factory, charge_id) == 0
    assert smtp_server.messages == []


def test_an_email_about_a_charge_held_for_staff_waits_and_goes_out_when_it_waits_on_the_customer_again(
        clean_db, session_factory, smtp_server):
    """Held for review (a staff retry that Stripe refused): the failure email is neither true nor false
    yet, so it is kept, not dropped; once the charge waits on the customer again it is sent."""
    charge_id, _ = make_charge(session_factory, status="requires_payment_method")
    put(session_factory, charge_id, NotificationKind.payment_failed)
    with session_factory() as s:
        s.execute(text("UPDATE charges SET status = 'needs_review' WHERE id = :c"), {"c": charge_id})
        s.commit()
    now = utcnow() + timedelta(seconds=1)
    held = relay_due(now=now, smtp_url=smtp_server.url, session_factory=session_factory)
    assert (held.sent, held.dropped) == (0, 0)
    assert [r.status for r in rows(session_factory)] == ["pending"] and smtp_server.messages == []
    with session_factory() as s:
        s.execute(text("UPDATE charges SET status = 'requires_payment_method' WHERE id = :c"), {"c": charge_id})
        notifications.release_held(s, charge_id, now)
        s.commit()
    assert relay_due(now=now, smtp_url=smtp_server.url, session_factory=session_factory).sent == 1


def test_a_failure_email_still_goes_out_while_a_retry_is_in_flight(clean_db, session_factory, smtp_server):
    """The retry's own failure is not emailed again, so dropping this one would leave the customer
    never told."""
    charge_id, _ = make_charge(session_factory, status="requires_payment_method")
    put(session_factory, charge_id, NotificationKind.payment_failed)
    with session_factory() as s:
        s.execute(text("UPDATE charges SET status = 'processing' WHERE id = :c"), {"c": charge_id})
        s.commit()
    assert relay_due(now=utcnow() + timedelta(seconds=1), smtp_url=smtp_server.url,
                     session_factory=session_factory).sent == 1


def test_one_rule_covers_every_kind():
    assert set(notifications.STILL_TRUE) == {k.value for k in NotificationKind}
