"""Currency facts and amount rules (billing.money): what Stripe would refuse is refused, and every
amount is shown with its currency's own decimals, from an int or from a SQL sum's Decimal."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing import money


@pytest.mark.parametrize(("currency", "places"), [
    ("usd", 2), ("EUR", 2), ("jpy", 0), ("KRW", 0), ("xof", 0), ("kwd", 3), ("bhd", 3), ("tnd", 3), ("isk", 2),
    ("zzz", 2),  # a code from before currencies were checked still reads as two-decimal
])
def test_exponent(currency, places):
    assert money.exponent(currency) == places


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (1999, "eur", "€19.99"), (5, "usd", "$0.05"), (123456, "gbp", "£1,234.56"), (1500, "JPY", "¥1,500"),
    (100000, "krw", "100,000 KRW"), (1230, "kwd", "1.230 KWD"), (1234, "kwd", "1.234 KWD"),
    (2500, "chf", "25.00 CHF"), (0, "eur", "€0.00"), (-1999, "eur", "-€19.99"),
    (99_999_999, "eur", "€999,999.99"),
])
def test_format_amount_for_customers(amount, currency, shown):
    assert money.format_amount(amount, currency) == shown


def test_format_amount_takes_a_sql_sum():
    # PostgreSQL's sum() over BIGINT is NUMERIC: psycopg hands over a Decimal.
    assert money.format_amount(Decimal("123456"), "eur") == "€1,234.56"
    assert money.format_amount(Decimal("1500"), "jpy") == "¥1,500"
    assert money.format_amount(Decimal("12340"), "kwd") == "12.340 KWD"
    # Exact, not through a float: 2^53 + 1 minor units would lose the last digit in a float.
    assert money.format_amount(Decimal(2**53 + 1), "usd", style="plain") == "90071992547409.93"


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (50, "eur", "0.50 EUR"), (50, "jpy", "50 JPY"), (1230, "kwd", "1.230 KWD"), (123456, "usd", "1,234.56 USD")])
def test_format_amount_with_the_code(amount, currency, shown):
    assert money.format_amount(amount, currency, style="code") == shown


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (123456, "eur", "1234.56"), (1500, "jpy", "1500"), (1230, "kwd", "1.230"), (5, "usd", "0.05")])
def test_format_amount_plain_for_columns(amount, currency, shown):
    assert money.format_amount(amount, currency, style="plain") == shown


def test_the_old_formatters_are_the_same_function():
    from billing import notifications, queue

    assert notifications.format_amount(1230, "kwd") == "1.230 KWD"
    assert notifications.format_amount(Decimal(1999), "eur") == "€19.99"
    assert queue.format_amount(1230, "kwd") == "1.230"  # was "12.30" before: three decimals were ignored
    assert queue.format_amount(Decimal(1500), "jpy") == "1500"


@pytest.mark.parametrize(("amount", "currency"), [
    (50, "eur"), (50, "EUR"), (30, "gbp"), (50, "jpy"), (50, "usd"), (99_999_999, "eur"), (10, "kwd"),
    (999_999_999, "idr"), (999_999_999, "inr"), (500, "isk"), (1, "xof")])
def test_accepted_amounts(amount, currency):
    assert money.validate_amount(amount, currency) == (amount, currency.lower())


@pytest.mark.parametrize(("amount", "currency", "field", "words"), [
    (1, "eur", "amount", "at least 0.50 EUR"),
    (49, "usd", "amount", "at least 0.50 USD"),
    (29, "gbp", "amount", "at least 0.30 GBP"),
    (49, "jpy", "amount", "at least 50 JPY"),
    (999, "mxn", "amount", "at least 10.00 MXN"),
    (100_000_000, "eur", "amount", "at most 999,999.99 EUR"),
    (1_000_000_000, "idr", "amount", "at most 9,999,999.99 IDR"),
    (1234, "kwd", "amount", "multiple of 10"),
    (550, "isk", "amount", "multiple of 100"),
    (0, "eur", "amount", "at least"),
    (-5, "eur", "amount", "at least"),
    (19.99, "eur", "amount", "whole number"),
    (True, "eur", "amount", "whole number"),
    ("1999", "eur", "amount", "whole number"),
    (1999, "xyz", "currency", "XYZ is not a currency Stripe can charge in"),
    (1999, "eu", "currency", "three-letter"),
    (1999, "€ur", "currency", "three-letter"),
    (1999, None, "currency", "three-letter"),
    (1999, "e\x00r", "currency", "three-letter"),
])
def test_refused_amounts_name_the_field_and_the_limit(amount, currency, field, words):
    with pytest.raises(money.MoneyError) as caught:
        money.validate_amount(amount, currency)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert words in caught.value.message


def test_currency_lists_are_consistent():
    assert money.ZERO_DECIMAL_CURRENCIES <= money.SUPPORTED_CURRENCIES
    assert money.THREE_DECIMAL_CURRENCIES <= money.SUPPORTED_CURRENCIES
    assert set(money.MINIMUM_CHARGE) <= money.SUPPORTED_CURRENCIES
    assert all(code == code.lower() and len(code) == 3 for code in money.SUPPORTED_CURRENCIES)
    # Every minimum is itself a valid amount in its currency.
    for code, low in money.MINIMUM_CHARGE.items():
        assert money.validate_amount(low, code) == (low, code)
        with pytest.raises(money.MoneyError):
            money.validate_amount(low - 1, code)
    assert money.MAX_AMOUNT == max(money.maximum(c) for c in money.SUPPORTED_CURRENCIES)
