"""Customer pages: ``/setup/{token}`` (save a card) and ``/recover/{token}`` (pay a failed charge).

Each page is an HTML ``GET`` plus a JSON ``POST …/complete`` that the page calls once Stripe.js has
finished; the server then reads the intent from Stripe itself (:mod:`billing.customer_pages`).

Links go by email and are bearer tokens, so the pages:

* answer a bad link with an HTML page and a 4xx, changing nothing: unknown or meant for the other
  page → 404, expired or used up → 410; a settled charge → 410; a charge held for staff, or one Stripe
  refuses to take (:class:`~billing.customer_pages.CannotPayOnline`) → 409 "can't be completed online"
  (the ``…/complete`` routes answer the same statuses with the JSON error body
  ``{"error": {"code", "message"}}``);
* put the PaymentIntent's or SetupIntent's ``client_secret`` in the HTML body only (a JSON block read
  by the page's script), never in a URL or a log line (the access log names the route template);
* send ``Referrer-Policy: no-referrer`` (Stripe.js and the 3-D Secure frame must not receive the page
  URL, which carries the token), ``Cache-Control: no-store``, no framing, and a Content-Security-Policy
  that runs only our own scripts and Stripe.js (:mod:`billing.web.security`, for every response);
* render through the product's one escaping Jinja environment (:mod:`billing.templating`); their
  script and style are files (``/static/…``), never inline.

Stripe.js is loaded from ``BILLING_STRIPE_JS_URL`` with ``BILLING_STRIPE_PUBLISHABLE_KEY``: Stripe's own
(https://js.stripe.com/v3/), the sandbox's stand-in (``{sandbox}/js/v3/stripe.js``) or localstripe's
(``{localstripe}/js.stripe.com/v3/``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing import customer_pages, templating
from billing.outcomes import TemporaryStripeError
from billing.recovery import TokenError, TokenProblem
from billing.settings import get_settings
from billing.web.api import ErrorBody

log = logging.getLogger(__name__)

router = APIRouter(tags=["customer pages"])

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The pages' own script and style, served by name (nothing else under /static/).
STATIC_FILES = {"pages.css": "text/css", "setup.js": "text/javascript", "recover.js": "text/javascript"}

# Why a link cannot be used → (status, error code, heading, message). Unknown and "meant for the
# other page" read the same: a link is either for this page or it is not one.
_TOKEN_ERRORS = {
    TokenProblem.unknown: (404, "link_not_found", "This link is not valid",
                           "Check that you opened the whole link from your email, or ask us for a new one."),
    TokenProblem.wrong_purpose: (404, "link_not_found", "This link is not valid",
                                 "Check that you opened the whole link from your email, or ask us for a new one."),
    TokenProblem.expired: (410, "link_expired", "This link has expired",
                           "For your security, links work for a limited time. Ask us for a new one."),
    TokenProblem.used: (410, "link_used", "This link has already been used",
                        "There is nothing more to do with it. If you think something is wrong, contact us."),
}


# --- models (OpenAPI) ----------------------------------------------------------------------------

class CompleteIn(BaseModel):
    """The page sends an empty object: what happened is read from Stripe, not from the browser."""

    model_config = ConfigDict(extra="forbid")


class CardOut(BaseModel):
    brand: str | None
    last4: str | None
    exp_month: int | None = None
    exp_year: int | None = None


class SetupCompleteOut(BaseModel):
    status: str = Field(description="the SetupIntent's status as Stripe reports it",
                        examples=["succeeded", "requires_payment_method"])
    card: CardOut | None = Field(description="the saved card, once the setup succeeded")
    error_code: str | None = Field(description="why the setup failed (recorded on the card setup)",
                                   examples=["setup_intent_authentication_failure"])
    error_message: str | None


class RecoveryCompleteOut(BaseModel):
    paid: bool
    charge_status: str = Field(examples=["paid", "authentication_required", "processing"])
    intent_status: str = Field(description="the PaymentIntent's status as Stripe reports it")
    busy: bool = Field(description="an attempt at this charge is running elsewhere; the webhook settles it")
    new_card: CardOut | None = Field(description="the new card, saved as the default, if one was used")
    error_code: str | None = Field(description="why the on-session payment failed",
                                   examples=["payment_intent_authentication_failure", "card_declined"])
    error_message: str | None


_HTML_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown link, or a link for the other page (HTML page)", "content": {"text/html": {}}},
    410: {"description": "expired or used-up link, or nothing left to pay (HTML page)", "content": {"text/html": {}}},
    503: {"description": "the payment provider could not be reached, or is not configured (HTML page)",
          "content": {"text/html": {}}},
}
_JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown link, or a link for the other page"},
    410: {"model": ErrorBody, "description": "expired or used-up link, or nothing left to pay"},
    503: {"model": ErrorBody, "description": "the payment provider could not be reached; try again"},
}


# --- rendering -----------------------------------------------------------------------------------

def _html(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("merchant_name", get_settings().merchant_name)
    return HTMLResponse(templating.render(f"pages/{template}", values), status_code=status)


def _error_page(status: int, heading: str, message: str) -> HTMLResponse:
    return _html("error.html.j2", status, heading=heading, message=message)


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _token_page(exc: TokenError) -> HTMLResponse:
    status, _code, heading, message = _TOKEN_ERRORS[exc.reason]
    return _error_page(status, heading, message)


def _token_json(exc: TokenError) -> JSONResponse:
    status, code, heading, message = _TOKEN_ERRORS[exc.reason]
    return _json_error(status, code, f"{heading}. {message}")


_NOTHING = ("Nothing to pay", "This payment is no longer due. There is nothing to do.")
_UNAVAILABLE = ("Please try again in a moment", "We could not reach our payment provider. Nothing has been "
                "charged; please reload this page in a minute.")
_NOT_CONFIGURED = ("Card payments are unavailable", "Card payments are not set up on this site yet.")
# A charge held for staff (needs_review) or one Stripe refuses to take: 409, the charge's state is the conflict.
_CANNOT_PAY = ("This payment can't be completed online", "Nothing has been charged. There is nothing you need to "
               "do: we will contact you about this payment.")
_RECOVER_HTML_ERRORS: dict[int | str, dict[str, Any]] = {
    **_HTML_ERRORS, 409: {"description": "the payment can't be completed online; the merchant will contact the "
                               "customer (HTML page)", "content": {"text/html": {}}}}
_RECOVER_JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    **_JSON_ERRORS, 409: {"model": ErrorBody, "description": "the payment can't be completed online"}}


def _stripe_js() -> tuple[str, str] | None:
    settings = get_settings()
    if not settings.stripe_publishable_key:
        log.error("BILLING_STRIPE_PUBLISHABLE_KEY is not set: customer pages cannot load Stripe.js")
        return None
    return settings.stripe_publishable_key, settings.stripe_js_url


def _card(view: customer_pages.CardView | None) -> CardOut | None:
    return CardOut(**view.__dict__) if view is not None else None


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """The customer pages' script and stylesheet (the CSP allows no inline ones)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise StarletteHTTPException(404, "no such file")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "max-age=300"})


# --- /setup ----------------------------------------------------------------------------------------

@router.get("/setup/{token}", response_class=HTMLResponse, responses=_HTML_ERRORS,
            summary="Card setup page (Stripe.js card element, 3-D Secure)")
async def setup_page(token: str) -> HTMLResponse:
    js = _stripe_js()
    if js is None:
        return _error_page(503, *_NOT_CONFIGURED)
    try:
        page = await run_in_threadpool(customer_pages.open_setup, token)
    except TokenError as exc:
        return _token_page(exc)
    except TemporaryStripeError:
        return _error_page(503, *_UNAVAILABLE)
    data = {"publishable_key": js[0], "client_secret": page.client_secret, "status": page.status}
    return _html("setup.html.j2", page=page, data=data, stripe_js_url=js[1])


@router.post("/setup/{token}/complete", response_model=SetupCompleteOut, responses=_JSON_ERRORS,
             summary="The setup page's return: record the SetupIntent as Stripe reports it")
async def setup_complete(token: str, body: CompleteIn | None = None) -> SetupCompleteOut | JSONResponse:
    try:
        out = await run_in_threadpool(customer_pages.complete_setup, token)
    except TokenError as exc:
        return _token_json(exc)
    except TemporaryStripeError:
        return _json_error(503, "stripe_unavailable", "the payment provider could not be reached; try again")
    return SetupCompleteOut(status=out.status, card=_card(out.card), error_code=out.error_code,
                            error_message=out.error_message)


# --- /recover --------------------------------------------------------------------------------------

@router.get("/recover/{token}", response_class=HTMLResponse, responses=_RECOVER_HTML_ERRORS,
            summary="Recovery page: authenticate the failed payment, or pay it with a new card")
async def recover_page(token: str) -> HTMLResponse:
    js = _stripe_js()
    if js is None:
        return _error_page(503, *_NOT_CONFIGURED)
    try:
        page = await run_in_threadpool(customer_pages.open_recovery, token)
    except TokenError as exc:
        return _token_page(exc)
    except customer_pages.NothingToPay:
        return _error_page(410, *_NOTHING)
    except customer_pages.CannotPayOnline:
        return _error_page(409, *_CANNOT_PAY)
    except TemporaryStripeError:
        return _error_page(503, *_UNAVAILABLE)
    data = {"publishable_key": js[0], "client_secret": page.client_secret,
            "saved_payment_method": page.saved_payment_method, "amount_display": page.amount_display}
    return _html("recover.html.j2", page=page, data=data, stripe_js_url=js[1])


@router.post("/recover/{token}/complete", response_model=RecoveryCompleteOut, responses=_RECOVER_JSON_ERRORS,
             summary="The recovery page's return: apply the PaymentIntent as Stripe reports it")
async def recover_complete(token: str, body: CompleteIn | None = None) -> RecoveryCompleteOut | JSONResponse:
    try:
        out = await run_in_threadpool(customer_pages.complete_recovery, token)
    except TokenError as exc:
        return _token_json(exc)
    except customer_pages.CannotPayOnline:
        return _json_error(409, "cannot_pay_online", f"{_CANNOT_PAY[0]}. {_CANNOT_PAY[1]}")
    except TemporaryStripeError:
        return _json_error(503, "stripe_unavailable", "the payment provider could not be reached; try again")
    return RecoveryCompleteOut(paid=out.paid, charge_status=out.charge_status, intent_status=out.intent_status,
                               busy=out.busy, new_card=_card(out.new_card), error_code=out.error_code,
                               error_message=out.error_message)
