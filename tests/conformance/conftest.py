"""Backends for the conformance suite: our sandbox and localstripe, driven by the unmodified stripe SDK.

Every test in this package takes the ``backend`` fixture and therefore runs once per backend. A
backend bundles what a test needs and nothing Stripe itself would not offer: an API base URL and key
for ``stripe.StripeClient``, a signed-webhook inbox, and a way to play the customer's part in 3-D
Secure (on real Stripe that is Stripe.js in a browser; each stand-in has its own hook for it).

localstripe runs as a real subprocess on a free port; the sandbox runs in-process through
``sandbox.testing.SandboxServer``. Both live for the whole test session: tests isolate themselves by
creating their own customer and only looking at objects they created.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

BACKENDS = ("sandbox", "localstripe")

# Generous on purpose: the suite must stay green on a loaded two-core CI box.
STARTUP_TIMEOUT = 60.0
WEBHOOK_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Webhook receiver
# --------------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float


class WebhookInbox:
    """A real HTTP endpoint in a thread that records every delivery and answers 200.

    Signatures are checked when events are read, with ``stripe.Webhook.construct_event`` and this
    inbox's secret, exactly as the product's webhook endpoint does it.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._deliveries: list[Delivery] = []
        self._cond = threading.Condition()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                delivery = Delivery(self.path, dict(self.headers.items()), body, time.monotonic())
                with inbox._cond:
                    inbox._deliveries.append(delivery)
                    inbox._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-inbox", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/webhooks/stripe"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def deliveries(self) -> list[Delivery]:
        with self._cond:
            return list(self._deliveries)

    def verify(self, delivery: Delivery) -> stripe.Event:
        """Parse one delivery; raises ``stripe.SignatureVerificationError`` if the signature is bad."""
        return stripe.Webhook.construct_event(
            delivery.body.decode("utf-8"), delivery.headers.get("Stripe-Signature"), self.secret
        )

    def events(self, type_prefix: str = "") -> list[stripe.Event]:
        return [ev for ev in map(self.verify, self.deliveries()) if ev.type.startswith(type_prefix)]

    def wait_for(
        self,
        event_type: str,
        object_id: str | None = None,
        *,
        customer: str | None = None,
        timeout: float = WEBHOOK_TIMEOUT,
    ) -> stripe.Event:
        """The first verified ``event_type`` event about ``object_id`` (or an object of ``customer``).

        Polls until ``timeout``: deliveries are asynchronous and a loaded machine may be slow.
        """

        def matches(event: stripe.Event) -> bool:
            obj = event.data.object.to_dict()
            if event.type != event_type:
                return False
            if object_id is not None and obj.get("id") != object_id:
                return False
            return customer is None or obj.get("customer") == customer

        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if matches(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(ev.type, ev.data.object.to_dict().get("id")) for ev in self.events()]
                raise AssertionError(
                    f"no {event_type} webhook for {object_id or customer} within {timeout:.0f}s; received {seen}"
                )
            with self._cond:
                self._cond.wait(timeout=min(remaining, 0.5))


# --------------------------------------------------------------------------------------------------
# Backend handle
# --------------------------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    api_base: str
    api_key: str
    webhooks: WebhookInbox
    _complete_3ds: Callable[[Any], None]
    client: stripe.StripeClient = field(init=False)

    def __post_init__(self) -> None:
        # No SDK retries: a retried POST would hide exactly the duplicate-request behaviour some
        # scenarios look at.
        self.client = stripe.StripeClient(self.api_key, base_addresses={"api": self.api_base}, max_network_retries=0)

    def complete_3ds(self, intent: Any) -> None:
        """Play the cardholder passing 3-D Secure on a SetupIntent or PaymentIntent in requires_action."""
        self._complete_3ds(intent)

    def __repr__(self) -> str:
        return f"Backend({self.name} at {self.api_base})"


# --------------------------------------------------------------------------------------------------
# localstripe
# --------------------------------------------------------------------------------------------------


def _localstripe_command() -> list[str]:
    exe = Path(sys.executable).with_name("localstripe")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("localstripe")
    if found:
        return [found]
    pytest.fail("localstripe is not installed: pip install -e '.[dev]'")


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that has the kernel stop localstripe if this test process dies.

    Without it a killed or timed-out test run leaves localstripe serving on its port for good. libc
    is loaded here, in the parent, so the child only makes one system call before exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


@dataclass
class LocalstripeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@pytest.fixture(scope="session")
def localstripe_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalstripeProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    # --from-scratch: localstripe otherwise reloads whatever an earlier run pickled into /tmp.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*_localstripe_command(), "--port", str(port), "--from-scratch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
    server = LocalstripeProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_until_answering(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_until_answering(server: LocalstripeProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        while True:
            if server.proc.poll() is not None:
                pytest.fail(f"localstripe exited with {server.proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                # Any answer from the API (even 401) means the app is serving.
                http.get(f"{server.url}/v1/customers")
                return
            if time.monotonic() > deadline:
                pytest.fail(f"localstripe did not answer within {STARTUP_TIMEOUT:.0f}s:\n{server.log_tail()}")
            time.sleep(0.2)


def _localstripe_backend(server: LocalstripeProcess) -> Iterator[Backend]:
    inbox = WebhookInbox(secret="whsec_" + uuid.uuid4().hex)
    http = httpx.Client(base_url=server.url, trust_env=False, timeout=30.0)
    publishable_key = "pk_test_conformance"
    try:
        # localstripe's own configuration endpoint; there is no webhook-endpoint API in it.
        http.post("/_config/webhooks/conformance", data={"url": inbox.url, "secret": inbox.secret}).raise_for_status()

        def complete_3ds(intent: Any) -> None:
            # The two calls localstripe's fake Stripe.js (localstripe-v3.js) makes when the customer
            # clicks "Complete authentication" in its 3-D Secure dialog.
            if intent.id.startswith("seti_"):
                url = f"/v1/setup_intents/{intent.id}/confirm"
                body = {"key": publishable_key, "use_stripe_sdk": True, "client_secret": intent.client_secret}
            else:
                url = f"/v1/payment_intents/{intent.id}/_authenticate?success=true"
                body = {"key": publishable_key, "client_secret": intent.client_secret}
            response = http.post(url, content=json.dumps(body))
            assert response.status_code == 200, response.text

        yield Backend(
            name="localstripe",
            api_base=server.url,
            api_key="sk_test_conformance",
            webhooks=inbox,
            _complete_3ds=complete_3ds,
        )
    finally:
        http.close()
        inbox.close()


# --------------------------------------------------------------------------------------------------
# Our sandbox
# --------------------------------------------------------------------------------------------------


def _sandbox_backend() -> Iterator[Backend]:
    testing = pytest.importorskip("sandbox.testing", reason="sandbox.testing is not available yet")
    inbox = WebhookInbox(secret="whsec_" + uuid.uuid4().hex)
    try:
        # Rate limits are not among these scenarios (localstripe has none); lifting them keeps a burst
        # of setup calls on a fast machine from turning into 429s.
        with testing.SandboxServer(rate_global=None, rate_endpoint=None) as server:
            server.control.add_webhook_endpoint(inbox.url, inbox.secret)

            def complete_3ds(intent: Any) -> None:
                server.control.complete_3ds(intent.id)

            yield Backend(
                name="sandbox",
                api_base=server.url,
                api_key=server.api_key,
                webhooks=inbox,
                _complete_3ds=complete_3ds,
            )
    finally:
        inbox.close()


# --------------------------------------------------------------------------------------------------
# The fixture tests use
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "localstripe":
        yield from _localstripe_backend(request.getfixturevalue("localstripe_process"))
    else:
        yield from _sandbox_backend()
