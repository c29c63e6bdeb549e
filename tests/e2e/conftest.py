"""Browser journeys: real headless Chromium (Debian's, driven by Playwright; never a downloaded one)
against a real ``billing web`` subprocess, a real ``billing worker``, the Stripe sandbox (or
localstripe) and an SMTP sink.

Everything here is marked ``e2e`` (``pytest -m e2e`` selects them, ``-m "not e2e"`` leaves them out).
The fixtures of ``tests/integration`` (sandbox, SMTP sink, worker) and ``tests/conformance``
(localstripe process) are reused as they are.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conformance.conftest import localstripe_process  # noqa: F401
from tests.conftest import environ_applied
from tests.integration.conftest import (  # noqa: F401
    ROOT,
    _sandbox_server,
    _smtp_sink,
    app_env,
    billing_command,
    free_port,
    sandbox,
    smtp_server,
    wait_until,
    worker_factory,
)

CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Generous on purpose: two cores shared by Chromium, uvicorn, a worker, PostgreSQL and Redis.
UI_TIMEOUT_MS = 30_000
WEB_READY_TIMEOUT = 60.0
WEBHOOK_SECRET = "whsec_e2e_" + uuid.uuid4().hex
PUBLISHABLE_KEY = "pk_test_e2e"
SECRET_PATTERN = re.compile(r"(pi|seti)_[A-Za-z0-9]+_secret_[A-Za-z0-9_-]+")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class BrowserPage:
    """A fresh browser context and page, recording every URL the browser requested."""

    page: object
    urls: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


@pytest.fixture
def browser_page(browser) -> Iterator[BrowserPage]:
    context = browser.new_context(viewport={"width": 900, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    rec = BrowserPage(page=page)
    context.on("request", lambda request: rec.urls.append(request.url))
    page.on("console", lambda msg: rec.console.append(msg.text))
    yield rec
    context.close()


@dataclass
class WebServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self) -> httpx.Client:
        """A client of the JSON API, with a write key of its own."""
        from tests.integration.billing_helpers import api_key_headers

        return httpx.Client(base_url=self.url, timeout=30, trust_env=False, headers=api_key_headers())


def start_web(env: dict[str, str], port: int, log_dir: Path) -> WebServer:
    log_path = log_dir / f"web-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*billing_command(), "web", "--host", "127.0.0.1", "--port", str(port)],
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = WebServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    deadline = time.monotonic() + WEB_READY_TIMEOUT
    with httpx.Client(trust_env=False, timeout=5) as http:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"billing web exited with {proc.returncode}:\n{server.log()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{server.url}/healthz").status_code == 200:
                    return server
            if time.monotonic() > deadline:
                pytest.fail(f"billing web not ready after {WEB_READY_TIMEOUT:.0f}s:\n{server.log()[-3000:]}")
            time.sleep(0.2)


def stop_web(server: WebServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@contextlib.contextmanager
def product_env(env: dict[str, str], extra: dict[str, str]) -> Iterator[dict[str, str]]:
    """Add ``extra`` to the product's environment: the dict the worker fixture starts processes with,
    and this process's (in-process calls such as the outbox relay render links from it)."""
    env.update(extra)
    with environ_applied(extra):
        yield env


@dataclass
class Stack:
    web: WebServer
    worker: object
    stripe_url: str

    def logs(self) -> str:
        return self.web.log() + self.worker.log()


@pytest.fixture
def sandbox_stack(app_env, sandbox, worker_factory, tmp_path) -> Iterator[Stack]:  # noqa: F811
    """``billing web`` + a worker on the sandbox, with the sandbox's Stripe.js and signed webhooks."""
    port = free_port()
    extra = {"BILLING_PUBLIC_URL": f"http://127.0.0.1:{port}", "BILLING_STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
             "BILLING_STRIPE_JS_URL": f"{sandbox.url}/js/v3/stripe.js", "BILLING_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
             "BILLING_MERCHANT_NAME": "Acme Streaming"}
    with product_env(app_env, extra) as env:
        web = start_web(env, port, tmp_path)
        try:
            sandbox.control.add_webhook_endpoint(f"{web.url}/webhooks/stripe", WEBHOOK_SECRET)
            yield Stack(web=web, worker=worker_factory(), stripe_url=sandbox.url)
        finally:
            stop_web(web)


def assert_no_secrets(urls: list[str], logs: str) -> None:
    leaked = [u for u in urls if SECRET_PATTERN.search(u) or "client_secret" in u]
    assert not leaked, f"client secret in a URL the browser requested: {leaked}"
    found = SECRET_PATTERN.search(logs)
    assert found is None, f"client secret in a log line: …{logs[max(0, found.start() - 200):found.end()]}"


def recovery_link(message, public_url: str) -> str:
    """The recovery link from the text part of a real email."""
    text = message.get_body(("plain",)).get_content()
    match = re.search(re.escape(public_url) + r"/recover/[A-Za-z0-9_-]+", text)
    assert match, f"no recovery link in:\n{text}"
    return match.group(0)
