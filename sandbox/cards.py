"""Stripe's documented test cards, one row per card, and how each behaves.

Sources (all rows are taken from these pages; the link of each behaviour sits on its row):

* https://docs.stripe.com/testing#cards                       -- brands (4242…, 5555…, 3782…)
* https://docs.stripe.com/testing#international-cards         -- one card per issuing country
* https://docs.stripe.com/testing#declined-payments           -- decline cards and their codes
* https://docs.stripe.com/testing#authentication-and-setup    -- regulatory (SCA) cards
* https://docs.stripe.com/testing#three-ds-cards              -- 3-D Secure cards
* https://docs.stripe.com/declines/codes                      -- decline_code meanings
* https://docs.stripe.com/declines/card#retrying-issuer-declines -- advice_code values

Where Stripe does not document a detail that the API must still return, the choice made is
written down here:

* ``card.country`` of the regulatory cards (40000025…, 40000027…, 40000038…, 40000082…) is not
  listed; it follows the issuing-country digits they share with the international cards
  (250 FR, 276 DE, 380 IT, 826 GB).
* ``advice_code`` is documented as one of ``try_again_later``, ``do_not_try_again``,
  ``confirm_card_data``; test cards are not documented to carry one, so each decline here gets the
  value that its decline code's "next steps" column describes (lost/stolen → do not try again,
  insufficient funds/processing error → try again later, incorrect CVC → confirm card data) and
  none where the next step is unspecified (generic decline, expired card).
* A decline card (other than 4000000000000341) is declined when attached to a customer or set up:
  the docs single out 4000000000000341 as the card whose "attaching … succeeds, but attempts to
  charge the customer fail", which means the others fail at attach time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

TESTING_URL = "https://docs.stripe.com/testing"
DECLINES_URL = "https://docs.stripe.com/testing#declined-payments"
AUTH_URL = "https://docs.stripe.com/testing#authentication-and-setup"
THREE_DS_URL = "https://docs.stripe.com/testing#three-ds-cards"
INTL_URL = "https://docs.stripe.com/testing#international-cards"


@dataclass(frozen=True)
class Decline:
    """A card error as the issuer returns it (https://docs.stripe.com/declines/codes)."""

    code: str
    decline_code: str | None
    message: str
    advice_code: str | None = None

    @property
    def doc_url(self) -> str:
        return "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")


GENERIC = Decline("card_declined", "generic_decline", "Your card was declined.")
INSUFFICIENT = Decline(
    "card_declined", "insufficient_funds", "Your card has insufficient funds.", "try_again_later"
)
LOST = Decline("card_declined", "lost_card", "Your card was declined.", "do_not_try_again")
STOLEN = Decline("card_declined", "stolen_card", "Your card was declined.", "do_not_try_again")
EXPIRED = Decline("expired_card", "expired_card", "Your card has expired.")
INCORRECT_CVC = Decline(
    "incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect.", "confirm_card_data"
)
PROCESSING = Decline(
    "processing_error",
    "processing_error",
    "An error occurred while processing your card. Try again in a little bit.",
    "try_again_later",
)
VELOCITY = Decline(
    "card_declined", "card_velocity_exceeded", "Your card was declined.", "try_again_later"
)
# The declines a saved card can start returning later (control API ``decline_later``).
DECLINES_BY_CODE: dict[str, Decline] = {
    d.decline_code: d for d in (GENERIC, INSUFFICIENT, LOST, STOLEN, EXPIRED, INCORRECT_CVC, PROCESSING, VELOCITY)
}

AUTH_REQUIRED = Decline(
    "authentication_required",
    "authentication_required",
    "Your card was declined. This transaction requires authentication.",
)

# Off-session behaviours (https://docs.stripe.com/testing#authentication-and-setup)
OFF_OK = "ok"
OFF_AUTH_UNLESS_SET_UP = "authentication_required_unless_set_up"
OFF_AUTH_ALWAYS = "authentication_required"


@dataclass(frozen=True)
class TestCard:
    """One documented test card.

    ``setup_3ds``: confirming a SetupIntent needs 3-D Secure.
    ``on_session_3ds``: an on-session payment needs 3-D Secure.
    ``off_session``: what an off-session payment does (see OFF_* above).
    ``attach_decline``: declined when attached/set up (card validation).
    ``charge_decline``: every charge is declined with this (after authentication, if any).
    """

    number: str
    aliases: tuple[str, ...]
    brand: str
    country: str
    behaviour: str
    doc: str
    funding: str = "credit"
    setup_3ds: bool = False
    on_session_3ds: bool = False
    off_session: str = OFF_OK
    attach_decline: Decline | None = None
    charge_decline: Decline | None = None
    extra: dict = field(default_factory=dict)

    @property
    def last4(self) -> str:
        return self.number[-4:]

    @property
    def fingerprint(self) -> str:
        return card_fingerprint(self.number)


def _decline_card(number: str, aliases: tuple[str, ...], decline: Decline, text: str) -> TestCard:
    return TestCard(
        number, aliases, "visa", "US", text, DECLINES_URL, attach_decline=decline, charge_decline=decline
    )


def _country(number: str, alias: str, country: str, brand: str = "visa") -> TestCard:
    return TestCard(number, (alias,), brand, country, f"succeeds; issued in {country}", INTL_URL)


CARDS: tuple[TestCard, ...] = (
    # --- brands (https://docs.stripe.com/testing#cards)
    TestCard("4242424242424242", ("pm_card_visa", "pm_card_us"), "visa", "US", "succeeds", TESTING_URL),
    TestCard("4000056655665556", ("pm_card_visa_debit",), "visa", "US", "succeeds (debit)", TESTING_URL,
             funding="debit"),
    TestCard("5555555555554444", ("pm_card_mastercard",), "mastercard", "US", "succeeds", TESTING_URL),
    TestCard("378282246310005", ("pm_card_amex",), "amex", "US", "succeeds", TESTING_URL),
    # --- regulatory cards (https://docs.stripe.com/testing#authentication-and-setup)
    TestCard("4000002500003155", ("pm_card_authenticationRequiredOnSetup",), "visa", "FR",
             "authenticate unless set up: 3DS on setup and on-session; off-session succeeds once set up",
             AUTH_URL, setup_3ds=True, on_session_3ds=True, off_session=OFF_AUTH_UNLESS_SET_UP),
    TestCard("4000002760003184", ("pm_card_authenticationRequired",), "visa", "DE",
             "always authenticate: 3DS on every transaction; off-session fails authentication_required",
             AUTH_URL, setup_3ds=True, on_session_3ds=True, off_session=OFF_AUTH_ALWAYS),
    TestCard("4000003800000446", ("pm_card_authenticationRequiredSetupForOffSession",), "visa", "IT",
             "already set up: 3DS on-session; off-session succeeds without prior setup",
             AUTH_URL, setup_3ds=True, on_session_3ds=True, off_session=OFF_OK),
    TestCard("4000008260003178", ("pm_card_authenticationRequiredChargeDeclinedInsufficientFunds",),
             "visa", "GB",
             "insufficient funds: 3DS then declined insufficient_funds; off-session needs setup, then declines",
             AUTH_URL, setup_3ds=True, on_session_3ds=True, off_session=OFF_AUTH_UNLESS_SET_UP,
             charge_decline=INSUFFICIENT),
    # --- 3-D Secure cards (https://docs.stripe.com/testing#three-ds-cards)
    TestCard("4000000000003220", ("pm_card_threeDSecure2Required",), "visa", "US",
             "3DS2 required on every transaction", THREE_DS_URL,
             setup_3ds=True, on_session_3ds=True, off_session=OFF_AUTH_ALWAYS),
    # --- declines (https://docs.stripe.com/testing#declined-payments)
    TestCard("4000000000000341", ("pm_card_chargeCustomerFail",), "visa", "US",
             "attaching succeeds; every charge declined generic_decline", DECLINES_URL,
             charge_decline=GENERIC),
    _decline_card("4000000000000002", ("pm_card_visa_chargeDeclined", "pm_card_chargeDeclined"), GENERIC,
                  "declined generic_decline"),
    _decline_card("4000000000009995",
                  ("pm_card_visa_chargeDeclinedInsufficientFunds", "pm_card_chargeDeclinedInsufficientFunds"),
                  INSUFFICIENT, "declined insufficient_funds"),
    _decline_card("4000000000009987",
                  ("pm_card_visa_chargeDeclinedLostCard", "pm_card_chargeDeclinedLostCard"),
                  LOST, "declined lost_card"),
    _decline_card("4000000000009979",
                  ("pm_card_visa_chargeDeclinedStolenCard", "pm_card_chargeDeclinedStolenCard"),
                  STOLEN, "declined stolen_card"),
    _decline_card("4000000000000069", ("pm_card_chargeDeclinedExpiredCard",), EXPIRED, "declined expired_card"),
    _decline_card("4000000000000127", ("pm_card_chargeDeclinedIncorrectCvc",), INCORRECT_CVC,
                  "declined incorrect_cvc"),
    _decline_card("4000000000000119", ("pm_card_chargeDeclinedProcessingError",), PROCESSING,
                  "declined processing_error"),
    _decline_card("4000000000006975", ("pm_card_visa_chargeDeclinedVelocityLimitExceeded",), VELOCITY,
                  "declined card_velocity_exceeded"),
    # --- international cards (https://docs.stripe.com/testing#international-cards)
    _country("4000000760000002", "pm_card_br", "BR"),
    _country("4000001240000000", "pm_card_ca", "CA"),
    _country("4000004840008001", "pm_card_mx", "MX"),
    _country("4000002500000003", "pm_card_fr", "FR"),
    _country("4000002760000016", "pm_card_de", "DE"),
    _country("4000008260000000", "pm_card_gb", "GB"),
    _country("4000003720000005", "pm_card_ie", "IE"),
    _country("4000003800000008", "pm_card_it", "IT"),
    _country("4000007240000007", "pm_card_es", "ES"),
    _country("4000005280000002", "pm_card_nl", "NL"),
    _country("4000003560000008", "pm_card_in", "IN"),
    _country("4000003920000003", "pm_card_jp", "JP"),
    _country("4000000360000006", "pm_card_au", "AU"),
)

BY_NUMBER: dict[str, TestCard] = {c.number: c for c in CARDS}
BY_ALIAS: dict[str, TestCard] = {a: c for c in CARDS for a in c.aliases}


def card_fingerprint(number: str) -> str:
    """Stable 16-character fingerprint per card number, like Stripe's ``card.fingerprint``."""
    digest = hashlib.sha256(b"sandbox-fingerprint:" + number.encode()).hexdigest()
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    value = int(digest, 16)
    out = []
    for _ in range(16):
        value, rem = divmod(value, 62)
        out.append(alphabet[rem])
    return "".join(out)


def luhn_ok(number: str) -> bool:
    if not number.isdigit() or not 12 <= len(number) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def brand_of(number: str) -> str:
    if number.startswith("4"):
        return "visa"
    if number[:2] in {"51", "52", "53", "54", "55"} or number[:1] == "2":
        return "mastercard"
    if number[:2] in {"34", "37"}:
        return "amex"
    if number.startswith("6"):
        return "discover"
    return "unknown"
