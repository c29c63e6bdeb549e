"""The sandbox ASGI app, its configuration and the ``main`` entry point (uvicorn).

Request pipeline for ``/v1``: authenticate (Bearer ``sk_test_…``) → count → rate limit → fault
pick → idempotency key → object lock → latency → handler → save idempotent result → send (or
lose/delay the response, as faults ask). ``/_sandbox/…`` is the control API (see control.py).
Handlers are synchronous and share one event loop, so each request's state change is atomic;
latency is ``await asyncio.sleep`` so many requests can be in flight.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import control, publishable, routes
from sandbox.errors import StripeError, api_error, lock_timeout, rate_limited
from sandbox.faults import Faults
from sandbox.forms import parse_form
from sandbox.idempotency import IdempotencyStore, fingerprint
from sandbox.limits import ObjectLocks, RateLimiter
from sandbox.state import API_VERSION, State, new_id
from sandbox.webhooks import DEFAULT_RETRY_SCHEDULE, Dispatcher

log = logging.getLogger("sandbox")


@dataclass
class SandboxConfig:
    """Everything the sandbox can be started with; the control API changes most of it at runtime.

    Rate limits default to Stripe's documented ones (https://docs.stripe.com/rate-limits); ``None``
    or 0 lifts a limit. Latency is log-normal with the given median and 99th percentile.
    """

    seed: int = 0
    latency_median_ms: float = 0.0
    latency_p99_ms: float | None = None
    rate_global: float | None = 100.0
    rate_endpoint: float | None = 25.0
    webhook_endpoints: list[tuple[str, str]] = field(default_factory=list)
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    webhook_timeout_s: float = 10.0
    api_key_prefix: str = "sk_test_"
    lock_wait_ms: float = 0.0
    idempotency_ttl_s: float = 24 * 3600
    faults: list[dict[str, Any]] = field(default_factory=list)


class Sandbox:
    """All mutable parts of one sandbox instance."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.faults = Faults(config.seed, config.latency_median_ms, config.latency_p99_ms)
        self.dispatcher = Dispatcher(self.faults, config.webhook_retry_schedule, config.webhook_timeout_s)
        for url, secret in config.webhook_endpoints:
            self.dispatcher.add(url, secret, from_config=True)
        self.state = State(on_event=self.dispatcher.enqueue)
        self.idempotency = IdempotencyStore(config.idempotency_ttl_s)
        self.limiter = RateLimiter(config.rate_global, config.rate_endpoint)
        self.locks = ObjectLocks(config.lock_wait_ms / 1000)
        for rule in config.faults:
            self.faults.add(rule)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.counters: dict[str, Any] = {
            "total": 0, "by_endpoint": Counter(), "by_status": Counter(), "rate_limited": 0,
            "lock_timeouts": 0, "idempotent_replays": 0, "faults": Counter(), "in_flight": 0,
            "max_in_flight": 0, "started_at": time.time(),
        }

    def reset(self) -> None:
        """Back to the startup configuration: no objects, events, keys, faults or counters."""
        cfg = self.config
        self.state.reset()
        self.state.clock.offset = 0.0
        self.idempotency.clear()
        self.dispatcher.reset()
        self.faults.reset(cfg.seed, cfg.latency_median_ms, cfg.latency_p99_ms)
        for rule in cfg.faults:
            self.faults.add(rule)
        self.limiter.configure(cfg.rate_global, cfg.rate_endpoint)
        self.reset_counters()


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(body).encode(), headers or {}


class SandboxApp:
    """The ASGI application."""

    def __init__(self, config: SandboxConfig) -> None:
        self.sandbox = Sandbox(config)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path: str = scope["path"]
        if path.startswith("/_sandbox"):
            status, payload, headers = await control.handle(self.sandbox, scope, body)
            await _send(send, status, payload, headers)
            return
        if path.startswith("/js/"):
            await _send(send, *_stripe_js(path))
            return
        if scope["method"] == "OPTIONS":
            # CORS preflight: Stripe's API answers browsers from any origin.
            await _send(send, 204, b"", {**_CORS, "Access-Control-Allow-Methods": "GET, POST, DELETE",
                                         "Access-Control-Allow-Headers": "Authorization, Content-Type, "
                                                                         "Idempotency-Key, Stripe-Version",
                                         "Access-Control-Max-Age": "600"})
            return
        await self._api(scope, body, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.sandbox.dispatcher.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _api(self, scope: dict, body: bytes, send: Any) -> None:
        sb = self.sandbox
        c = sb.counters
        c["total"] += 1
        c["in_flight"] += 1
        c["max_in_flight"] = max(c["max_in_flight"], c["in_flight"])
        try:
            result = await self._api_inner(scope, body)
        finally:
            c["in_flight"] -= 1
        if result is None:  # connection dropped on purpose
            transport = scope.get("sandbox.transport")
            if transport is not None:
                transport.abort()
                await asyncio.sleep(0)
                return
            result = _json(500, api_error().body())
        status, payload, headers = result
        c["by_status"][str(status)] += 1
        await _send(send, status, payload, headers)

    async def _api_inner(self, scope: dict, body: bytes) -> tuple[int, bytes, dict[str, str]] | None:
        sb = self.sandbox
        method: str = scope["method"]
        path: str = scope["path"]
        req_id = new_id("req")
        base_headers = {"Request-Id": req_id, "Stripe-Version": API_VERSION, **_CORS}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        try:
            if method == "GET":
                params = parse_form(scope.get("query_string", b""))
            else:
                params = parse_form(body)
                if scope.get("query_string"):
                    params = {**parse_form(scope["query_string"]), **params}
        except Exception:  # malformed body
            params = {}

        api_key = _api_key(headers.get("authorization", ""))
        # Stripe.js sends the publishable key as the ``key`` field instead of an Authorization header.
        is_publishable = False
        if api_key is None and isinstance(params.get("key"), str) and params["key"].startswith("pk_"):
            api_key, is_publishable = params["key"], True
        if api_key is None:
            return _json(401, {"error": {
                "type": "invalid_request_error",
                "message": "You did not provide an API key. You need to provide your API key in the "
                           "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                           "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                           "or we can help at https://support.stripe.com/."}}, base_headers)
        prefix = publishable.PREFIX if is_publishable else sb.config.api_key_prefix
        if not api_key.startswith(prefix) or len(api_key) <= len(prefix):
            masked = api_key[:8] + "*" * max(0, len(api_key) - 12) + api_key[-4:]
            return _json(401, {"error": {"type": "invalid_request_error",
                                         "message": f"Invalid API Key provided: {masked}"}}, base_headers)

        matched = routes.match(method, path)
        if matched is None:
            return _json(404, {"error": {
                "type": "invalid_request_error",
                "message": f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                           "or we can help at https://support.stripe.com/."}}, base_headers)
        route, ids = matched
        sb.counters["by_endpoint"][route.name] += 1

        if not sb.limiter.allow(route.name):
            sb.counters["rate_limited"] += 1
            return self._error(rate_limited(), base_headers)

        if is_publishable:
            try:
                params = publishable.prepare(sb.state, route.name, ids, params)
            except StripeError as exc:
                return self._error(exc, base_headers)

        fault = sb.faults.pick("api", method, path)
        if fault is not None:
            sb.counters["faults"][fault.fault] += 1
            if fault.fault == "reset":
                return None
            if fault.fault == "rate_limit":
                sb.counters["rate_limited"] += 1
                return self._error(rate_limited(), base_headers)
            if fault.fault == "lock_timeout":
                sb.counters["lock_timeouts"] += 1
                return self._error(lock_timeout(), base_headers)

        idem_key = headers.get("idempotency-key") if method == "POST" else None
        if idem_key:
            base_headers["Idempotency-Key"] = idem_key
            try:
                saved = sb.idempotency.begin(api_key, idem_key, fingerprint(method, path, params),
                                             sb.state.clock.now())
            except StripeError as exc:
                return self._error(exc, base_headers)
            if saved is not None:
                sb.counters["idempotent_replays"] += 1
                return saved.status, saved.body, {**saved.headers, "Idempotent-Replayed": "true",
                                                  "Request-Id": req_id}

        lock_key = ids[0] if route.lock and ids else None
        if lock_key is not None and not await sb.locks.acquire(lock_key):
            sb.counters["lock_timeouts"] += 1
            if idem_key:
                sb.idempotency.abandon(api_key, idem_key)
            return self._error(lock_timeout(), base_headers)
        try:
            delay = sb.faults.latency_s()
            if delay:
                await asyncio.sleep(delay)
            if fault is not None and fault.fault == "api_error":
                exc = api_error()
                exc.saved = fault.saved
                status, payload, out_headers = self._error(exc, base_headers)
                saved_ok = exc.saved
            else:
                status, payload, out_headers, saved_ok = self._execute(route, ids, params, req_id, idem_key,
                                                                        base_headers)
        finally:
            if lock_key is not None:
                sb.locks.release(lock_key)

        if idem_key:
            if saved_ok:
                sb.idempotency.finish(api_key, idem_key, status, payload, out_headers)
            else:
                sb.idempotency.abandon(api_key, idem_key)

        if fault is not None and fault.fault == "lose_response":
            return None
        if fault is not None and fault.fault == "slow":
            await asyncio.sleep(fault.delay_ms / 1000)
        return status, payload, out_headers

    def _execute(self, route: routes.Route, ids: tuple[str, ...], params: dict[str, Any], req_id: str,
                 idem_key: str | None, base_headers: dict[str, str]) -> tuple[int, bytes, dict[str, str], bool]:
        state = self.sandbox.state
        request = {"id": req_id, "idempotency_key": idem_key}
        try:
            obj = route.handler(state, params, ids, request)
            expand = [str(x) for x in (params.get("expand") or [])] if isinstance(
                params.get("expand"), list) else ([params["expand"]] if params.get("expand") else [])
            if expand:
                obj = state.expand(obj, expand)
            return 200, json.dumps(obj).encode(), dict(base_headers), True
        except StripeError as exc:
            if exc.status == 429:
                self.sandbox.counters["lock_timeouts"] += 1
            status, payload, headers = self._error(exc, base_headers)
            return status, payload, headers, exc.saved
        except Exception:
            log.exception("handler %s failed", route.name)
            status, payload, headers = self._error(api_error(), base_headers)
            return status, payload, headers, True

    @staticmethod
    def _error(exc: StripeError, base_headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        body = exc.body()
        body["error"]["request_log_url"] = (
            f"https://dashboard.stripe.com/test/logs/{base_headers.get('Request-Id', '')}")
        return exc.status, json.dumps(body).encode(), {**base_headers, **exc.headers}


_CORS = {"Access-Control-Allow-Origin": "*"}
_JS_FILE = Path(__file__).with_name("stripe.js")


def _stripe_js(path: str) -> tuple[int, bytes, dict[str, str]]:
    """The Stripe.js stand-in (``sandbox/stripe.js``) at ``/js/v3/`` or ``/js/v3/stripe.js``."""
    if path.rstrip("/") not in ("/js/v3", "/js/v3/stripe.js"):
        return 404, b"not found", {"Content-Type": "text/plain"}
    return 200, _JS_FILE.read_bytes(), {"Content-Type": "application/javascript; charset=utf-8",
                                        "Cache-Control": "no-cache", **_CORS}


def _api_key(authorization: str) -> str | None:
    """Bearer or Basic auth (https://docs.stripe.com/api/authentication)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic":
        try:
            user = base64.b64decode(value.strip()).decode().split(":", 1)[0]
        except Exception:
            return None
        return user or None
    return None


async def _send(send: Any, status: int, payload: bytes, headers: dict[str, str]) -> None:
    content_type = headers.pop("Content-Type", "application/json")
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def create_app(config: SandboxConfig | None = None) -> SandboxApp:
    """Build the ASGI app. ``app.sandbox`` gives in-process access to its state."""
    return SandboxApp(config or SandboxConfig())


def uvicorn_config(app: SandboxApp, host: str, port: int, log_level: str = "warning") -> Any:
    """uvicorn on uvloop + httptools, with a protocol that lets the app drop a connection."""
    import uvicorn

    from sandbox.transport import SandboxHttpProtocol

    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http=SandboxHttpProtocol,
                          lifespan="on", log_level=log_level, access_log=False, backlog=4096,
                          timeout_keep_alive=30)


def main(host: str = "127.0.0.1", port: int = 12111, **options: Any) -> None:
    """Serve the sandbox until interrupted. ``options`` are ``SandboxConfig`` fields."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    endpoints = options.pop("webhook_endpoints", None) or []
    # Rate limits: None or 0 lifts a limit, so they are passed through even when None.
    kept = {k: v for k, v in options.items() if v is not None or k in ("rate_global", "rate_endpoint")}
    config = SandboxConfig(**kept, webhook_endpoints=endpoints)
    app = create_app(config)
    log.info("Stripe sandbox on http://%s:%d (api_base), control API under /_sandbox/", host, port)
    uvicorn.Server(uvicorn_config(app, host, port, "info")).run()

