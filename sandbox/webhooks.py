"""Webhook delivery (https://docs.stripe.com/webhooks).

Each Event is POSTed as JSON to every endpoint with a ``Stripe-Signature: t=…,v1=…`` header,
``v1`` being HMAC-SHA256 of ``"{t}.{payload}"`` keyed by the endpoint secret
(https://docs.stripe.com/webhooks#verify-manually). ``t`` is real wall time, not sandbox time, so
receivers' default 300 s tolerance holds even after the sandbox clock moved. Non-2xx answers and
connection errors are retried on a backoff schedule (Stripe retries for up to three days with
exponential backoff, https://docs.stripe.com/webhooks#retries); deliveries are at-least-once and
unordered, which the ``duplicate``/``reorder`` faults make visible.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from sandbox.faults import Faults
from sandbox.state import new_id

log = logging.getLogger("sandbox.webhooks")

# Live-mode-like exponential backoff, about three days in total.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60, 300, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 72000)


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@dataclass
class Endpoint:
    url: str
    secret: str
    enabled_events: list[str] = field(default_factory=lambda: ["*"])
    id: str = field(default_factory=lambda: new_id("we"))
    from_config: bool = False

    def wants(self, type_: str) -> bool:
        return any(e == "*" or e == type_ or (e.endswith(".*") and type_.startswith(e[:-1]))
                   for e in self.enabled_events)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "webhook_endpoint", "url": self.url,
                "enabled_events": self.enabled_events, "status": "enabled"}


class Dispatcher:
    def __init__(self, faults: Faults, retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE,
                 timeout_s: float = 10.0) -> None:
        self.faults = faults
        self.retry_schedule = tuple(retry_schedule)
        self.timeout_s = timeout_s
        self.endpoints: list[Endpoint] = []
        self.deliveries: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task] = set()
        self.client: httpx.AsyncClient | None = None

    def add(self, url: str, secret: str, enabled_events: list[str] | None = None,
            from_config: bool = False) -> Endpoint:
        ep = Endpoint(url, secret, enabled_events or ["*"], from_config=from_config)
        self.endpoints.append(ep)
        return ep

    def remove(self, ep_id: str) -> bool:
        before = len(self.endpoints)
        self.endpoints = [e for e in self.endpoints if e.id != ep_id]
        return len(self.endpoints) != before

    def reset(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.tasks.clear()
        self.deliveries.clear()
        self.endpoints = [e for e in self.endpoints if e.from_config]

    def enqueue(self, event: dict[str, Any]) -> None:
        targets = [e for e in self.endpoints if e.wants(event["type"])]
        if not targets:
            return
        event["pending_webhooks"] = len(targets)
        payload = json.dumps(event, indent=2)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for ep in targets:
            copies, delay = 1, 0.0
            rule = self.faults.pick("webhook", "POST", ep.url, event["type"])
            if rule is not None and rule.fault == "drop":
                self._dropped(ep, event)
                continue
            if rule is not None and rule.fault == "duplicate":
                copies = 2
            elif rule is not None and rule.fault == "reorder":
                delay = (rule.delay_ms or 500) / 1000
            for _ in range(copies):
                task = loop.create_task(self._deliver(ep, event, payload, delay))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def _dropped(self, ep: Endpoint, event: dict[str, Any]) -> None:
        """A delivery given up on at once (the ``drop`` fault): it stays pending for that endpoint, as an
        event Stripe stopped retrying does (https://docs.stripe.com/webhooks#retries)."""
        self.deliveries.append({"event": event["id"], "type": event["type"], "endpoint": ep.id, "url": ep.url,
                                "attempt": 1, "status": None, "error": "dropped by fault", "delivered": False,
                                "at": time.time()})

    async def _deliver(self, ep: Endpoint, event: dict[str, Any], payload: str, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            error = None
            try:
                resp = await self.client.post(ep.url, content=payload.encode(), headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    "Stripe-Signature": sign(payload, ep.secret),
                })
                status = resp.status_code
            except (httpx.HTTPError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            ok = status is not None and 200 <= status < 300
            self.deliveries.append({"event": event["id"], "type": event["type"], "endpoint": ep.id,
                                    "url": ep.url, "attempt": attempt, "status": status, "error": error,
                                    "delivered": ok, "at": time.time()})
            if ok:
                event["pending_webhooks"] = max(0, event.get("pending_webhooks", 1) - 1)
                return
            if attempt > len(self.retry_schedule):
                log.warning("webhook %s to %s given up after %d attempts", event["id"], ep.url, attempt)
                return
            await asyncio.sleep(self.retry_schedule[attempt - 1])

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
