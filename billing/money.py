"""Currency facts from Stripe's documentation, and the one way amounts are checked and shown.

Amounts are integers in the currency's minor unit, as Stripe's API takes them
(https://docs.stripe.com/currencies#minor-units-in-api-amounts): ``1999`` EUR is €19.99, ``1500``
JPY is ¥1,500, ``1230`` KWD is 1.230 KWD.

What is checked when a subscription is created (:func:`validate_amount`), so that a charge Stripe
would refuse as a request (``amount_too_small``, an unknown currency) is refused here instead, with a
422, before any customer is billed:

- the currency is one of Stripe's presentment currencies
  (https://docs.stripe.com/currencies#presentment-currencies);
- the amount is at least Stripe's minimum charge amount and at most its maximum
  (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts, "Minimum and maximum
  charge amounts"). Stripe states the minimum per *settlement* currency: a charge in that currency
  must meet it as it is, a charge in another currency must meet it after conversion. The table is
  applied to charges presented in the currencies it lists; for the others the converted minimum
  depends on the day's rate and the account's settlement currency, which Stripe checks at charge
  time (a refusal then is held for staff, never sent to the customer as a decline). The maximum is
  the number of digits the ``amount`` field takes: eight for most currencies (99,999,999), nine for
  INR, and nine for IDR (Stripe allows twelve for IDR, nine with American Express: the card may
  change after enrolment, so the lower one). The higher card-only limits for COP, HUF, JPY and LBP
  are not used: card networks may impose lower ones, and JCB in Japan does;
- three-decimal currencies (BHD, JOD, KWD, OMR, TND) in steps of 10: Stripe requires their last
  digit to be 0 (https://docs.stripe.com/currencies#three-decimal); ISK in steps of 100: it is
  zero-decimal but represented as two-decimal, with ``00`` as the decimals
  (https://docs.stripe.com/currencies#special-cases).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

# https://docs.stripe.com/currencies#presentment-currencies (lower case, as the API wants them).
SUPPORTED_CURRENCIES = frozenset("""
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd bwp byn bzd
    cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gnf gtq gyd
    hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw kwd kyd kzt lak lbp lkr lrd lsl mad
    mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln
    pyg qar ron rsd rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs
    uah ugx uyu uzs vnd vuv wst xaf xcd xcg xof xpf yer zar zmw
""".split())

# https://docs.stripe.com/currencies#zero-decimal: the amount is in whole units (1500 JPY is ¥1,500).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})
# https://docs.stripe.com/currencies#three-decimal: thousandths, with the last digit 0.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

# Stripe's minimum charge amounts, in minor units
# (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts).
MINIMUM_CHARGE: dict[str, int] = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50, "czk": 1500, "dkk": 250,
    "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50, "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300,
    "nzd": 50, "pln": 200, "ron": 200, "sek": 300, "sgd": 50, "thb": 1000,
}
# Eight digits, except where Stripe's page allows more (see the module docstring).
DEFAULT_MAXIMUM_CHARGE = 99_999_999
MAXIMUM_CHARGE: dict[str, int] = {"idr": 999_999_999, "inr": 999_999_999}
# The largest amount any currency takes: a bound for request schemas before the per-currency check.
MAX_AMOUNT = max(DEFAULT_MAXIMUM_CHARGE, *MAXIMUM_CHARGE.values())

# Amounts Stripe takes only in steps (see the module docstring).
AMOUNT_STEP: dict[str, int] = {**dict.fromkeys(THREE_DECIMAL_CURRENCIES, 10), "isk": 100}

_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}

Style = Literal["symbol", "code", "plain"]


class MoneyError(ValueError):
    """An amount or currency Stripe would refuse; ``field`` is ``amount`` or ``currency``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


def is_supported(currency: str) -> bool:
    return isinstance(currency, str) and currency.lower() in SUPPORTED_CURRENCIES


def exponent(currency: str) -> int:
    """Decimal places of the minor unit as Stripe counts it: 0, 2 or 3.

    A code we do not know (a row from before currencies were checked) counts as two-decimal, the
    ISO 4217 default, so that reading old data never fails.
    """
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    return 3 if code in THREE_DECIMAL_CURRENCIES else 2


def minimum(currency: str) -> int:
    """Stripe's minimum charge for ``currency`` in minor units (1 where its table names none)."""
    return MINIMUM_CHARGE.get(currency.lower(), 1)


def maximum(currency: str) -> int:
    return MAXIMUM_CHARGE.get(currency.lower(), DEFAULT_MAXIMUM_CHARGE)


def validate_currency(currency: object) -> str:
    """The currency in Stripe's spelling (lower case), or :class:`MoneyError`."""
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isascii() or not currency.isalpha():
        raise MoneyError("currency", "must be a three-letter ISO 4217 code such as eur")
    code = currency.lower()
    if code not in SUPPORTED_CURRENCIES:
        raise MoneyError("currency", f"{currency.upper()} is not a currency Stripe can charge in "
                                     "(https://docs.stripe.com/currencies#presentment-currencies)")
    return code


def validate_amount(amount: object, currency: object) -> tuple[int, str]:
    """``(amount, currency)`` checked against Stripe's rules, currency lower-cased; else :class:`MoneyError`.

    The messages name the limit in the currency (``amount: at least 0.50 EUR``), because the caller
    counts in minor units and the limit is easier to check in major ones.
    """
    code = validate_currency(currency)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise MoneyError("amount", "must be a whole number of minor units (1999 for 19.99)")
    low, high = minimum(code), maximum(code)
    if amount < low:
        raise MoneyError("amount", f"at least {format_amount(low, code, style='code')}"
                                   f" ({low} in minor units)")
    if amount > high:
        raise MoneyError("amount", f"at most {format_amount(high, code, style='code')}"
                                   f" ({high} in minor units)")
    step = AMOUNT_STEP.get(code)
    if step and amount % step:
        raise MoneyError("amount", f"{code.upper()} amounts must be a multiple of {step} minor units")
    return amount, code


def format_amount(amount: int | Decimal, currency: str, *, style: Style = "symbol") -> str:
    """Minor units → what a person reads, exact for zero-, two- and three-decimal currencies.

    ``amount`` may be an ``int`` or a ``Decimal`` (PostgreSQL's ``sum()`` of a BIGINT column is a
    NUMERIC). Styles: ``symbol`` for customers (``€19.99``, ``¥1,500``, ``1.230 KWD``), ``code`` for
    messages (``19.99 EUR``), ``plain`` for columns and CSV (``19.99``: no grouping, no currency).
    """
    code = currency.lower()
    places = exponent(code)
    value = Decimal(amount).scaleb(-places)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if style == "plain":
        return f"{sign}{value:.{places}f}"
    number = f"{value:,.{places}f}"
    symbol = _SYMBOLS.get(code) if style == "symbol" else None
    return f"{sign}{symbol}{number}" if symbol else f"{sign}{number} {code.upper()}"
