"""Request bodies capped while they are read: 413 ``payload_too_large`` as soon as the cap is crossed.

A handler that calls ``await request.body()`` holds the whole body in memory before it can look at
its size, and a chunked request declares no size at all: a 300 MiB chunked body would be read whole.
:class:`BodyLimit` is plain ASGI middleware in front of the app, so it sees every ``http.request``
message as the server hands it over:

- a declared ``Content-Length`` above the cap is answered 413 at once, before the app runs or a
  byte of the body is read;
- otherwise the bytes are counted as the app reads them; the message that crosses the cap is not
  given to the app (it gets :class:`BodyTooLarge` instead, a 413 ``HTTPException``) and nothing more is
  read. Whatever the app then answers, the client gets our 413 in the app's error shape
  ``{"error": {"code": "payload_too_large", "message"}}``. The server drops what the client still
  sends (uvicorn discards body data once the response is complete).

Caps by path prefix (:data:`LIMITS`): the Stripe webhook 1 MiB (Stripe's events are far smaller),
the JSON API 64 KiB, everything else (finance console forms, customer pages' JSON) 64 KiB too.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KIB = 1024
MIB = 1024 * KIB
WEBHOOK_BODY_LIMIT = 1 * MIB
API_BODY_LIMIT = 64 * KIB
DEFAULT_BODY_LIMIT = 64 * KIB
# The longest a client may pause between pieces of a request body before it is answered 408: a body
# that stalls would otherwise hold its connection (and a worker slot) forever, as uvicorn has no
# body timeout of its own. Bodies here are at most 1 MiB, so a healthy client never pauses this long.
BODY_READ_TIMEOUT_SECONDS = 10.0

# First match wins: (path prefix, cap in bytes).
LIMITS: tuple[tuple[str, int], ...] = (
    ("/webhooks/stripe", WEBHOOK_BODY_LIMIT),
    ("/api/", API_BODY_LIMIT),
    ("/finance/", DEFAULT_BODY_LIMIT),
)


def limit_for(path: str) -> int:
    return next((cap for prefix, cap in LIMITS if path.startswith(prefix)), DEFAULT_BODY_LIMIT)


def describe(cap: int) -> str:
    return f"{cap // MIB} MiB" if cap % MIB == 0 else f"{cap // KIB} KiB"


class BodyTooLarge(HTTPException):
    """What the app gets from ``receive`` instead of the message that crossed the cap.

    A FastAPI ``HTTPException`` so that FastAPI's body parsing passes it on as it is (it turns other
    exceptions into a 400) and the app's handler shapes it as a 413.
    """

    def __init__(self, cap: int):
        super().__init__(413, f"the request body is larger than {describe(cap)}")
        self.cap = cap


class BodyStalled(HTTPException):
    def __init__(self):
        super().__init__(status_code=408, detail="the request body stopped arriving")


async def _send_too_large(send: Send, cap: int) -> None:
    await _send_error(send, 413, "payload_too_large", f"the request body is larger than {describe(cap)}")


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimit:
    """Caps each HTTP request's body at :func:`limit_for` its path."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = limit_for(scope.get("path", ""))
        declared = _declared_length(scope)
        if declared is not None and declared > cap:
            await _send_too_large(send, cap)
            return
        seen = 0
        exceeded = False
        stalled = False
        body_done = False
        started = False

        async def capped_receive() -> Message:
            nonlocal seen, exceeded, stalled, body_done
            if exceeded:
                raise BodyTooLarge(cap)  # never read on once the cap was crossed
            if body_done:
                return await receive()  # after the body only http.disconnect comes: no deadline
            try:
                message = await asyncio.wait_for(receive(), BODY_READ_TIMEOUT_SECONDS)
            except TimeoutError:
                stalled = True
                raise BodyStalled() from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > cap:
                    exceeded = True
                    raise BodyTooLarge(cap)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if (exceeded or stalled) and not started:
                return  # the app's own answer to BodyTooLarge: ours goes out instead, below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except (BodyTooLarge, BodyStalled):
            pass
        except Exception:
            if not (exceeded or stalled):
                raise
        if exceeded and not started:
            await _send_too_large(send, cap)
        elif stalled and not started:
            await _send_error(send, 408, "request_timeout", "the request body stopped arriving")
