"""Stripe's error envelope and HTTP statuses (https://docs.stripe.com/api/errors).

``{"error": {"type", "code", "decline_code", "advice_code", "message", "param", "doc_url",
"payment_intent" | "setup_intent", "payment_method", "charge"}}``; statuses: 400 invalid request,
401 bad key, 402 card error, 404 missing resource, 409 idempotency conflict, 429 too many
requests, 500 Stripe-side error.
"""

from __future__ import annotations

from typing import Any


class StripeError(Exception):
    """An API error answered with Stripe's envelope.

    ``saved`` says whether the idempotency layer stores this result: Stripe saves results only
    once endpoint execution began, so validation failures and conflicts are not saved
    (https://docs.stripe.com/api/idempotent_requests).
    """

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        saved: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.extra = extra or {}
        self.saved = saved
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        if self.param:
            err["param"] = self.param
        err.update(self.extra)
        return {"error": err}


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> StripeError:
    return StripeError(400, "invalid_request_error", message, param=param, code=code)


def missing(kind: str, ident: str, param: str | None = "id") -> StripeError:
    return StripeError(
        404, "invalid_request_error", f"No such {kind}: '{ident}'", code="resource_missing", param=param
    )


def unexpected_state(kind: str, message: str) -> StripeError:
    return StripeError(400, "invalid_request_error", message, code=f"{kind}_unexpected_state")


def rate_limited() -> StripeError:
    """https://docs.stripe.com/rate-limits -- 429 with code ``rate_limit``."""
    return StripeError(
        429,
        "invalid_request_error",
        "Request rate limit exceeded. You can learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
        code="rate_limit",
    )


def lock_timeout() -> StripeError:
    """https://docs.stripe.com/rate-limits#object-lock-timeouts -- 429 ``lock_timeout``."""
    return StripeError(
        429,
        "invalid_request_error",
        "This object cannot be accessed right now because another API request or Stripe process is "
        "currently accessing it. If you see this error intermittently, retry the request. If you see "
        "this error frequently and are making multiple concurrent requests to a single object, make "
        "your requests serially or at a lower rate.",
        code="lock_timeout",
        headers={"Stripe-Should-Retry": "true"},
    )


def api_error() -> StripeError:
    """500 ``api_error``; saved by the idempotency layer like any executed request."""
    return StripeError(
        500,
        "api_error",
        "Sorry, something went wrong. We've already been notified of the problem, but if you need any "
        "help, you can reach out to support.",
        saved=True,
        headers={"Stripe-Should-Retry": "false"},
    )
