"""The state machine's table and the derived subscription status, as pure rules."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from billing import state
from billing.models import ChargeStatus, SubscriptionStatus

NOW = datetime(2026, 5, 20, tzinfo=UTC)


def _charge(status: ChargeStatus) -> SimpleNamespace:
    return SimpleNamespace(id=1, status=status.value, updated_at=None, paid_at=None)


def test_every_status_has_a_row_and_final_ones_only_lead_to_paid():
    assert set(state.CHARGE_TRANSITIONS) == set(ChargeStatus)
    assert state.CHARGE_TRANSITIONS[ChargeStatus.paid] == frozenset()
    for final in (ChargeStatus.uncollectible, ChargeStatus.void):
        assert state.CHARGE_TRANSITIONS[final] == {ChargeStatus.paid}


@pytest.mark.parametrize("current", list(ChargeStatus))
@pytest.mark.parametrize("wanted", list(ChargeStatus))
def test_move_charge_follows_the_table(current, wanted):
    charge = _charge(current)
    legal = wanted == current or wanted in state.CHARGE_TRANSITIONS[current]
    if legal:
        state.move_charge(charge, wanted, now=NOW)
        assert charge.status == wanted
        assert charge.updated_at == NOW
    else:
        with pytest.raises(state.IllegalTransition):
            state.move_charge(charge, wanted, now=NOW)
        assert charge.status == current.value and charge.updated_at is None


def test_paid_records_when_and_a_paid_charge_never_moves():
    charge = _charge(ChargeStatus.processing)
    assert state.move_charge(charge, ChargeStatus.paid, now=NOW) is True
    assert charge.paid_at == NOW
    for wanted in set(ChargeStatus) - {ChargeStatus.paid}:
        with pytest.raises(state.IllegalTransition):
            state.move_charge(charge, wanted, now=NOW)


def test_a_pending_charge_cannot_jump_to_a_failure_without_an_attempt_but_money_is_always_recorded():
    charge = _charge(ChargeStatus.pending)
    state.move_charge(charge, ChargeStatus.paid, now=NOW)  # a late success of an abandoned attempt
    assert charge.status == ChargeStatus.paid and charge.paid_at == NOW
    for wanted in (ChargeStatus.requires_payment_method, ChargeStatus.authentication_required,
                   ChargeStatus.uncollectible):
        with pytest.raises(state.IllegalTransition):
            state.move_charge(_charge(ChargeStatus.pending), wanted, now=NOW)


@pytest.mark.parametrize(("canceled", "open_failure", "given_up", "final", "expected"), [
    (False, False, False, SubscriptionStatus.unpaid, SubscriptionStatus.active),
    (False, True, False, SubscriptionStatus.unpaid, SubscriptionStatus.past_due),
    (False, True, True, SubscriptionStatus.unpaid, SubscriptionStatus.past_due),
    (False, False, True, SubscriptionStatus.unpaid, SubscriptionStatus.unpaid),
    (False, False, True, SubscriptionStatus.canceled, SubscriptionStatus.canceled),
    (True, True, True, SubscriptionStatus.unpaid, SubscriptionStatus.canceled),
    (True, False, False, SubscriptionStatus.unpaid, SubscriptionStatus.canceled),
])
def test_subscription_status_is_derived(canceled, open_failure, given_up, final, expected):
    assert state.derive_subscription_status(canceled=canceled, open_failure=open_failure, given_up=given_up,
                                            final_status=final) == expected


def _monthly(index: int) -> SimpleNamespace:
    anchor = datetime(2026, 1, 31, tzinfo=UTC)
    from billing.periods import period_start
    return SimpleNamespace(id=7, anchor_at=anchor, interval="month", interval_count=1, next_period_index=index,
                           next_charge_at=period_start(anchor, "month", 1, index))


def test_resume_skips_whole_missed_periods_and_keeps_the_calendar():
    sub = _monthly(1)  # January billed; February next
    # Periods of a Jan 31 anchor: Feb 28 – Mar 31 and Mar 31 – Apr 30 ended before May 20.
    assert state.skip_missed_periods(sub, NOW) == 2
    assert sub.next_period_index == 3
    assert sub.next_charge_at == datetime(2026, 4, 30, tzinfo=UTC)  # period containing May 20: Apr 30 – May 31


def test_resume_inside_the_next_period_skips_nothing():
    sub = _monthly(1)
    assert state.skip_missed_periods(sub, datetime(2026, 2, 10, tzinfo=UTC)) == 0
    assert sub.next_period_index == 1


def test_the_real_gateway_and_the_fake_both_satisfy_the_gateway_protocols():
    from billing.outcomes import ChargeGateway, PaymentGateway
    from billing.stripe_gateway import StripeGateway
    from tests.fakes import FakeGateway

    assert issubclass(StripeGateway, PaymentGateway)
    assert isinstance(FakeGateway(), ChargeGateway)
