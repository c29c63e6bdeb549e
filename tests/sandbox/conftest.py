"""One sandbox for the whole suite (rate limits lifted, webhook retries compressed); every test
starts from a reset. Tests drive it only through the unmodified stripe SDK, raw HTTP where the SDK
hides what is checked (headers, dropped connections), and the control API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import stripe

from sandbox.testing import SandboxServer

WEBHOOK_SECRET = "whsec_test_sandbox_secret"


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(rate_global=None, rate_endpoint=None, webhook_retry_schedule=(0.05, 0.1, 0.2),
                       webhook_timeout_s=5) as server:
        yield server


@pytest.fixture
def sb(sandbox_server: SandboxServer) -> SandboxServer:
    sandbox_server.control.reset()
    return sandbox_server


@pytest.fixture
def client(sb: SandboxServer) -> stripe.StripeClient:
    return stripe.StripeClient(sb.api_key, base_addresses={"api": sb.url}, max_network_retries=0)


@pytest.fixture
def customer(client: stripe.StripeClient) -> stripe.Customer:
    return client.v1.customers.create(params={"email": "ada@example.com", "name": "Ada"})


class Inbox:
    """A tiny webhook receiver: records every POST; answers the statuses queued in ``plan``."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.plan: list[int] = []
        self.lock = threading.Lock()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with inbox.lock:
                    status = inbox.plan.pop(0) if inbox.plan else 200
                    inbox.received.append({"headers": dict(self.headers), "body": body, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = list(self.received)
            if predicate(got):
                return got
            time.sleep(0.02)
        raise AssertionError(f"webhook condition not met; received {[json.loads(r['body'])['type'] for r in got]}")

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def inbox(sb: SandboxServer) -> Iterator[Inbox]:
    box = Inbox()
    sb.control.add_webhook_endpoint(box.url, WEBHOOK_SECRET)
    yield box
    box.close()
