"""The finance console, ``/finance/…``: a small HTML app of its own, mounted into the main one.

Its own app so its errors are pages, not the API's JSON, and so one rule covers every route: nothing
but the login page (and its stylesheet) answers without a live staff session; anything else redirects
to the login. Viewers read; operators also act. Every form carries the session's CSRF token
(synchronizer token); the login form, which has no session yet, a signed double-submit cookie. A
refused token is a 403 page and changes nothing.

Pages: ``queue`` (filters, sort, pagination, CSV under the same filter), ``charges/{id}`` (timeline
and actions), ``overview`` (totals and SVG charts).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing import finance, notifications, staff, templating
from billing import queue as queue_mod
from billing.db import unit_of_work
from billing.settings import get_settings
from billing.text import CONTROL_MESSAGE, MULTILINE_ALLOWED, has_control_characters
from billing.web import charts, security
from billing.web.client import client_address

log = logging.getLogger("billing.web.finance")

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "finance_session"
LOGIN_CSRF_COOKIE = "finance_login_csrf"
PREFIX = "/finance"
PAGE_SIZE = 50

# The product's one escaping environment (templates ``finance/…``), not Starlette's default, which
# would leave ``*.html.j2`` unescaped.
templates = Jinja2Templates(env=templating.env)


class LoginRequired(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, message: str):
        self.message = message


class CeleryJobs:
    """Hands work to the Celery workers (imported lazily: the web app starts without a broker)."""

    def retry_charge(self, charge_id: int) -> None:
        from workers.tasks import enqueue_manual_retry

        enqueue_manual_retry(charge_id)

    def relay_outbox(self) -> None:
        from workers.tasks import relay_outbox

        relay_outbox.delay()


def _secure_cookies() -> bool:
    return urlsplit(get_settings().public_url).scheme == "https"


def _signed_in(request: Request) -> staff.SignedIn:
    signed = staff.session_for(request.cookies.get(SESSION_COOKIE))
    if signed is None:
        raise LoginRequired()
    return signed


def _check_csrf(expected: str | None, given: str | None) -> None:
    # Bytes: compare_digest refuses non-ASCII text with a TypeError (a 500), and a token is ASCII anyway.
    if not expected or not given or not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise Forbidden("The form was out of date or did not come from this console (CSRF check). "
                        "Go back, reload the page and try again.")


def _page(request: Request, name: str, signed: staff.SignedIn | None, status: int = 200, **context: Any):
    values = {"me": signed, "prefix": PREFIX, "active": None, "action_labels": finance.ACTION_LABELS, **context}
    return templates.TemplateResponse(request, f"finance/{name}", values, status_code=status)


def _known_id(charge_id: int) -> None:
    """An id beyond BIGINT (or below 1) is no charge's: 404, before PostgreSQL refuses to compare it."""
    if not 0 < charge_id < 2**63:
        raise finance.NotFound(f"charge {charge_id} not found")


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: only a path inside the console, never a URL somebody else chose
    (``javascript:…``, ``//evil.example``, ``/\\evil.example``, or a control character a browser strips)."""
    if (value and value.startswith(PREFIX + "/") and "\\" not in value and value.isprintable()
            and not urlsplit(value).scheme and not urlsplit(value).netloc):
        return value
    return f"{PREFIX}/queue"


def create_finance_app(jobs: finance.Jobs | None = None) -> FastAPI:
    jobs = jobs or CeleryJobs()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    # Also set by the main app; here too so the console carries them wherever it is mounted.
    app.add_middleware(security.SecurityHeaders)

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return _page(request, "error.html.j2", None, 403, title="Not allowed", message=exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        titles = {404: "Not found", 405: "Not allowed here"}
        return _page(request, "error.html.j2", None, exc.status_code, title=titles.get(exc.status_code, "Error"),
                     message=exc.detail if isinstance(exc.detail, str) else "")

    @app.exception_handler(finance.NotFound)
    async def _not_found(request: Request, exc: finance.NotFound) -> Response:
        return _page(request, "error.html.j2", None, 404, title="Not found", message=str(exc))

    @app.get("/static/finance.css", include_in_schema=False)
    def stylesheet() -> FileResponse:
        return FileResponse(HERE / "static" / "finance.css", media_type="text/css",
                            headers={"Cache-Control": "max-age=300"})

    # --- sign-in --------------------------------------------------------------------------------------

    def _login_page(request: Request, status: int = 200, error: str | None = None, email: str = "",
                    next_: str | None = None) -> Response:
        token = secrets.token_urlsafe(24)
        response = _page(request, "login.html.j2", None, status, csrf_token=token, error=error, email=email,
                         next=_safe_next(next_ or request.query_params.get("next")))
        response.set_cookie(LOGIN_CSRF_COOKIE, staff.sign(token), httponly=True, samesite="lax", path=PREFIX,
                            secure=_secure_cookies(), max_age=3600)
        return response

    @app.get("/login")
    def login_form(request: Request) -> Response:
        if staff.session_for(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        return _login_page(request)

    @app.post("/login")
    def login(request: Request, email: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
              next: str = Form("")) -> Response:
        _check_csrf(staff.unsign(request.cookies.get(LOGIN_CSRF_COOKIE)), csrf_token)
        if has_control_characters(email):
            # No account has one (NUL would not even reach the database): refused before any lookup.
            return _login_page(request, 400, f"The email address {CONTROL_MESSAGE}.", "", next)
        ip = client_address(request)
        try:
            _who, token = staff.authenticate(email, password, ip)
        except staff.TooManyAttempts as exc:
            response = _login_page(request, 429, str(exc), email, next)
            response.headers["Retry-After"] = str(exc.seconds)
            return response
        except staff.StaffError as exc:
            return _login_page(request, 401, str(exc), email, next)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(SESSION_COOKIE, staff.sign(token), httponly=True, samesite="lax", path=PREFIX,
                            secure=_secure_cookies(), max_age=int(staff.SESSION_LIFETIME.total_seconds()))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path=PREFIX)
        return response

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form("")) -> Response:
        signed = _signed_in(request)
        _check_csrf(signed.csrf_token, csrf_token)
        staff.end_session(signed.session_id)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # --- reading ----------------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request) -> Response:
        _signed_in(request)
        return RedirectResponse(f"{PREFIX}/queue", status_code=303)

    def _filter(request: Request) -> queue_mod.QueueFilter:
        q = request.query_params
        return queue_mod.QueueFilter.parse(status=q.get("status"), decline_code=q.get("decline_code"),
                                           country=q.get("country"), date_from=q.get("date_from"),
                                           date_to=q.get("date_to"), sort=q.get("sort"),
                                           direction=q.get("direction"))

    @app.get("/queue")
    def queue_page(request: Request) -> Response:
        signed = _signed_in(request)
        try:
            flt = _filter(request)
        except queue_mod.QueueFilterError as exc:
            return _page(request, "queue.html.j2", signed, 400, error=str(exc), result=None,
                         filter=queue_mod.QueueFilter(), params={}, statuses=queue_mod.QUEUE_STATUSES,
                         sorts=queue_mod.SORTS, form=request.query_params)
        try:
            page_no = int(request.query_params.get("page", "1"))
        except ValueError:
            page_no = 1
        with unit_of_work() as uow:
            result = queue_mod.page(uow.session, flt, page=page_no, page_size=PAGE_SIZE)
        return _page(request, "queue.html.j2", signed, result=result, filter=flt, params=flt.as_params(),
                     statuses=queue_mod.QUEUE_STATUSES, sorts=queue_mod.SORTS, form=request.query_params,
                     error=None, urlencode=urlencode)

    @app.get("/queue.csv")
    def queue_csv(request: Request) -> Response:
        _signed_in(request)
        try:
            flt = _filter(request)
        except queue_mod.QueueFilterError as exc:
            return Response(f"error: {exc}\n", status_code=400, media_type="text/plain")

        def lines():
            with unit_of_work() as uow:
                yield from queue_mod.to_csv(queue_mod.iter_rows(uow.session, flt))

        return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": 'attachment; filename="retry-queue.csv"'})

    def _charge_page(request: Request, signed: staff.SignedIn, charge_id: int, status: int = 200,
                     notice: str | None = None, error: str | None = None, reason: str = "") -> Response:
        _known_id(charge_id)
        with unit_of_work() as uow:
            detail = finance.charge_detail(uow.session, charge_id)
        return _page(request, "charge.html.j2", signed, status, d=detail, notice=notice, error=error, reason=reason)

    @app.get("/charges/{charge_id}")
    def charge_page(request: Request, charge_id: int) -> Response:
        signed = _signed_in(request)
        # Only a known action name comes back in the URL, never words somebody could put there.
        done = request.query_params.get("done")
        return _charge_page(request, signed, charge_id, notice=finance.DONE_MESSAGES.get(done))

    @app.get("/overview")
    def overview_page(request: Request) -> Response:
        signed = _signed_in(request)
        with unit_of_work() as uow:
            data = finance.overview(uow.session)
            dead_emails = notifications.dead_count(uow.session)
        return _page(request, "overview.html.j2", signed, o=data, dead_emails=dead_emails,
                     weekly_chart=charts.recovery_rate(data.weekly),
                     decline_chart=charts.outcome_bars(data.by_decline, label="Outcomes by decline code"),
                     country_chart=charts.outcome_bars(data.by_country, label="Outcomes by card country"))

    # --- acting -------------------------------------------------------------------------------------------

    @app.post("/charges/{charge_id}/actions/{action}")
    async def act(request: Request, charge_id: int, action: str, csrf_token: str = Form(""),
                  reason: str = Form("")) -> Response:
        signed = await run_in_threadpool(_signed_in, request)
        _check_csrf(signed.csrf_token, csrf_token)
        if not signed.staff.can_act:
            raise Forbidden("Your account can read the console but not act on charges (viewer role).")
        _known_id(charge_id)
        if has_control_characters(reason, allow=MULTILINE_ALLOWED):
            return await run_in_threadpool(_charge_page, request, signed, charge_id, 422, None,
                                           f"Not done: the reason {CONTROL_MESSAGE}.", "")
        try:
            await run_in_threadpool(finance.perform, action, charge_id, actor=signed.staff.email,
                                              reason=reason, jobs=jobs)
        except finance.ActionRefused as exc:
            return await run_in_threadpool(_charge_page, request, signed, charge_id, 409, None,
                                           f"Not done: {exc}.", reason)
        return RedirectResponse(f"{PREFIX}/charges/{charge_id}?{urlencode({'done': action})}", status_code=303)

    return app
