"""``POST /webhooks/stripe``: verify, store, answer; the work happens in a task after the commit.

Stripe wants a 2xx quickly and retries anything else for days
(https://docs.stripe.com/webhooks, "Quickly return a 2xx response" and "Retry behavior"), so the
handler verifies the signature on the raw body (:func:`billing.webhooks.verify`), stores the event in
one short transaction and enqueues its processing once that transaction has committed. A duplicate
delivery is acknowledged (``"duplicate": true``) and not processed again.

Answers: 200 ``{"received": true, "duplicate": bool}``; 400 ``{"error": {"code", "message"}}`` for a
missing or malformed signature header, a signature that does not match, a timestamp outside the
tolerance, a body that is not a JSON event; 413 for a body over 1 MiB (counted while it is read by
:mod:`billing.web.limits`, which stops reading there); 503 when no signing secret is configured, or the
database or queue is unavailable (Stripe delivers again later).

Logs name the event id, type and the refusal code, never the body or the signature header: a
SetupIntent's ``client_secret`` rides in the payload.

``get_webhook_enqueue`` and ``get_webhook_secret`` are FastAPI dependencies, so tests (or another
deployment) can run processing inline or change the secret through ``app.dependency_overrides``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from billing import webhooks
from billing.settings import get_settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["webhooks"])

Enqueue = Callable[[int], None]


def get_webhook_enqueue() -> Enqueue:
    """Processing goes to a Celery task (imported lazily: entry points hand work to workers/)."""
    from workers.tasks import enqueue_webhook_event

    return enqueue_webhook_event


def get_webhook_secret() -> str | None:
    return get_settings().stripe_webhook_secret


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@router.post("/webhooks/stripe", summary="Stripe webhook endpoint",
             responses={400: {"description": "refused: bad signature, stale or malformed"},
                        413: {"description": "the body is larger than 1 MiB"},
                        503: {"description": "not configured, or temporarily unable to store"}})
async def receive_stripe_webhook(request: Request, enqueue: Enqueue = Depends(get_webhook_enqueue),
                                 secret: str | None = Depends(get_webhook_secret)) -> JSONResponse:
    if not secret:
        log.error("BILLING_STRIPE_WEBHOOK_SECRET is not set: webhook deliveries are refused until it is")
        return _error(503, "webhook_secret_not_configured", "this endpoint has no signing secret configured")
    body = await request.body()  # at most WEBHOOK_BODY_LIMIT: billing.web.limits answers 413 beyond it
    try:
        event = webhooks.verify(body, request.headers.get(webhooks.SIGNATURE_HEADER), secret)
    except webhooks.WebhookError as exc:
        log.warning("webhook delivery refused", extra={"reason": exc.reason})
        return _error(400, exc.reason, exc.message)
    try:
        accepted = await run_in_threadpool(webhooks.accept, event, enqueue=enqueue)
    except SQLAlchemyError:
        log.exception("could not store a webhook event", extra={"event_id": event["id"]})
        return _error(503, "unavailable", "the event could not be stored; it will be delivered again")
    except Exception:
        # Stored, but not handed on: Stripe's next delivery of it enqueues the stored row.
        log.exception("could not enqueue a webhook event", extra={"event_id": event["id"]})
        return _error(503, "enqueue_failed", "the event was stored but not queued; it will be delivered again")
    return JSONResponse({"received": True, "duplicate": accepted.duplicate})
