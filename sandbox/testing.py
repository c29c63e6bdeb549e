"""Run the sandbox in-process for tests.

    with SandboxServer(rate_global=None, rate_endpoint=None) as sb:
        client = stripe.StripeClient(sb.api_key, base_addresses={"api": sb.url})
        ...
        sb.control.complete_3ds(setup_intent.id)
        assert sb.control.ledger() == [...]

The server runs on a free port of 127.0.0.1 in a background thread with its own event loop.
Keyword arguments are ``SandboxConfig`` fields.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx

from sandbox.server import SandboxApp, SandboxConfig, create_app, uvicorn_config


class Control:
    """Thin client for the ``/_sandbox/`` control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self.http.post(path, json=body or {})
        resp.raise_for_status()
        return resp.json()

    def _get(self, path: str) -> Any:
        resp = self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    def reset(self) -> None:
        self._post("/_sandbox/reset")

    def ledger(self) -> list[dict[str, Any]]:
        return self._get("/_sandbox/ledger")["data"]

    def now(self) -> int:
        return self._get("/_sandbox/clock")["now"]

    def advance(self, seconds: float) -> int:
        return self._post("/_sandbox/clock", {"advance_seconds": seconds})["now"]

    def set_time(self, now: float) -> int:
        return self._post("/_sandbox/clock", {"now": now})["now"]

    def add_fault(self, fault: str, *, method: str | None = None, path: str | None = None,
                  count: int | None = None, rate: float | None = None, delay_ms: float | None = None,
                  event_type: str | None = None, saved: bool | None = None) -> dict[str, Any]:
        rule: dict[str, Any] = {"fault": fault}
        for key, value in (("method", method), ("path", path), ("count", count), ("rate", rate),
                           ("delay_ms", delay_ms), ("event_type", event_type), ("saved", saved)):
            if value is not None:
                rule[key] = value
        return self._post("/_sandbox/faults", rule)["added"][0]

    def faults(self) -> list[dict[str, Any]]:
        return self._get("/_sandbox/faults")["rules"]

    def clear_faults(self) -> None:
        self.http.delete("/_sandbox/faults").raise_for_status()

    def set_latency(self, median_ms: float, p99_ms: float | None = None) -> dict[str, float]:
        return self._post("/_sandbox/latency", {"median_ms": median_ms, "p99_ms": p99_ms})

    def set_rate_limits(self, global_rate: float | None, endpoint_rate: float | None) -> dict[str, Any]:
        return self._post("/_sandbox/rate_limits", {"global": global_rate, "endpoint": endpoint_rate})

    def add_webhook_endpoint(self, url: str, secret: str, enabled_events: list[str] | None = None
                             ) -> dict[str, Any]:
        body: dict[str, Any] = {"url": url, "secret": secret}
        if enabled_events:
            body["enabled_events"] = enabled_events
        return self._post("/_sandbox/webhook_endpoints", body)

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        return self._get("/_sandbox/webhook_deliveries")["data"]

    def decline_later(self, payment_method_id: str, decline_code: str | None) -> dict[str, Any]:
        """From now on the issuer declines this saved card with ``decline_code`` (None: stops)."""
        return self._post(f"/_sandbox/payment_methods/{payment_method_id}/decline_later",
                          {"decline_code": decline_code})

    def complete_3ds(self, intent_id: str) -> dict[str, Any]:
        return self._post(f"/_sandbox/3ds/{intent_id}", {"outcome": "complete"})

    def fail_3ds(self, intent_id: str) -> dict[str, Any]:
        return self._post(f"/_sandbox/3ds/{intent_id}", {"outcome": "fail"})

    def requests(self) -> dict[str, Any]:
        return self._get("/_sandbox/requests")

    def close(self) -> None:
        self.http.close()


class SandboxServer:
    """Context manager: the sandbox on a free port, in a background thread.

    Attributes: ``url`` (the ``api_base``), ``api_key``, ``control`` (``Control``), ``app``
    (the ASGI app; ``app.sandbox.state`` for white-box checks from the same process).
    """

    api_key = "sk_test_sandbox"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.host = host
        self.config = SandboxConfig(**config)
        self.app: SandboxApp = create_app(self.config)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.control = Control(self.url)

    def start(self) -> SandboxServer:
        import uvicorn

        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="stripe-sandbox", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.control.close()
        self._sock.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
