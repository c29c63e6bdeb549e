"""After a billing cycle, ``GET /metrics`` on the web app and on a worker's ``--metrics-port`` carry
values for what happened in each process (see :mod:`billing.metrics`). The web app runs with
``BILLING_METRICS_TOKEN``, as a deployment reachable from a network would: the scrape sends it."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update

from billing.models import Charge
from tests.integration.conftest import wait_until
from tests.integration.cycle import run_cycle

pytestmark = pytest.mark.usefixtures("clean_db")

METRICS_TOKEN = "metrics-" + secrets.token_urlsafe(24)


@pytest.fixture
def cycle(app_env, sandbox, smtp_server, redis_client, session_factory, tmp_path):
    yield from run_cycle({**app_env, "BILLING_METRICS_TOKEN": METRICS_TOKEN}, tmp_path, sandbox, smtp_server,
                         session_factory)


def scrape(url: str, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = httpx.get(url, headers=headers, timeout=10).raise_for_status().text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_web_and_worker_metrics_after_a_cycle(cycle, session_factory):
    from workers.tasks import reconcile, relay_outbox

    # A declined charge past the dunning horizon: the reconciler, in the worker, gives it up.
    with session_factory() as s:
        s.execute(update(Charge).where(Charge.status == "requires_payment_method")
                  .values(first_failed_at=datetime.now(UTC) - timedelta(days=365),
                          give_up_at=datetime.now(UTC) - timedelta(days=351)))
        s.commit()
    reconcile.delay()

    def given_up() -> bool:
        with session_factory() as s:
            return s.execute(text("SELECT count(*) FROM charges WHERE status = 'uncollectible'")).scalar_one() == 1

    wait_until(given_up, timeout=60, message="the reconciler to give the charge up")
    # Reminders due now: the outbox backlog (nothing relays them, no beat runs here).
    with session_factory() as s:
        due = s.execute(text("UPDATE notifications SET send_after = now() - interval '1 minute' "
                             "WHERE status = 'pending'")).rowcount
        s.commit()
    assert due >= 1

    worker = scrape(cycle.worker_metrics_url)
    assert value(worker, "billing_charge_attempts_total", outcome="succeeded", status="paid") == 1
    assert value(worker, "billing_charge_attempts_total", outcome="declined", status="requires_payment_method") == 1
    assert value(worker, "billing_charge_declines_total", decline_code="generic_decline") == 1
    assert value(worker, "billing_charge_declines_total") == 1
    endpoint = "POST /v1/payment_intents"
    # Two PaymentIntents, one of them sent twice (a 429 first), all timed.
    assert value(worker, "billing_stripe_request_duration_seconds_count", endpoint=endpoint) == 3
    assert value(worker, "billing_stripe_request_duration_seconds_sum", endpoint=endpoint) > 0
    assert value(worker, "billing_stripe_requests_total", endpoint=endpoint, status="429") == 1
    assert value(worker, "billing_stripe_rate_limited_total", endpoint=endpoint) == 1
    assert value(worker, "billing_ratelimit_wait_seconds_count", endpoint=endpoint) == 3
    assert value(worker, "billing_reconciler_findings_total", kind="given_up") == 1
    assert value(worker, "billing_reconciler_findings_total", kind="requeued") == 0
    assert value(worker, "billing_backlog_source_up", source="redis") == 1
    assert value(worker, "billing_backlog_source_up", source="database") == 1
    assert value(worker, "billing_outbox_due") == due
    assert ("billing_queue_depth", frozenset({("queue", "billing")})) in worker

    # With the worker gone, a task waits in the queue: the web app's scrape-time gauge sees it.
    cycle.worker.stop()
    relay_outbox.delay()
    assert httpx.get(f"{cycle.web_url}/metrics", timeout=10).status_code == 401  # no token, even from here
    web = scrape(f"{cycle.web_url}/metrics", METRICS_TOKEN)
    assert value(web, "billing_queue_depth", queue="billing") >= 1
    assert value(web, "billing_outbox_due") == due
    assert value(web, "billing_backlog_source_up") == 2
    # Webhook lag: one event, created 3 s before it was sent.
    assert value(web, "billing_webhook_lag_seconds_count") == 1
    assert value(web, "billing_webhook_lag_seconds_sum") >= 3
    # Card setups call Stripe from the web process; charges do not.
    assert value(web, "billing_stripe_request_duration_seconds_count", endpoint="POST /v1/setup_intents") == 4
    assert value(web, "billing_stripe_request_duration_seconds_count", endpoint=endpoint) == 0
    assert value(web, "billing_ratelimit_wait_seconds_count", endpoint="POST /v1/setup_intents") == 4
    assert value(web, "billing_card_setups_total", status="succeeded") == 2
    assert value(web, "billing_http_requests_total", route="/webhooks/stripe", status="200") == 1
    assert value(web, "billing_charge_attempts_total") == 0
