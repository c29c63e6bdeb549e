"""The control API under ``/_sandbox/`` (no API key; JSON or form bodies).

| route | does |
|---|---|
| ``GET  /_sandbox/health`` | ``{"ok": true}`` |
| ``POST /_sandbox/reset`` | forget every object, event, key, fault, counter; back to startup config |
| ``GET  /_sandbox/ledger`` | every successful charge: payment_intent, charge, amount, currency, |
|  | customer, payment_method, metadata, created |
| ``GET/POST /_sandbox/clock`` | sandbox time; POST ``{"advance_seconds": N}`` or ``{"now": unix}`` (forward only) |
| ``GET  /_sandbox/requests`` | counters: total, by_endpoint, by_status, rate_limited, faults… |
| ``GET/POST/DELETE /_sandbox/faults`` | list / add (one rule, or ``{"rules": [...]}``) / clear fault rules |
| ``POST /_sandbox/latency`` | ``{"median_ms": m, "p99_ms": p}`` |
| ``POST /_sandbox/rate_limits`` | ``{"global": n or null, "endpoint": n or null}`` |
| ``GET/POST /_sandbox/webhook_endpoints`` | list / add ``{url, secret, enabled_events?}`` |
| ``DELETE /_sandbox/webhook_endpoints/{id}`` | remove one |
| ``GET  /_sandbox/webhook_deliveries`` | every delivery attempt (event, url, attempt, status, delivered) |
| ``POST /_sandbox/3ds/{intent_id}`` | ``{"outcome": "complete" or "fail"}`` finishes a pending 3-D Secure challenge |
| ``GET  /_sandbox/3ds/{intent_id}`` | a small HTML challenge page (what ``next_action`` points to); |
|  | ``?frame=1``: inside the Stripe.js stand-in's iframe, it answers by ``postMessage`` |
"""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from sandbox import cards
from sandbox.errors import StripeError
from sandbox.forms import parse_form

if TYPE_CHECKING:
    from sandbox.server import Sandbox

Result = tuple[int, bytes, dict[str, str]]


def _ok(body: Any, status: int = 200) -> Result:
    return status, json.dumps(body).encode(), {}


def _bad(message: str, status: int = 400) -> Result:
    return status, json.dumps({"error": {"type": "invalid_request_error", "message": message}}).encode(), {}


def _body(scope: dict, body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    ctype = ""
    for k, v in scope["headers"]:
        if k == b"content-type":
            ctype = v.decode("latin-1")
    if "json" in ctype or body.lstrip()[:1] in (b"{", b"["):
        data = json.loads(body)
        return data if isinstance(data, dict) else {"rules": data}
    return parse_form(body)


def _num(value: Any) -> float | None:
    if value in (None, "", "null", "none"):
        return None
    return float(value)


async def handle(sb: Sandbox, scope: dict, raw: bytes) -> Result:
    method, path = scope["method"], scope["path"].rstrip("/")
    try:
        data = _body(scope, raw) if method in ("POST", "PUT") else {}
    except ValueError as exc:
        return _bad(f"invalid body: {exc}")
    query = dict(parse_qsl(scope.get("query_string", b"").decode()))
    try:
        return _route(sb, method, path, data, query)
    except StripeError as exc:
        return exc.status, json.dumps(exc.body()).encode(), {}
    except (ValueError, TypeError, KeyError) as exc:
        return _bad(str(exc))


def _route(sb: Sandbox, method: str, path: str, data: dict[str, Any], query: dict[str, str]) -> Result:
    state = sb.state
    if path == "/_sandbox/health":
        return _ok({"ok": True})
    if path == "/_sandbox/reset" and method == "POST":
        sb.reset()
        return _ok({"ok": True})
    if path == "/_sandbox/ledger" and method == "GET":
        return _ok({"object": "list", "data": state.ledger})
    if path == "/_sandbox/clock":
        if method == "POST":
            if "advance_seconds" in data:
                state.clock.advance(float(data["advance_seconds"]))
            elif "now" in data:
                state.clock.set(float(data["now"]))
            else:
                return _bad("give advance_seconds or now")
            sb.idempotency.prune(state.clock.now())
        return _ok({"now": int(state.clock.now()), "offset_seconds": state.clock.offset})
    if path == "/_sandbox/requests" and method == "GET":
        c = sb.counters
        return _ok({**{k: (dict(v) if hasattr(v, "items") else v) for k, v in c.items()},
                    "faults_fired": dict(sb.faults.fired)})
    if path == "/_sandbox/faults":
        if method == "GET":
            return _ok({"rules": [r.to_dict() for r in sb.faults.rules], "latency": _latency(sb)})
        if method == "DELETE":
            sb.faults.clear()
            return _ok({"rules": []})
        if method == "POST":
            added = []
            if "latency" in data and isinstance(data["latency"], dict):
                lat = data["latency"]
                sb.faults.set_latency(_num(lat.get("median_ms")) or 0, _num(lat.get("p99_ms")))
            rules = data.get("rules")
            if rules is None and "fault" in data:
                rules = [data]
            for rule in rules or []:
                added.append(sb.faults.add(_coerce_rule(rule)).to_dict())
            return _ok({"added": added, "rules": [r.to_dict() for r in sb.faults.rules],
                        "latency": _latency(sb)})
    if path == "/_sandbox/latency" and method == "POST":
        sb.faults.set_latency(_num(data.get("median_ms")) or 0, _num(data.get("p99_ms")))
        return _ok(_latency(sb))
    if path == "/_sandbox/rate_limits" and method == "POST":
        sb.limiter.configure(_num(data.get("global")), _num(data.get("endpoint")))
        return _ok({"global": sb.limiter.global_rate, "endpoint": sb.limiter.endpoint_rate})
    if path == "/_sandbox/webhook_endpoints":
        if method == "GET":
            return _ok({"data": [e.to_dict() for e in sb.dispatcher.endpoints]})
        if method == "POST":
            if not data.get("url") or not data.get("secret"):
                return _bad("url and secret are required")
            events = data.get("enabled_events")
            ep = sb.dispatcher.add(str(data["url"]), str(data["secret"]),
                                   list(events) if isinstance(events, list) else None)
            return _ok(ep.to_dict())
    m = re.fullmatch(r"/_sandbox/webhook_endpoints/([^/]+)", path)
    if m and method == "DELETE":
        return _ok({"id": m.group(1), "deleted": sb.dispatcher.remove(m.group(1))})
    if path == "/_sandbox/webhook_deliveries" and method == "GET":
        return _ok({"data": sb.dispatcher.deliveries})
    m = re.fullmatch(r"/_sandbox/payment_methods/([^/]+)/decline_later", path)
    if m and method == "POST":
        info = state.card_info.get(m.group(1))
        if info is None:
            return _bad(f"no payment method {m.group(1)}", 404)
        code = data.get("decline_code")
        if code and code not in cards.DECLINES_BY_CODE:
            return _bad(f"unknown decline_code {code!r}; one of {sorted(cards.DECLINES_BY_CODE)}")
        info.later_decline = cards.DECLINES_BY_CODE[code] if code else None
        return _ok({"payment_method": m.group(1), "decline_code": code or None})
    m = re.fullmatch(r"/_sandbox/3ds/([^/]+)", path)
    if m:
        intent_id = m.group(1)
        if method == "GET":
            return _challenge_page(intent_id, query.get("return_url"), frame=query.get("frame") == "1")
        if method == "POST":
            intent = state.resolve_3ds(intent_id, str(data.get("outcome", "")))
            if data.get("frame") == "1":
                return _challenge_done(intent)
            return_url = data.get("return_url")
            if return_url:  # the HTML page's form: send the browser back like Stripe does
                sep = "&" if "?" in return_url else "?"
                key = "setup_intent" if intent["object"] == "setup_intent" else "payment_intent"
                target = return_url + sep + urlencode({key: intent_id,
                                                       f"{key}_client_secret": intent["client_secret"]})
                return 303, b"", {"Location": target, "Content-Type": "text/plain"}
            return _ok(intent)
    return _bad(f"unknown control route {method} {path}", 404)


def _coerce_rule(rule: dict[str, Any]) -> dict[str, Any]:
    out = dict(rule)
    for key in ("count",):
        if key in out and out[key] is not None:
            out[key] = int(out[key])
    for key in ("rate", "delay_ms"):
        if key in out and out[key] is not None:
            out[key] = float(out[key])
    if isinstance(out.get("saved"), str):
        out["saved"] = out["saved"].lower() == "true"
    return out


def _latency(sb: Sandbox) -> dict[str, float]:
    return {"median_ms": sb.faults.median_ms, "p99_ms": sb.faults.p99_ms}


def _challenge_page(intent_id: str, return_url: str | None, *, frame: bool = False) -> Result:
    hidden = (f'<input type="hidden" name="return_url" value="{html.escape(return_url)}">'
              if return_url else "")
    if frame:
        hidden += '<input type="hidden" name="frame" value="1">'
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>3D Secure test payment</title></head>
<body><h1>3D Secure 2 test page</h1><p>Authenticate {html.escape(intent_id)}?</p>
<form method="post" action="/_sandbox/3ds/{html.escape(intent_id)}">{hidden}
<button name="outcome" value="complete" id="complete">Complete authentication</button>
<button name="outcome" value="fail" id="fail">Fail authentication</button></form></body></html>"""
    return 200, page.encode(), {"Content-Type": "text/html; charset=utf-8"}


def _challenge_done(intent: dict[str, Any]) -> Result:
    """The challenge page's answer inside the Stripe.js stand-in's iframe: the intent as it now is,
    posted to the page that opened the frame (no redirect, so no client secret in any URL; the
    secret itself is left out of the message)."""
    public = {k: v for k, v in intent.items() if k != "client_secret"}
    message = json.dumps({"type": "sandbox-3ds-result", "intent": public}).replace("</", "<\\/")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>3D Secure test payment</title></head>
<body><p id="done">Authentication {html.escape(intent["status"])}.</p>
<script>window.parent.postMessage({message}, "*");</script></body></html>"""
    return 200, page.encode(), {"Content-Type": "text/html; charset=utf-8"}
