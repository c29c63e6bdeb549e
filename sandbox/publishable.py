"""What a browser may do with a publishable key (``pk_test_…``), as Stripe.js does it.

Stripe.js talks to the API with the publishable key in the ``key`` form field (no Authorization
header, so a cross-origin POST needs no CORS preflight) and names an intent by its client secret.
Stripe allows a publishable key only a few calls (https://docs.stripe.com/keys#obtain-api-keys,
https://docs.stripe.com/api/payment_intents/object#payment_intent_object-client_secret):

- ``POST /v1/payment_methods``: create a card PaymentMethod from raw card details;
- ``POST /v1/payment_intents/{id}/confirm`` with ``client_secret``: ``payment_method`` or
  ``payment_method_data``, ``setup_future_usage``, ``return_url``;
- ``POST /v1/setup_intents/{id}/confirm`` with ``client_secret``: ``payment_method`` or
  ``payment_method_data``, ``mandate_data``, ``return_url``;
- ``GET /v1/payment_intents/{id}``, ``GET /v1/setup_intents/{id}`` with ``client_secret``.

Anything else is refused as Stripe refuses it (401 "cannot be made with a publishable API key"); a
client secret that does not belong to the intent is a 400 naming ``client_secret``. Parameters a
server would send (``off_session``, ``mandate``, ``customer``, ``amount``…) are refused: the browser
may finish what the server prepared, never change what is charged.
"""

from __future__ import annotations

from typing import Any

from sandbox.errors import StripeError, invalid
from sandbox.state import State

PREFIX = "pk_test_"

_INTENT_PARAMS = {
    "POST /v1/payment_intents/{id}/confirm": frozenset(
        {"payment_method", "payment_method_data", "setup_future_usage", "return_url", "receipt_email"}),
    "POST /v1/setup_intents/{id}/confirm": frozenset(
        {"payment_method", "payment_method_data", "mandate_data", "return_url"}),
    "GET /v1/payment_intents/{id}": frozenset(),
    "GET /v1/setup_intents/{id}": frozenset(),
}
ROUTES = frozenset({*_INTENT_PARAMS, "POST /v1/payment_methods"})
# Sent by Stripe.js on every call; meaningless to the handlers.
_CLIENT_FIELDS = ("key", "client_secret", "use_stripe_sdk", "payment_user_agent", "time_on_page", "expand")


def refused() -> StripeError:
    return StripeError(401, "invalid_request_error",
                       "This API call cannot be made with a publishable API key. Please use a secret API key. "
                       "You can find a list of your API keys at https://dashboard.stripe.com/account/apikeys.")


def prepare(state: State, route_name: str, ids: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
    """Check a publishable-key request and turn it into the parameters the handler takes."""
    if route_name not in ROUTES:
        raise refused()
    if route_name == "POST /v1/payment_methods":
        return {k: v for k, v in params.items() if k not in _CLIENT_FIELDS}
    kind = "payment_intent" if "/payment_intents/" in route_name else "setup_intent"
    intent = (state.payment_intents if kind == "payment_intent" else state.setup_intents).get(ids[0])
    secret = params.get("client_secret")
    if not isinstance(secret, str) or not secret:
        raise invalid("Missing required param: client_secret.", param="client_secret", code="parameter_missing")
    if intent is None or intent["client_secret"] != secret:
        noun = "PaymentIntent" if kind == "payment_intent" else "SetupIntent"
        raise invalid(f"The client_secret provided does not match any associated {noun} on this account.",
                      param="client_secret")
    out = {k: v for k, v in params.items() if k not in _CLIENT_FIELDS}
    allowed = _INTENT_PARAMS[route_name]
    for key in out:
        if key not in allowed:
            raise invalid(f"Received unknown parameter: {key}", param=key)
    pmd = out.pop("payment_method_data", None)
    if pmd is not None:
        if out.get("payment_method"):
            raise invalid("You cannot pass both payment_method and payment_method_data.", param="payment_method_data")
        if not isinstance(pmd, dict):
            raise invalid("Invalid payment_method_data", param="payment_method_data")
        # https://docs.stripe.com/api/payment_intents/confirm#confirm_payment_intent-payment_method_data:
        # a new PaymentMethod is created from the data and used for this confirmation.
        out["payment_method"] = state.create_payment_method(pmd)["id"]
    return out
