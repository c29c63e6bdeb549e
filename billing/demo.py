"""``billing demo``: the whole system on embedded defaults, end to end, on one laptop.

It starts an embedded PostgreSQL and Redis, the Stripe sandbox, a mail catcher, ``billing web`` and
``billing worker``; makes an API key and enrols a dozen customers through the JSON API with it, with
a spread of Stripe's test cards (3-D Secure on setup, always-authenticate, insufficient funds, a card
reported lost, cards saved before the SCA cutoffs, cards from several countries and currencies); runs
a billing cycle through the real worker; relays the emails; moves time a period forward and runs the
next cycle; prints the outcomes and every email with its recovery link, and the API key with a
``curl`` line to try it. Then it keeps the web app up until Ctrl-C, which stops everything it started.

This is part of the command line: it is the one place in ``billing/`` that starts the sandbox.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import httpx

from billing import embedded

DEMO_PASSWORD = "demo-password-2026"  # noqa: S105 - the printed demo login, local only
DEMO_STAFF = "finance@demo.example"
DEMO_API_KEY_NAME = "demo"


@dataclass(frozen=True)
class Persona:
    name: str
    email: str
    country: str
    card: str
    amount: int
    currency: str
    story: str
    saved_at: str | None = None  # import as a card saved before the SCA cutoffs
    declines_later: str | None = None  # the issuer starts declining the saved card


PERSONAS = (
    Persona("Ada Lovelace", "ada@demo.example", "GB", "pm_card_visa", 1500, "gbp", "pays"),
    Persona("Grace Hopper", "grace@demo.example", "FR", "pm_card_authenticationRequiredOnSetup", 2900, "eur",
            "3-D Secure once on setup, then pays off-session"),
    Persona("Alan Turing", "alan@demo.example", "DE", "pm_card_authenticationRequired", 4900, "eur",
            "the bank asks for authentication every time: recovery email"),
    Persona("Katherine Johnson", "katherine@demo.example", "GB",
            "pm_card_authenticationRequiredChargeDeclinedInsufficientFunds", 990, "gbp",
            "3-D Secure on setup, then insufficient funds: retried on a schedule"),
    Persona("Edsger Dijkstra", "edsger@demo.example", "NL", "pm_card_nl", 1200, "eur",
            "card reported lost after setup: hard decline, asked for a new card", declines_later="lost_card"),
    Persona("Barbara Liskov", "barbara@demo.example", "US", "pm_card_chargeCustomerFail", 2000, "usd",
            "saved fine, every charge declined"),
    Persona("Donald Knuth", "donald@demo.example", "FR", "pm_card_fr", 1999, "eur",
            "card saved in 2019: charged under a previous authorization", saved_at="2019-11-05T10:00:00"),
    Persona("Tim Berners-Lee", "tim@demo.example", "GB", "pm_card_gb", 1499, "gbp",
            "card saved in 2021 before the UK cutoff, later declined", saved_at="2021-03-01T09:00:00",
            declines_later="insufficient_funds"),
    Persona("Yukihiro Matsumoto", "matz@demo.example", "JP", "pm_card_jp", 1200, "jpy", "pays in yen"),
    Persona("Srinivasa Ramanujan", "srinivasa@demo.example", "IN", "pm_card_in", 49900, "inr", "pays in rupees"),
    Persona("Marcelo Tosatti", "marcelo@demo.example", "BR", "pm_card_br", 5990, "brl", "pays in reais"),
    Persona("Frances Allen", "frances@demo.example", "US", "pm_card_visa", 999, "usd", "pays"),
)


def say(message: str = "") -> None:
    print(message, flush=True)


def step(message: str) -> None:
    say(f"\n==> {message}")


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", preferred)) != 0:
                return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MailCatcher:
    """An SMTP server that keeps every message (and writes each to ``maildir`` as an .eml file)."""

    def __init__(self, maildir: Path):
        self.maildir = maildir
        self.messages: list[EmailMessage] = []
        self._lock = threading.Lock()
        self.port = free_port(1025)
        self._controller = None

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd hook
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        with self._lock:
            self.messages.append(msg)
            (self.maildir / f"{len(self.messages):03d}.eml").write_bytes(raw)
        return "250 OK"

    def start(self) -> MailCatcher:
        from aiosmtpd.controller import Controller

        self.maildir.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller:
            self._controller.stop()


class Processes:
    """The subprocesses the demo started; all stopped on exit, Ctrl-C included."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "billing.cli", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{url} did not come up:\n{tail}")
        time.sleep(0.2)


def wait_for_log(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"worker did not start:\n{tail}")
        time.sleep(0.2)


def run(*, serve: bool = True, web_port: int = 8000, data_dir: Path | None = None) -> int:
    from billing.settings import get_settings

    base = Path(data_dir or get_settings().data_dir).resolve() / "demo"
    started = time.monotonic()
    step(f"Starting embedded PostgreSQL and Redis under {base}")
    embedded.stop(base)  # a fresh story each time: stop and forget what an earlier demo left
    for leftover in ("postgres", "redis", "mail", "logs"):
        with contextlib.suppress(FileNotFoundError):
            _rmtree(base / leftover)
    database_url = embedded.database_url(base)
    broker_url = embedded.broker_url(base)
    (base / "logs").mkdir(parents=True, exist_ok=True)

    from sandbox.testing import SandboxServer

    webhook_secret = "whsec_" + secrets.token_hex(16)
    web_port = free_port(web_port)
    public_url = f"http://127.0.0.1:{web_port}"
    mail = MailCatcher(base / "mail").start()
    sandbox = SandboxServer(port=free_port(12111), webhook_endpoints=[(f"{public_url}/webhooks/stripe",
                                                                      webhook_secret)]).start()
    say(f"    Stripe sandbox   {sandbox.url}")
    say(f"    mail catcher     smtp://127.0.0.1:{mail.port} (messages also in {base / 'mail'})")

    env = {**os.environ,
           "BILLING_DATABASE_URL": database_url, "BILLING_BROKER_URL": broker_url,
           "BILLING_DATA_DIR": str(base), "BILLING_STRIPE_API_KEY": sandbox.api_key,
           "BILLING_STRIPE_API_BASE": sandbox.url, "BILLING_STRIPE_PUBLISHABLE_KEY": "pk_test_sandbox",
           "BILLING_STRIPE_JS_URL": f"{sandbox.url}/js/v3/stripe.js",
           "BILLING_STRIPE_WEBHOOK_SECRET": webhook_secret, "BILLING_PUBLIC_URL": public_url,
           "BILLING_SECRET_KEY": secrets.token_hex(32), "BILLING_SMTP_URL": f"smtp://127.0.0.1:{mail.port}",
           "BILLING_MAIL_FROM": "billing@demo.example", "BILLING_MERCHANT_NAME": "Demo Merchant",
           "BILLING_API_DOCS": "true",  # Swagger UI from its package's files (billing.web.docs), on for the demo
           "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("BILLING_")})
    _forget_cached_settings()
    procs = Processes(env, base / "logs")

    def on_stop(_signum, _frame):
        raise KeyboardInterrupt

    # Ctrl-C and a plain kill both end the demo cleanly (SIGINT is set explicitly: a shell that
    # started us in the background would have left it ignored).
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    story_told = False
    try:
        step("Applying migrations")
        from billing import migrate

        migrate.upgrade(database_url)
        _add_demo_staff()
        api_key = _add_demo_api_key()

        step("Starting billing web and billing worker")
        web = procs.start("web", "web", "--host", "127.0.0.1", "--port", str(web_port))
        worker = procs.start("worker", "worker", "--concurrency", "8")
        wait_for_http(f"{public_url}/healthz", web, base / "logs" / "web.log")
        wait_for_log(worker, base / "logs" / "worker.log", " ready.")
        say(f"    web {public_url}   worker ready   logs in {base / 'logs'}")

        api = httpx.Client(base_url=public_url, timeout=60, headers={"Authorization": f"Bearer {api_key}"})
        step(f"Enrolling {len(PERSONAS)} customers through the JSON API (API key {DEMO_API_KEY_NAME!r})")
        subs = enrol_all(api, sandbox)

        step("Billing cycle 1: charging every due subscription off-session")
        cycle(api, subs, now=None)
        relay_and_show(mail, since=0)

        step("A customer recovers through the emailed link")
        recover_one(mail, sandbox, "katherine@demo.example")

        step("Billing cycle 2: one period later")
        next_period = datetime.now(UTC) + timedelta(days=32)
        sandbox.control.advance(32 * 86400)
        seen = len(mail.messages)
        cycle(api, subs, now=next_period)
        relay_and_show(mail, since=seen)

        step("The retry queue, as finance sees it in a terminal (billing queue)")
        subprocess.run([sys.executable, "-m", "billing.cli", "queue"], env=env, check=False)

        say(f"\nDone in {time.monotonic() - started:.0f} s.")
        say(f"    Finance console  {public_url}/finance/   login {DEMO_STAFF} / {DEMO_PASSWORD}")
        say(f"    API docs         {public_url}/docs")
        say(f"    API key          {api_key}   (scope write; billing api-key list, "
            f"billing api-key revoke {DEMO_API_KEY_NAME})")
        example = f"{public_url}/api/subscriptions/{min(subs, default=1)}"
        say(f"    try it           curl -H 'Authorization: Bearer {api_key}' {example}")
        say("    Recovery links   in the emails above (open one in a browser: Stripe.js is the sandbox's)")
        story_told = True
        if serve:
            say("\nThe web app, worker, sandbox and mail catcher keep running. Press Ctrl-C to stop everything.")
            while web.poll() is None:
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        say("\nStopping…")
        # Ctrl-C is how a served demo ends; only an interrupted story is a failure.
        return 0 if story_told else 130
    finally:
        procs.stop()
        sandbox.stop()
        mail.stop()
        embedded.stop(base)
        say("Stopped everything the demo started.")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _forget_cached_settings() -> None:
    from billing import db
    from billing.settings import get_settings

    get_settings.cache_clear()
    db.reset_engine()
    with contextlib.suppress(ImportError):
        from billing.stripe_gateway import get_gateway

        get_gateway.cache_clear()


def _add_demo_staff() -> None:
    """An operator login for the finance console (the database is fresh on every demo)."""
    from billing import staff

    staff.add_staff(DEMO_STAFF, DEMO_PASSWORD, role="operator")


def _add_demo_api_key() -> str:
    """A write key for the demo's own API calls, printed at the end for the reader to try the API with."""
    from billing import apikeys

    return apikeys.create(DEMO_API_KEY_NAME, "write").key


def enrol_all(api: httpx.Client, sandbox) -> dict[int, Persona]:
    from billing.stripe_gateway import get_gateway

    subs: dict[int, Persona] = {}
    start_at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    for p in PERSONAS:
        customer = _ok(api.post("/api/customers", json={"email": p.email, "name": p.name, "country": p.country}))
        if p.saved_at:
            # A card saved years ago: attached at Stripe, then enrolled with the date it was saved.
            card = get_gateway().attach_payment_method(p.card, customer["stripe_customer_id"])
            pm = _ok(api.post(f"/api/customers/{customer['id']}/payment-methods/import",
                              json={"payment_method": card.payment_method_id, "saved_at": p.saved_at}))
            pm_id, note = pm["id"], " (previous authorization)" if pm.get("previous_authorization") else ""
        else:
            setup = _ok(api.post(f"/api/customers/{customer['id']}/card-setups", json={"payment_method": p.card}))
            if setup["status"] == "requires_action":
                # The cardholder passes the issuer's 3-D Secure challenge (the sandbox's control API
                # plays the browser here; /setup/{token} does it for real).
                sandbox.control.complete_3ds(setup["setup_intent_id"])
            got = _ok(api.get(f"/api/card-setups/{setup['setup_intent_id']}"))
            if got["status"] != "succeeded":
                say(f"    {p.name:<22} card setup {got['status']}")
                continue
            pm_id, note = got["payment_method"]["id"], " (3-D Secure)" if setup["status"] == "requires_action" else ""
        if p.declines_later:
            sandbox.control.decline_later(pm_id, p.declines_later)
        sub = _ok(api.post("/api/subscriptions", json={"customer_id": customer["id"], "amount": p.amount,
                                                      "currency": p.currency, "interval": "month",
                                                      "start_at": start_at}))
        subs[sub["id"]] = p
        say(f"    {p.name:<22} {p.country}  {_money(p.amount, p.currency):>12}/month  {p.card}{note}")
    return subs


def cycle(api: httpx.Client, subs: dict[int, Persona], now: datetime | None) -> None:
    from billing import charging
    from workers.tasks import enqueue_charge

    report = charging.run_due(now=now, enqueue=enqueue_charge)
    say(f"    {len(report.created)} charge(s) started; the worker is charging them…")
    statuses = charging.wait_until_decided(report.created, timeout=180,
                                           progress=lambda done, total: say(f"    {done}/{total} decided"))
    counts = Counter(statuses.values())
    for sub_id, persona in subs.items():
        detail = _ok(api.get(f"/api/subscriptions/{sub_id}"))
        charge = detail["charges"][-1] if detail["charges"] else None
        if charge is None or (charge["id"] not in statuses):
            say(f"    {persona.name:<22} subscription {detail['status']:<9} (not due: waiting on the customer)")
            continue
        why = charge["last_decline_code"] or charge["last_error_code"] or ""
        say(f"    {persona.name:<22} {charge['status']:<24} {why:<24} {persona.story}")
    say("    " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))


def relay_and_show(mail: MailCatcher, since: int) -> None:
    from billing import notifications

    result = notifications.relay_due()
    deadline = time.monotonic() + 30
    while len(mail.messages) < since + result.sent and time.monotonic() < deadline:
        time.sleep(0.1)
    new = mail.messages[since:]
    say(f"    {len(new)} email(s) sent by SMTP:")
    for msg in new:
        text = msg.get_body(("plain",)).get_content()
        link = next((w for w in text.split() if "/recover/" in w), "")
        say(f"    to {msg['To']}: {msg['Subject']}")
        if link:
            say(f"        {link}")


def recover_one(mail: MailCatcher, sandbox, address: str) -> None:
    """What the customer's browser does on /recover/<token> when they pay with a new card: Stripe.js
    confirms the same PaymentIntent with the client secret from the page, then the page reports back
    and the server reads the outcome from Stripe."""
    link = next((w for m in mail.messages if address in str(m["To"])
                 for w in m.get_body(("plain",)).get_content().split() if "/recover/" in w), None)
    if link is None:
        say(f"    no recovery email for {address}")
        return
    page = httpx.get(link, timeout=60)  # the customer's browser: a page behind its link, no API key
    data = json.loads(page.text.split('id="page-data">', 1)[1].split("</script>", 1)[0])
    say(f"    {address} opens the link: {data.get('amount_display', '')} owed, pays with a new card")
    intent_id = data["client_secret"].split("_secret_")[0]
    httpx.post(f"{sandbox.url}/v1/payment_intents/{intent_id}/confirm", timeout=30,
               data={"key": data["publishable_key"], "client_secret": data["client_secret"],
                     "payment_method": "pm_card_visa", "setup_future_usage": "off_session"})
    result = _ok(httpx.post(f"{link}/complete", json={}, timeout=60))
    card = result.get("new_card") or {}
    say(f"    the charge is {result['charge_status']}; the new card ({card.get('brand', '')} …{card.get('last4', '')}) "
        "is now the subscription's default, and the link is used up")


def _ok(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text}")
    return response.json()


def _money(amount: int, currency: str) -> str:
    from billing.notifications import format_amount

    return format_amount(amount, currency)
