"""The FastAPI application: routers, the one error shape, health and metrics.

Every 4xx/5xx the app itself produces has the body ``{"error": {"code", "message"}}`` (some add
fields, e.g. ``setup_intent_id``): schema errors included (422 ``invalid_request``, with ``fields``),
malformed JSON (400 ``malformed_json``), unknown routes (404), wrong methods (405), bodies over their
cap (413 ``payload_too_large``, :mod:`billing.web.limits`) and unexpected errors (500 ``internal_error``).

Access logging is ours, not uvicorn's: one line per request with the route *template*, because the
paths of customer pages carry tokens that must not reach a log. An unexpected error is logged as its
type, route and code location only, never its message or traceback text, which may quote the request.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing import enrolment
from billing.metrics import register_backlog_collector
from billing.outcomes import TemporaryStripeError
from billing.web import metrics, security
from billing.web.limits import BodyLimit

log = logging.getLogger("billing.web")

STRIPE_RETRY_AFTER_SECONDS = 5

_ERROR_STATUS = {enrolment.NotFound: 404, enrolment.InvalidInput: 422, enrolment.Conflict: 409}
_HTTP_CODES = {400: "bad_request", 408: "request_timeout", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
               429: "too_many_requests"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, **extra}},
                        headers=headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "path", "query", "header")]
    return ".".join(parts) or "body"


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "malformed_json", "the request body is not valid JSON")
    fields = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in errors]
    first = fields[0] if fields else {"field": "body", "message": "invalid"}
    return error_response(422, "invalid_request", f"{first['field']}: {first['message']}", fields=fields)


async def _enrolment_error(_request: Request, exc: enrolment.EnrolmentError) -> JSONResponse:
    status = next((s for cls, s in _ERROR_STATUS.items() if isinstance(exc, cls)), 400)
    return error_response(status, exc.code, exc.message, **exc.details)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _stripe_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    metrics.STRIPE_UNAVAILABLE.inc()
    log.warning("Stripe unavailable", extra={"error": type(exc).__name__})
    return error_response(503, "stripe_unavailable", "the payment provider could not be reached; try again",
                          headers={"Retry-After": str(STRIPE_RETRY_AFTER_SECONDS)})


async def _stripe_misconfigured(_request: Request, exc: Exception) -> JSONResponse:
    log.error("Stripe refused our API key", extra={"error": str(exc)})
    return error_response(503, "stripe_misconfigured", "the payment provider refused this server's credentials")


def _log_unhandled(request: Request, exc: Exception) -> None:
    """An unexpected error as one line: its type, the route template and where it was raised.

    Never its message, arguments or local variables, and no traceback text: those may hold what the
    request carried (an email, a name). The code locations (file, line, function) are enough to find it.
    """
    route = getattr(request.scope.get("route"), "path", "unmatched")
    frames = traceback.extract_tb(exc.__traceback__)[-5:]
    where = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames]
    log.error("unhandled error in %s %s: %s", request.method, route, type(exc).__name__,
              extra={"method": request.method, "route": route, "error": type(exc).__name__, "where": where})


def _check_database() -> None:
    from sqlalchemy import text

    from billing.db import get_engine, retry_on_disconnect

    def select_one() -> None:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))

    # After PostgreSQL restarted, the pooled connections are dead: the first statement invalidates them and
    # a fresh connection answers, so a healthy database is reported healthy at once.
    retry_on_disconnect(select_one, tries=2)


HEALTH_CHECK_TIMEOUT = 3


@functools.cache
def _health_redis(url: str):
    """One client for every health check (a client per call would open a connection per probe), with short
    timeouts: a Redis that hangs is reported down within seconds rather than hanging the probe."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=HEALTH_CHECK_TIMEOUT,
                                socket_connect_timeout=HEALTH_CHECK_TIMEOUT)


def _check_redis() -> None:
    """PING; a Redis still loading its data after a restart answers ``BusyLoadingError``: down, for now."""
    from billing.ratelimit import resolve_broker_url
    from billing.settings import get_settings

    _health_redis(resolve_broker_url(get_settings())).ping()


def _add_docs(app: FastAPI) -> None:
    from billing.settings import get_settings
    from billing.web import docs

    if get_settings().api_docs and (router := docs.router(app.title, app.openapi_url or "/openapi.json")):
        app.include_router(router)


def create_app() -> FastAPI:
    from billing.stripe_gateway import StripeConfigError
    from billing.web import api, pages, webhooks

    # FastAPI's /docs and /redoc would load a CDN script into this origin: never (billing.web.docs).
    # redirect_slashes off: Starlette builds that redirect from the request's Host header, so a
    # trailing slash would send a browser (or a cache) to whatever host the client named.
    app = FastAPI(title="Billing", version="1", summary="Recurring off-session card billing on Stripe",
                  docs_url=None, redoc_url=None, redirect_slashes=False,
                  responses={422: {"description": "Validation error", "model": api.ErrorBody}})
    app.include_router(api.router)
    app.include_router(webhooks.router)
    app.include_router(pages.router)
    from billing.web.finance import create_finance_app

    app.mount("/finance", create_finance_app(), name="finance")

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(enrolment.EnrolmentError, _enrolment_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(TemporaryStripeError, _stripe_unavailable)
    app.add_exception_handler(StripeConfigError, _stripe_misconfigured)

    # Bodies capped while read (413); inside the access log, so its 413s are logged and counted too.
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        except Exception as exc:
            # Handled here, not re-raised: the server would log the exception's message, and a
            # message (a database error quoting its parameters, say) can carry the body's email or name.
            _log_unhandled(request, exc)
            return error_response(500, "internal_error", "something went wrong on our side; try again later")
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
            metrics.HTTP_LATENCY.labels(request.method, route).observe(elapsed)
            log.info("%s %s %s %.1fms", request.method, route, status, elapsed * 1000,
                     extra={"method": request.method, "route": route, "status": status,
                            "duration_ms": round(elapsed * 1000, 1)})

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """200 when PostgreSQL and Redis answer, else 503 naming what failed (each check is tried afresh on
        every call: a restarted dependency is reported up again as soon as it answers)."""
        checks: dict[str, str] = {}
        for name, check in (("database", _check_database), ("redis", _check_redis)):
            try:
                check()
                checks[name] = "ok"
            except Exception as exc:
                # The exception's type only: a driver's message may carry a connection string.
                checks[name] = f"error: {type(exc).__name__}"
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if healthy else 503,
                            content={"status": "ok" if healthy else "unavailable", "checks": checks})

    register_backlog_collector()  # queue depth and outbox backlog, read at scrape time

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={401: {"model": api.ErrorBody, "description": "BILLING_METRICS_TOKEN is set; wrong or no token"},
                        404: {"model": api.ErrorBody, "description": "no token set, and not a local scraper"}})
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition. With ``BILLING_METRICS_TOKEN``: ``Authorization: Bearer <token>``;
        without: only to a scraper on this machine (:func:`billing.web.security.metrics_refusal`)."""
        from billing.settings import get_settings

        refused = security.metrics_refusal(request, get_settings().metrics_token)
        if refused == 401:
            return error_response(401, "unauthorized", "a valid metrics token is required",
                                  headers={"WWW-Authenticate": "Bearer"})
        if refused is not None:
            return error_response(404, "not_found", "Not Found")
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    _add_docs(app)
    # Outermost: the headers land on every response, errors included.
    app.add_middleware(security.SecurityHeaders)

    return app
