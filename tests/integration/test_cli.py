"""The ``billing`` command line as an operator meets it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from billing.db import unit_of_work
from billing.models import Charge, ChargeStatus, Customer, Subscription
from tests.integration.conftest import billing_command

SPEC_COMMANDS = ["migrate", "web", "worker", "beat", "run-due", "queue", "sandbox"]


def run_billing(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    return subprocess.run([*billing_command(), *args], env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_the_commands():
    result = run_billing("--help")
    assert result.returncode == 0
    for command in SPEC_COMMANDS:
        assert command in result.stdout, command


@pytest.mark.parametrize(("args", "variable", "value"), [
    (["migrate"], "BILLING_DATABASE_URL", "mysql://localhost/x"),
    (["queue"], "BILLING_BROKER_URL", "amqp://localhost"),
    (["web"], "BILLING_STRIPE_API_KEY", "pk_test_not_a_secret_key"),
    (["worker"], "BILLING_SMTP_URL", "localhost:25"),
    (["beat"], "BILLING_PUBLIC_URL", "not a url"),
    (["run-due"], "BILLING_STRIPE_RATE_LIMIT_GLOBAL", "-5"),
])
def test_invalid_setting_is_one_line_naming_the_variable(base_env, args, variable, value):
    result = run_billing(*args, env={**base_env, variable: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and variable in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["web", "worker", "run-due"])
def test_missing_stripe_key_is_one_line(base_env, command):
    env = {k: v for k, v in base_env.items() if k != "BILLING_STRIPE_API_KEY"}
    result = run_billing(command, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: BILLING_STRIPE_API_KEY is required but not set"


def test_web_without_a_secret_key_refuses_to_start(base_env):
    env = {k: v for k, v in base_env.items() if k != "BILLING_SECRET_KEY"}
    result = run_billing("web", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: BILLING_SECRET_KEY is required but not set"


def test_bad_now_is_one_clear_line(base_env):
    result = run_billing("run-due", "--now", "yesterday-ish", env=base_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --now is not an ISO 8601 date-time: 'yesterday-ish' (e.g. 2025-01-31T09:00:00Z)"]


def test_migrate_is_idempotent(base_env):
    result = run_billing("migrate", env=base_env)
    assert result.returncode == 0, result.stderr
    assert "head" in result.stdout


def _queue_rows():
    with unit_of_work() as uow:
        s = uow.session
        cust = Customer(email="ada@example.com", name="Ada")
        s.add(cust)
        s.flush()
        sub = Subscription(customer_id=cust.id, amount=1999, currency="eur", interval="month", interval_count=1,
                           anchor_at=datetime(2025, 1, 1, tzinfo=UTC), next_charge_at=datetime(2025, 2, 1, tzinfo=UTC))
        s.add(sub)
        s.flush()
        period = dict(period_start=datetime(2025, 1, 1, tzinfo=UTC), period_end=datetime(2025, 2, 1, tzinfo=UTC),
                      amount=1999, currency="eur")
        s.add_all([
            Charge(subscription_id=sub.id, period_index=0, status=ChargeStatus.paid, **period),
            Charge(subscription_id=sub.id, period_index=1, status=ChargeStatus.requires_payment_method, attempts=2,
                   last_error_code="card_declined", last_decline_code="insufficient_funds",
                   next_retry_at=datetime(2025, 2, 4, tzinfo=UTC), **period),
        ])
        uow.commit()


def test_queue_shows_unpaid_charges(base_env, clean_db):
    assert run_billing("queue", env=base_env).stdout.strip() == "the retry queue is empty"
    _queue_rows()
    table = run_billing("queue", env=base_env)
    assert table.returncode == 0, table.stderr
    # The rich table's rule under the header is not a row.
    lines = [line for line in table.stdout.strip().splitlines() if not set(line.strip()) <= {"─", " "}]
    assert lines[0].split()[:3] == ["charge", "customer", "amount"]
    assert len(lines) == 2
    assert "ada@example.com" in lines[1] and "19.99" in lines[1] and "EUR" in lines[1]
    assert "card_declined/insufficient_funds" in lines[1] and "2025-02-04 00:00 UTC" in lines[1]

    rows = json.loads(run_billing("queue", "--json", env=base_env).stdout)
    assert [(r["customer_email"], r["status"], r["attempts"]) for r in rows] == [
        ("ada@example.com", "requires_payment_method", 2)]
    assert rows[0]["next_retry_at"] == "2025-02-04T00:00:00+00:00"


def test_run_due_wait_charges_through_a_real_worker(app_env, clean_db, worker):
    from billing import enrolment

    customers = [enrolment.create_customer(f"c{n}@example.com", f"Customer {n}") for n in range(3)]
    # A start in the past is refused beyond enrolment.START_AT_GRACE: these start a minute ago.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    due = (start + timedelta(minutes=1, seconds=1)).isoformat()
    for customer, card in zip(customers, ["pm_card_visa", "pm_card_mastercard", "pm_card_chargeCustomerFail"],
                              strict=True):
        assert enrolment.create_card_setup(customer.id, card).setup.status == "succeeded"
        enrolment.create_subscription(customer.id, 1500, "eur", "month", start_at=start)

    result = run_billing("run-due", "--wait", "--now", due, env=app_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "started 3 charge(s)" in result.stdout
    assert "summary: paid 2, requires_payment_method 1" in result.stdout
    assert "3/3 decided" in result.stderr

    again = run_billing("run-due", "--wait", "--now", due, env=app_env)
    assert again.returncode == 0 and "started 0 charge(s)" in again.stdout


def test_web_serves_health_over_http(app_env, tmp_path):
    import httpx

    from tests.integration.billing_helpers import api_key_headers
    from tests.integration.conftest import free_port, wait_until

    port = free_port()
    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*billing_command(), "web", "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **app_env})
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, log_path.read_text()
                return False

        wait_until(healthy, timeout=60, message="billing web to answer")
        resp = httpx.get(f"http://127.0.0.1:{port}/api/subscriptions/12345", headers=api_key_headers())
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    finally:
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text()
    assert "GET /api/subscriptions/{subscription_id} 404" in text  # route templates, not raw paths
    assert "/api/subscriptions/12345" not in text
