"""Browser-facing headers for every response, and who may read ``/metrics``: one place for both.

Every HTML response gets a Content-Security-Policy that runs no inline script (and no inline
style): the pages' scripts and stylesheets are files served by the app. On top of it,
``frame-ancestors 'none'`` (with ``X-Frame-Options: DENY`` for older browsers), ``nosniff``,
``Referrer-Policy: no-referrer`` (the customer pages' URLs carry their token) and
``Cache-Control: no-store`` on anything that does not say otherwise (console pages, customer pages,
JSON: they are per-person and carry tokens; the static files set their own ``max-age``).

The customer pages (``/setup/…``, ``/recover/…``) load Stripe.js from ``BILLING_STRIPE_JS_URL``: their
policy adds exactly that origin for scripts, and the frames and connections Stripe.js needs. For
Stripe's own ``https://js.stripe.com`` those are the ones Stripe documents for a CSP — script from
``https://js.stripe.com``; frames from ``https://js.stripe.com``, ``https://*.js.stripe.com`` and
``https://hooks.stripe.com`` (the card element and the 3-D Secure challenge); connections to
``https://api.stripe.com`` (https://docs.stripe.com/security/guide#content-security-policy). Any
other origin is a Stripe stand-in (``billing sandbox``, localstripe) that serves its API and its
3-D Secure page from where it serves its script, so that one origin is allowed for all three.

The headers are set only where a response has not set them itself, so the middleware may wrap both
the app and the finance console mounted in it.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STRIPE_JS_ORIGIN = "https://js.stripe.com"
# https://docs.stripe.com/security/guide#content-security-policy
STRIPE_FRAMES = ("https://js.stripe.com", "https://*.js.stripe.com", "https://hooks.stripe.com")
STRIPE_CONNECT = ("https://api.stripe.com",)
STRIPE_PAGE_PREFIXES = ("/setup/", "/recover/")

_BASE_POLICY = {
    "default-src": ["'none'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "frame-src": ["'none'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
    "base-uri": ["'none'"],
    "object-src": ["'none'"],
}

ALWAYS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
HTML_ONLY = {"X-Frame-Options": "DENY"}


def _serialise(policy: dict[str, list[str]]) -> str:
    return "; ".join(f"{directive} {' '.join(sources)}" for directive, sources in policy.items())


DEFAULT_CSP = _serialise(_BASE_POLICY)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@functools.cache
def customer_page_csp(stripe_js_url: str) -> str:
    """The policy of ``/setup`` and ``/recover``: ours plus Stripe.js (see the module docstring)."""
    js = origin_of(stripe_js_url)
    frames, connect = (STRIPE_FRAMES, STRIPE_CONNECT) if js == STRIPE_JS_ORIGIN else ((js,), (js,))
    policy = {**_BASE_POLICY, "script-src": ["'self'", js], "frame-src": list(frames),
              "connect-src": ["'self'", *connect]}
    return _serialise(policy)


def policy_for(path: str, stripe_js_url: str) -> str:
    return customer_page_csp(stripe_js_url) if path.startswith(STRIPE_PAGE_PREFIXES) else DEFAULT_CSP


class SecurityHeaders:
    """ASGI middleware adding the headers above to each response that lacks them."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_headers(MutableHeaders(scope=message), path)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_headers(headers: MutableHeaders, path: str) -> None:
    from billing.settings import get_settings

    for name, value in ALWAYS.items():
        headers.setdefault(name, value)
    headers.setdefault("Cache-Control", "no-store")
    if headers.get("content-type", "").startswith("text/html"):
        headers.setdefault("Content-Security-Policy", policy_for(path, get_settings().stripe_js_url))
        for name, value in HTML_ONLY.items():
            headers.setdefault(name, value)


# --- /metrics --------------------------------------------------------------------------------------

def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_refusal(request: Request, token: str | None) -> int | None:
    """Why ``/metrics`` is refused to this request (401 or 404), or ``None`` when it may be served.

    With ``BILLING_METRICS_TOKEN`` set: ``Authorization: Bearer <token>``, compared in constant time,
    from anywhere (401 otherwise). Unset: only a scraper on the same machine talking to us directly —
    a loopback peer with no ``X-Forwarded-For``/``Forwarded`` header, since a reverse proxy on the
    same host would make every visitor look local; anyone else gets 404, as if there were no route.
    """
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
        return None if ok else 401
    proxied = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    peer = request.client.host if request.client else None
    return None if _is_loopback(peer) and not proxied else 404
