"""The body cap (billing.web.limits) at the ASGI level: it stops pulling the body the moment the cap is
crossed, answers 413 in the error shape whatever the app would have said, and reads nothing at all when
the declared length is already too large."""

from __future__ import annotations

import asyncio
import json
import threading

from fastapi import FastAPI, Request

from billing.web.limits import API_BODY_LIMIT, WEBHOOK_BODY_LIMIT, BodyLimit, limit_for

CHUNK = 16 * 1024


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/api/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/api/json")
    async def parsed(body: dict) -> dict:
        return {"keys": len(body)}

    @app.post("/webhooks/stripe")
    async def hook(request: Request) -> dict:
        try:
            await request.body()
        except Exception:
            return {"swallowed": True}  # an app that hides the error still cannot answer
        return {"read": True}

    return app


def _run(path: str, *, endless: bool = True, total: int = 0, headers: list | None = None):
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        pulled += 1
        more = endless or pulled * CHUNK < total
        return {"type": "http.request", "body": b"{" * CHUNK, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *(headers or [])], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    # A thread of its own: another test's event loop may still be running in the main thread.
    worker = threading.Thread(target=lambda: asyncio.run(BodyLimit(_app())(scope, receive, send)))
    worker.start()
    worker.join(30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def test_caps_by_path():
    assert limit_for("/webhooks/stripe") == WEBHOOK_BODY_LIMIT == 1024 * 1024
    assert limit_for("/api/customers") == API_BODY_LIMIT == 64 * 1024
    assert limit_for("/finance/login") == 64 * 1024
    assert limit_for("/anything") == 64 * 1024


def test_an_endless_body_is_413_and_read_no_further_than_the_cap():
    for path in ("/api/echo", "/api/json"):
        status, body, pulled = _run(path)
        assert status == 413
        assert body == {"error": {"code": "payload_too_large", "message": "the request body is larger than 64 KiB"}}
        assert pulled == API_BODY_LIMIT // CHUNK + 1  # the chunk that crossed the cap, and not one more


def test_the_app_cannot_answer_otherwise_once_the_cap_is_crossed():
    status, body, pulled = _run("/webhooks/stripe")
    assert status == 413 and body["error"]["message"] == "the request body is larger than 1 MiB"
    assert pulled == WEBHOOK_BODY_LIMIT // CHUNK + 1


def test_a_declared_length_over_the_cap_is_refused_before_reading():
    status, body, pulled = _run("/api/echo", headers=[(b"content-length", str(API_BODY_LIMIT + 1).encode())])
    assert (status, body["error"]["code"], pulled) == (413, "payload_too_large", 0)


def test_a_body_at_the_cap_passes():
    status, body, _ = _run("/api/echo", endless=False, total=API_BODY_LIMIT)
    assert (status, body) == (200, {"size": API_BODY_LIMIT})
