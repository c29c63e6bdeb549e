"""Email headers built from what customers typed: a name cannot add a header, an address is refused
rather than repaired, and nothing about an address reaches ``last_error``."""

from __future__ import annotations

import email
import email.policy
import smtplib
from datetime import UTC, datetime

import pytest

from billing import notifications
from billing.models import Customer, Notification
from billing.notifications import RenderedEmail, Unsendable, build_message, header_text, mailbox
from billing.settings import Settings


@pytest.mark.parametrize(("raw", "clean"), [
    ("Ada Lovelace", "Ada Lovelace"),
    ("Eve\r\nBcc: victim@example.net", "Eve Bcc: victim@example.net"),
    ("Nul\x00Byte", "Nul Byte"),
    ("Line\u2028Separator\u2029Para", "Line Separator Para"),
    ("  many \t spaces\n", "many spaces"),
    ("C1\x85control", "C1 control"),
    ("Zoë Ñuñez 山田", "Zoë Ñuñez 山田"),
    (None, ""),
])
def test_header_text_turns_control_characters_into_spaces(raw, clean):
    assert header_text(raw) == clean


@pytest.mark.parametrize("address", [
    "ada@example.org\r\nBcc: victim@example.net", "ada@example.org\n", "ada\x00@example.org",
    "ada @example.org", "not-an-address", "ada@", "@example.org", "a@b@c", "a@example.org>, b@example.net",
    "<a@example.org>", "",
])
def test_an_address_a_header_cannot_hold_is_refused(address):
    with pytest.raises(Unsendable) as refused:
        mailbox("Ada", address)
    # Fixed words: the refusal goes to last_error and logs, which never carry an address.
    assert str(refused.value) in {"the address has control characters or spaces",
                                  "the address is not a valid email address"}


def _message(name: str, to: str):
    row = Notification(dedupe_key="k", to_email=to)
    customer = Customer(name=name, email=to)
    rendered = RenderedEmail(subject="Your payment\r\nBcc: x@example.net", text="hello", html="<p>hello</p>")
    return build_message(row, customer, rendered, settings=Settings(), now=datetime(2026, 1, 1, tzinfo=UTC))


def test_a_hostile_name_stays_inside_the_display_name():
    message = _message("Eve\r\nBcc: victim@example.net\nX-Evil: 1", "eve@example.org")
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert [a.addr_spec for a in parsed["To"].addresses] == ["eve@example.org"]
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None
    assert parsed["Subject"] == "Your payment Bcc: x@example.net"
    assert b"\r\nBcc:" not in message.as_bytes() and b"\nBcc:" not in message.as_bytes()


def test_an_unsafe_address_refuses_the_whole_message():
    with pytest.raises(Unsendable):
        _message("Ada", "ada@example.org\r\nBcc: victim@example.net")


def test_smtp_failures_are_recorded_by_class_and_code_only():
    refused = smtplib.SMTPRecipientsRefused({"gone@example.org": (550, b"5.1.1 <gone@example.org> unknown")})
    failure = notifications._Failure.of("smtp", refused)
    assert (failure.reason, failure.permanent) == ("smtp: SMTPRecipientsRefused 550 5.1.1", True)
    data = smtplib.SMTPDataError(554, b"5.7.1 message from ada@example.org rejected as spam")
    assert notifications._Failure.of("smtp", data) == notifications._Failure(
        "smtp", "smtp: SMTPDataError 554 5.7.1", permanent=False)


@pytest.mark.parametrize(("code", "text", "permanent"), [
    (550, b"5.1.1 no such user", True), (553, b"5.1.3 bad address syntax", True),
    (552, b"5.2.2 mailbox full", True), (550, b"no such user", True),
    (554, b"5.7.1 Relay access denied", False), (550, b"5.7.1 Unable to relay", False),
    (450, b"4.2.1 busy", False), (451, b"4.3.0 try later", False), (554, b"relay denied", False),
])
def test_only_the_mailbox_refused_for_good_is_permanent(code, text, permanent):
    assert notifications._is_permanent(smtplib.SMTPRecipientsRefused({"a@example.org": (code, text)})) is permanent
