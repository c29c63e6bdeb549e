"""One billing cycle through every process, for the log scan and the metrics tests.

``billing web`` and ``billing worker`` run as subprocesses with JSON logs to files; this process
plays the customer's browser and Stripe (httpx, a signed webhook) and logs through the product's own
JSON handler to a file too. Every secret the cycle handles is collected in ``Cycle.secrets``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import select

from billing import charging, logs
from billing.models import Charge, Notification, WebhookEvent
from billing.stripe_gateway import get_gateway
from tests import stripe_events
from tests.integration.billing_helpers import api_key_headers
from tests.integration.conftest import ROOT, WorkerProcess, billing_command, free_port, wait_until

SETTLED = {"paid", "authentication_required", "requires_payment_method", "uncollectible", "void"}
CLIENT_SECRET = re.compile(r"\b(?:pi|seti)_[A-Za-z0-9]+_secret_[A-Za-z0-9]+")
RECOVER_LINK = re.compile(r"https?://\S+/recover/([A-Za-z0-9_\-.~%]+)")


@dataclass
class Cycle:
    web_url: str
    web_log: Path
    worker: WorkerProcess
    worker_metrics_url: str
    own_log: Path
    secrets: dict[str, set[str]] = field(default_factory=dict)
    charge_ids: list[int] = field(default_factory=list)

    def keep(self, kind: str, value: str | None) -> None:
        if value:
            self.secrets.setdefault(kind, set()).add(value)


@contextlib.contextmanager
def web_process(env: dict[str, str], log_path: Path) -> Iterator[str]:
    with web_server_process(env, log_path) as (url, _proc):
        yield url


@contextlib.contextmanager
def web_server_process(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``billing web`` answering /healthz, and its process (for tests that watch its memory)."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*billing_command(), "web", "--port", str(port)], env={**os.environ, **env},
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=60, message="billing web to answer")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def own_json_log(path: Path) -> Iterator[None]:
    """This process's log lines through the product's JSON handler (root at DEBUG meanwhile)."""
    root = logging.getLogger()
    stream = open(path, "w")
    handler = logs.build_handler("json", stream)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        stream.close()


def _charges(session_factory) -> dict[int, str]:
    with session_factory() as s:
        return dict(s.execute(select(Charge.id, Charge.status)).all())


def _sent(session_factory) -> bool:
    with session_factory() as s:
        return s.scalars(select(Notification.id).where(Notification.status == "sent")).first() is not None


def _enrol(client: httpx.Client, cycle: Cycle, email: str, card: str) -> int:
    customer = client.post("/api/customers", json={"email": email, "name": card}).raise_for_status().json()
    # A setup for Stripe.js first: its answer carries a client_secret and a /setup/<token> link.
    pending = client.post(f"/api/customers/{customer['id']}/card-setups", json={}).raise_for_status().json()
    cycle.keep("client secret", pending.get("client_secret"))
    cycle.keep("setup token", pending["setup_url"].rsplit("/setup/", 1)[-1])
    page = client.get("/setup/" + pending["setup_url"].rsplit("/setup/", 1)[-1])  # the customer opens it
    assert page.status_code == 200, page.text
    for secret in CLIENT_SECRET.findall(page.text):
        cycle.keep("client secret", secret)
    saved = client.post(f"/api/customers/{customer['id']}/card-setups",
                        json={"payment_method": card}).raise_for_status().json()
    assert saved["status"] == "succeeded", saved
    cycle.keep("client secret", saved.get("client_secret"))
    start = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    sub = client.post("/api/subscriptions", json={"customer_id": customer["id"], "amount": 2500, "currency": "eur",
                                                  "interval": "month", "start_at": start}).raise_for_status().json()
    return sub["id"]


def run_cycle(env: dict[str, str], tmp_path: Path, sandbox, smtp_server, session_factory) -> Iterator[Cycle]:
    """Generator for a fixture: yields the finished cycle, stops the processes afterwards."""
    from workers.tasks import enqueue_charge, relay_outbox

    metrics_port = free_port()
    env = {**env, "BILLING_STRIPE_WEBHOOK_SECRET": stripe_events.SECRET, "BILLING_LOG_FORMAT": "json",
           "BILLING_STRIPE_PUBLISHABLE_KEY": "pk_test_logscan",
           "BILLING_WORKER_METRICS_PORT": str(metrics_port)}
    worker = WorkerProcess(env, tmp_path, concurrency=4)
    with contextlib.ExitStack() as stack:
        stack.callback(worker.stop)
        worker.start()
        web_url = stack.enter_context(web_process(env, tmp_path / "web.log"))
        cycle = Cycle(web_url=web_url, web_log=tmp_path / "web.log", worker=worker,
                      worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", own_log=tmp_path / "own.log")
        cycle.keep("API key", env["BILLING_STRIPE_API_KEY"])
        cycle.keep("webhook secret", stripe_events.SECRET)
        stack.enter_context(own_json_log(cycle.own_log))
        headers = api_key_headers()
        cycle.keep("API key", headers["Authorization"].removeprefix("Bearer "))  # ours, next to Stripe's
        client = stack.enter_context(httpx.Client(base_url=web_url, timeout=30, headers=headers))

        _enrol(client, cycle, "paying@example.com", "pm_card_visa")
        _enrol(client, cycle, "failing@example.com", "pm_card_chargeCustomerFail")
        # One 429 from Stripe on the way: the gateway resends with the same key, and it is counted.
        sandbox.control.add_fault("rate_limit", method="POST", path="/v1/payment_intents", count=1)

        cycle.charge_ids = charging.run_due(enqueue=enqueue_charge).created
        assert len(cycle.charge_ids) == 2
        statuses = wait_until(lambda: (st := _charges(session_factory)) and set(st.values()) <= SETTLED and st,
                              timeout=60, message="both charges to settle")
        assert sorted(statuses.values()) == ["paid", "requires_payment_method"], statuses

        # Stripe's webhook for the paid charge, signed, with the PaymentIntent's real client secret.
        with session_factory() as s:
            paid = s.scalars(select(Charge).where(Charge.status == "paid")).one()
        view = get_gateway().payment_intent_for_customer(paid.payment_intent_id)
        cycle.keep("client secret", view.client_secret)
        obj = stripe_events.payment_intent(paid.payment_intent_id, "succeeded", charge_id=paid.id, amount=paid.amount)
        obj["client_secret"] = view.client_secret
        body, headers = stripe_events.signed(stripe_events.event("payment_intent.succeeded", obj,
                                                                 created=int(datetime.now(UTC).timestamp()) - 3))
        answer = client.post("/webhooks/stripe", content=body, headers=headers)
        assert answer.status_code == 200, answer.text

        def webhook_processed() -> bool:
            with session_factory() as s:
                return s.scalars(select(WebhookEvent.processed_at)).first() is not None

        wait_until(webhook_processed, timeout=60, message="the worker to process the webhook event")

        # The outbox relay, in the worker: the recovery email for the declined charge.
        relay_outbox.delay()
        message = smtp_server.wait_for(1, timeout=60)[0]
        text = message.get_body(("plain",)).get_content()
        match = RECOVER_LINK.search(text)
        assert match, text
        cycle.keep("recovery link", match.group(0))
        cycle.keep("recovery token", match.group(1))
        # The relay commits the link's token just after SMTP took the message.
        wait_until(lambda: _sent(session_factory), timeout=30, message="the relay to commit")
        page = client.get(f"/recover/{match.group(1)}")  # the customer follows the link
        assert page.status_code == 200, page.text
        for secret in CLIENT_SECRET.findall(page.text):
            cycle.keep("client secret", secret)
        yield cycle
