"""The only module that imports ``stripe``: calls in, our own types out (:mod:`billing.outcomes`).

Two kinds of failure take two code paths (ARCHITECTURE practice 7):

* temporary — network errors, 5xx, 429 (``rate_limit`` and ``lock_timeout``), 409
  ``idempotency_key_in_use`` — are retried here, resending the *same* request with the *same*
  idempotency key after an exponential backoff with jitter; when they outlast the budget,
  :class:`~billing.outcomes.TemporaryStripeError` tells the caller to try again later, still with
  that key. https://docs.stripe.com/error-low-level#idempotency,
  https://docs.stripe.com/rate-limits#handling-limiting-gracefully
* card errors and permanent request errors become a :class:`~billing.outcomes.PaymentOutcome` that
  the dunning policy decides on: a card error is a decline, a request Stripe refuses
  (``invalid_request_error``) is :attr:`~billing.outcomes.OutcomeKind.refused`, held for staff
  (:func:`outcome_from_error`).

The SDK's own retries are off (``max_network_retries=0``): it would invent a key of its own for a
call we made without one, and every send must pass through the shared rate limiter.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import requests
import stripe
from requests.adapters import HTTPAdapter

from billing import installation, metrics, ownership
from billing.outcomes import (
    CardDetails,
    EventPage,
    OutcomeKind,
    PaymentGateway,
    PaymentIntentView,
    PaymentOutcome,
    SetupResult,
    StripeRequestRefused,
    TemporaryStripeError,
)
from billing.settings import Settings, get_settings

log = logging.getLogger(__name__)

# stripe-python logs whole response bodies at DEBUG (a SetupIntent's carries its client_secret) and
# every request at INFO. Our own log lines say what happened, without secrets; the SDK's are held
# to warnings whatever level the root logger is at. (STRIPE_LOG, which prints to stderr, is an
# operator's choice and stays theirs.)
logging.getLogger("stripe").setLevel(logging.WARNING)


class Limiter(Protocol):
    def acquire(self, endpoint: str) -> float: ...


class StripeConfigError(RuntimeError):
    """The API key is refused (401/403): no retry helps until an operator fixes the settings."""


# PaymentIntent statuses → our outcome, for a PaymentIntent read back (retrieve, list, webhook).
# https://docs.stripe.com/payments/paymentintents/lifecycle
_STATUS_KIND = {
    "succeeded": OutcomeKind.succeeded,
    "processing": OutcomeKind.processing,
    # Off-session there is nobody to authenticate: Stripe answers 402 authentication_required,
    # some Stripe-compatible servers leave the PaymentIntent in requires_action instead.
    "requires_action": OutcomeKind.authentication_required,
    "requires_payment_method": OutcomeKind.declined,
    "canceled": OutcomeKind.canceled,
    # Neither follows a confirm=true, automatic-capture create: nothing we do will settle them, so
    # they are held for staff (needs_review) with the status named, instead of "processing" forever.
    "requires_confirmation": OutcomeKind.refused,
    "requires_capture": OutcomeKind.refused,
}


def outcome_from_payment_intent(pi: Any) -> PaymentOutcome:
    """Classify a PaymentIntent object (SDK object or plain dict) by its status and last error."""
    status = pi["status"]
    err = pi.get("last_payment_error") or {}
    # A status this code does not know is held for staff too (never guessed to be "processing").
    kind = _STATUS_KIND.get(status, OutcomeKind.refused)
    if kind is OutcomeKind.declined and err.get("code") == "authentication_required":
        kind = OutcomeKind.authentication_required
    if kind is OutcomeKind.refused and not err.get("code"):
        err = {**err, "code": f"payment_intent_{status}"}
    pm = pi.get("payment_method")
    customer = pi.get("customer")
    return PaymentOutcome(
        kind=kind,
        payment_intent_id=pi["id"],
        payment_method_id=pm if isinstance(pm, str) or pm is None else pm.get("id"),
        error_code=err.get("code") or ("authentication_required" if status == "requires_action" else None),
        decline_code=err.get("decline_code"),
        advice_code=err.get("advice_code"),
        message=err.get("message"),
        # What billing.ownership compares with our rows before this outcome moves a charge.
        amount=pi.get("amount"),
        currency=pi.get("currency"),
        customer_id=customer if isinstance(customer, str) or customer is None else customer.get("id"),
        metadata=dict(pi.get("metadata") or {}),
    )


def _tagged(metadata: dict[str, str] | None) -> dict[str, str]:
    """``metadata`` with this installation's id, which every object we create carries (the caller's
    value, when it set one, is the one sent: a resend must repeat its first send exactly)."""
    return {installation.METADATA_KEY: installation.installation_id(), **(metadata or {})}


# Codes that mean "the card was refused", whatever error type carried them: Stripe sends them as
# 402 card_error, some Stripe-compatible servers as 400 invalid_request_error.
# https://docs.stripe.com/error-codes
_CARD_CODES = frozenset({"card_declined", "authentication_required", "expired_card", "incorrect_cvc",
                         "incorrect_number", "insufficient_funds", "processing_error", "invalid_cvc",
                         "invalid_expiry_month", "invalid_expiry_year", "card_decline_rate_limit_exceeded"})


def outcome_from_error(error: dict, *, card_error: bool = False) -> PaymentOutcome:
    """Classify a refused payment request from Stripe's error object (``{"type", "code",
    "decline_code", "payment_intent", …}``, https://docs.stripe.com/api/errors).

    * A card error (HTTP 402 ``card_error``, or a card code / decline code however it is labelled) is a
      decline: off-session, Stripe leaves the PaymentIntent ``requires_payment_method`` and the error
      carries it. https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method
    * Anything else (400/404 ``invalid_request_error``: ``amount_too_small``, ``amount_too_large``, an
      unsupported currency, ``resource_missing`` for a deleted customer, ``parameter_invalid_*``…) is
      Stripe refusing the request itself, not the card: :attr:`OutcomeKind.refused`, which no retry and
      no new card fixes. https://docs.stripe.com/error-codes
    """
    code = error.get("code")
    if card_error or error.get("type") == "card_error" or code in _CARD_CODES or error.get("decline_code"):
        kind = OutcomeKind.authentication_required if code == "authentication_required" else OutcomeKind.declined
    else:
        kind = OutcomeKind.refused
    return PaymentOutcome(
        kind=kind,
        payment_intent_id=(error.get("payment_intent") or {}).get("id"),
        payment_method_id=(error.get("payment_method") or {}).get("id"),
        error_code=code or "invalid_request",
        decline_code=error.get("decline_code"),
        advice_code=error.get("advice_code"),
        message=error.get("message"),
    )


def _outcome_from_error(exc: stripe.StripeError) -> PaymentOutcome:
    body = dict((exc.json_body or {}).get("error") or {})
    body["code"] = body.get("code") or getattr(exc, "code", None)
    return outcome_from_error(body, card_error=isinstance(exc, stripe.CardError))


def _is_temporary(exc: stripe.StripeError) -> bool:
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError)):
        return True
    status = getattr(exc, "http_status", None) or 0
    # 409 idempotency_key_in_use: the same request is in progress elsewhere — wait and resend.
    return isinstance(exc, stripe.APIError) and (status >= 500 or status == 409 or status == 0)


def intent_view(pi: Any) -> PaymentIntentView:
    """A PaymentIntent object (from an API answer or a webhook event) as the customer pages see it."""
    customer = pi.get("customer")
    return PaymentIntentView(
        outcome=outcome_from_payment_intent(pi), status=pi["status"], client_secret=pi.get("client_secret"),
        amount=pi.get("amount") or 0, currency=pi.get("currency") or "",
        customer_id=customer if isinstance(customer, str) or customer is None else customer.get("id"),
        setup_future_usage=pi.get("setup_future_usage"))


def _rate_limited_reason(exc: stripe.StripeError, endpoint: str) -> str | None:
    """For a 429, which of Stripe's limiters refused the request, as its ``Stripe-Rate-Limited-Reason``
    header says (``global-rate``, ``endpoint-rate``, ``global-concurrency``, ``endpoint-concurrency``,
    ``resource-specific``; none on a ``lock_timeout``), counted by reason. The shared limiter should
    leave none of these: a count says which budget to look at. https://docs.stripe.com/rate-limits"""
    if getattr(exc, "http_status", None) != 429:
        return None
    headers = getattr(exc, "headers", None) or {}
    reason = next((v for k, v in headers.items() if k.lower() == "stripe-rate-limited-reason"), None)
    return metrics.observe_rate_limited_reason(endpoint, reason)


def _replayed(exc: stripe.StripeError) -> bool:
    """Stripe saved this error under the key and answered it again (``Idempotent-Replayed: true``)."""
    headers = getattr(exc, "headers", None) or {}
    value = next((v for k, v in headers.items() if k.lower() == "idempotent-replayed"), "")
    return str(value).lower() == "true"


def _card_details(pm: Any) -> CardDetails:
    card = pm.get("card") or {}
    customer = pm.get("customer")
    return CardDetails(
        payment_method_id=pm["id"],
        customer_id=customer if isinstance(customer, str) or customer is None else customer.get("id"),
        brand=card.get("brand"),
        last4=card.get("last4"),
        exp_month=card.get("exp_month"),
        exp_year=card.get("exp_year"),
        country=card.get("country"),
        fingerprint=card.get("fingerprint"),
    )


def _setup_result(si: Any, error: dict | None = None) -> SetupResult:
    err = error or si.get("last_setup_error") or {}
    pm = si.get("payment_method")
    customer = si.get("customer")
    mandate = si.get("mandate")
    return SetupResult(
        setup_intent_id=si["id"],
        status=si["status"],
        client_secret=si.get("client_secret"),
        payment_method_id=pm if isinstance(pm, str) or pm is None else pm.get("id"),
        mandate_id=mandate if isinstance(mandate, str) or mandate is None else mandate.get("id"),
        customer_id=customer if isinstance(customer, str) or customer is None else customer.get("id"),
        error_code=err.get("code"),
        error_message=err.get("message"),
    )


def _http_session(api_base: str) -> requests.Session:
    """One HTTP session for every thread (its connection pool is thread-safe), reading the proxy
    settings of the environment once, for the one host it talks to. requests would otherwise walk
    the whole environment on every request (HTTP(S)_PROXY, NO_PROXY, CA bundles): about a sixth of a
    charge's CPU. Stripe's client passes its own CA bundle, so none is read from the environment."""
    session = requests.Session()
    session.proxies = requests.utils.get_environ_proxies(api_base)
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=HTTP_POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


# Kept-alive connections to Stripe per process: room for a worker's threads (more are opened, and
# closed after use, when a burst exceeds it).
HTTP_POOL_SIZE = 256


class StripeGateway:
    def __init__(self, *, api_key: str, api_base: str, limiter: Limiter | None = None,
                 timeout: float = 30.0, max_sends: int = 4, backoff_base: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep):
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=(5, timeout), session=_http_session(api_base)),
        )
        self._limiter = limiter
        self._max_sends = max_sends
        self._backoff_base = backoff_base
        self._sleep = sleep

    # --- the one place a request leaves --------------------------------------------------------

    def _send(self, endpoint: str, call: Callable[[dict], Any], *, idempotency_key: str | None = None) -> Any:
        options: dict = {"idempotency_key": idempotency_key} if idempotency_key else {}
        for attempt in range(1, self._max_sends + 1):
            if self._limiter is not None:
                metrics.observe_rate_limit_wait(endpoint, self._limiter.acquire(endpoint))
            try:
                result = metrics.stripe_call(endpoint, call, options)
                # Plain dicts from here on: our code reads fields, it never calls back into the SDK.
                return result.to_dict() if hasattr(result, "to_dict") else result
            except (stripe.AuthenticationError, stripe.PermissionError) as exc:
                raise StripeConfigError(f"Stripe refused the API key ({exc.http_status})") from None
            except stripe.IdempotencyError as exc:
                # The key was first used with other parameters (a restored database, another
                # installation on the account): it is spent, like a replayed error.
                raise TemporaryStripeError(f"{endpoint}: idempotency key used with other parameters",
                                           replayed=True) from exc
            except stripe.StripeError as exc:
                limited_by = _rate_limited_reason(exc, endpoint)
                if not _is_temporary(exc):
                    raise
                replayed = _replayed(exc)
                log.warning("temporary Stripe error" + (" replayed for this key" if replayed else
                                                        ", resending with the same key"),
                            extra={"endpoint": endpoint, "http_status": getattr(exc, "http_status", None),
                                   "code": getattr(exc, "code", None), "send": attempt,
                                   "rate_limited_reason": limited_by})
                if attempt == self._max_sends or replayed:
                    raise TemporaryStripeError(f"{endpoint}: {type(exc).__name__} {exc.http_status or ''}",
                                               replayed=replayed) from exc
                # Full jitter: spread the resends of many workers instead of stampeding together.
                self._sleep(random.uniform(0, self._backoff_base * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _raw(self, method: str, path: str, params: dict, options: dict) -> dict:
        """The request, its JSON answer as a plain dict: the charge path reads a few fields, so the
        SDK's StripeObject tree (a tenth of a charge's CPU) is not built. Errors are the SDK's own
        exceptions, as with the typed services. https://github.com/stripe/stripe-python#custom-requests"""
        return self._client.raw_request(method, path, **params, **options).data

    # --- charging --------------------------------------------------------------------------------

    def charge_off_session(self, *, customer_id: str, payment_method_id: str, amount: int, currency: str,
                           mandate_id: str | None, metadata: dict[str, str], idempotency_key: str) -> PaymentOutcome:
        """Create and confirm a PaymentIntent for a customer who is not present.
        https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method"""
        params: dict[str, Any] = {
            "amount": amount, "currency": currency, "customer": customer_id,
            "payment_method": payment_method_id, "payment_method_types": ["card"],
            "off_session": True, "confirm": True, "metadata": _tagged(metadata),
        }
        if mandate_id:
            params["mandate"] = mandate_id
        outcome = self._payment_call("POST /v1/payment_intents",
                                     lambda o: self._raw("post", "/v1/payment_intents", params, o), idempotency_key)
        if (outcome.is_failure and outcome.payment_intent_id is None and "attempt_id" in metadata
                and outcome.kind is not OutcomeKind.refused):
            # A decline that did not name its PaymentIntent: find it, so the period's retries
            # re-confirm that one instead of creating another.
            found = self.find_payment_intent(customer_id=customer_id, attempt_id=int(metadata["attempt_id"]),
                                             attempt_key=metadata.get("attempt_key"))
            if found is not None and self._sent_by_this_request(found, params, idempotency_key):
                outcome = dataclasses.replace(outcome, payment_intent_id=found.payment_intent_id)
        return outcome

    @staticmethod
    def _sent_by_this_request(found: PaymentOutcome, params: dict[str, Any], idempotency_key: str) -> bool:
        """A PaymentIntent found after a decline is adopted only if it is the one this very request
        made: same installation, charge, customer, amount, currency and attempt key."""
        meta = params["metadata"]
        expected = ownership.Expected(
            charge_id=int(meta.get("charge_id") or 0), amount=params["amount"], currency=params["currency"],
            customer_id=params["customer"], payment_intent_id=None,
            attempt_keys={str(meta["attempt_id"]): meta.get("attempt_key") or idempotency_key})
        verdict = ownership.verify(ownership.Intent.of(found), expected, meta[installation.METADATA_KEY])
        if not verdict.ours:
            ownership.reject(verdict, source=ownership.DECLINE_LOOKUP, payment_intent_id=found.payment_intent_id,
                             attempt_id=meta["attempt_id"])
        return verdict.ours

    def confirm_off_session(self, *, payment_intent_id: str, payment_method_id: str, mandate_id: str | None,
                            idempotency_key: str) -> PaymentOutcome:
        """Retry a period on the PaymentIntent it already has (re-confirm, not a second PaymentIntent).
        https://docs.stripe.com/api/payment_intents/confirm"""
        params: dict[str, Any] = {"payment_method": payment_method_id, "off_session": True}
        if mandate_id:
            params["mandate"] = mandate_id
        outcome = self._payment_call(
            "POST /v1/payment_intents/:id/confirm",
            lambda o: self._raw("post", f"/v1/payment_intents/{quote(payment_intent_id, safe='')}/confirm",
                                params, o), idempotency_key)
        if outcome.kind is OutcomeKind.refused and outcome.error_code == "payment_intent_unexpected_state":
            # Already succeeded or processing (the customer paid on the recovery page meanwhile).
            return self.retrieve_payment_intent(payment_intent_id)
        return outcome

    def _payment_call(self, endpoint: str, call: Callable[[dict], Any], key: str) -> PaymentOutcome:
        try:
            pi = self._send(endpoint, call, idempotency_key=key)
        except (stripe.CardError, stripe.InvalidRequestError) as exc:
            return _outcome_from_error(exc)
        return outcome_from_payment_intent(pi)

    def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentOutcome:
        """Raises :class:`~billing.outcomes.StripeRequestRefused` for one Stripe does not know."""
        pi = self._refusable("GET /v1/payment_intents/:id",
                             lambda o: self._client.v1.payment_intents.retrieve(payment_intent_id, None, o))
        return outcome_from_payment_intent(pi)

    def payment_intent_for_customer(self, payment_intent_id: str) -> PaymentIntentView:
        """The PaymentIntent with its client secret, for the recovery page to finish it on-session
        with Stripe.js on this very PaymentIntent (a retrieve with the secret key returns the secret).
        https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method ("start a recovery
        flow"), https://docs.stripe.com/js/payment_intents/confirm_card_payment"""
        pi = self._refusable("GET /v1/payment_intents/:id",
                             lambda o: self._client.v1.payment_intents.retrieve(payment_intent_id, None, o))
        return intent_view(pi)

    def _refusable(self, endpoint: str, call: Callable[[dict], Any], idempotency_key: str | None = None) -> Any:
        """:meth:`_send` for the customer pages' calls: a request Stripe refuses (400/404, e.g. an amount
        under the currency's minimum, a deleted customer) becomes our
        :class:`~billing.outcomes.StripeRequestRefused`, which the pages answer with a clear page."""
        try:
            return self._send(endpoint, call, idempotency_key=idempotency_key)
        except stripe.InvalidRequestError as exc:
            raise StripeRequestRefused(f"{endpoint}: Stripe refused the request", code=getattr(exc, "code", None),
                                       http_status=getattr(exc, "http_status", None)) from None

    def create_payment_intent_on_session(self, *, customer_id: str, amount: int, currency: str,
                                         metadata: dict[str, str], idempotency_key: str) -> PaymentIntentView:
        """An unconfirmed PaymentIntent for a period that never got one (no usable card when it fell
        due): the customer confirms it on the recovery page with a new card.
        https://docs.stripe.com/api/payment_intents/create"""
        params = {"amount": amount, "currency": currency, "customer": customer_id,
                  "payment_method_types": ["card"], "metadata": _tagged(metadata)}
        pi = self._refusable("POST /v1/payment_intents",
                             lambda o: self._client.v1.payment_intents.create(params, o), idempotency_key)
        return intent_view(pi)

    def find_payment_intent(self, *, customer_id: str, attempt_id: int,
                            attempt_key: str | None = None) -> PaymentOutcome | None:
        """The PaymentIntent an attempt created, found by our metadata when its id never reached us
        (a lost response, a crash, or keys pruned after 24 h). The list endpoint is read rather than
        Search because Search is eventually consistent and may miss a minute-old PaymentIntent.
        https://docs.stripe.com/search#data-freshness

        One tagged by another installation on the account (its attempt ids repeat ours), or carrying
        another ``attempt_key`` (a restored database's twin of this attempt id), is passed over and
        counted, so a twin never hides the attempt's own PaymentIntent — which would make a resumed
        attempt send its create again and, once Stripe has pruned the key, charge the period twice.
        What is returned is still only a claim, which the caller checks with :mod:`billing.ownership`
        before applying it."""
        def newest(params: dict) -> list[dict]:
            return self._send("GET /v1/payment_intents",
                              lambda o: self._client.v1.payment_intents.list(params, o)).get("data", [])

        try:
            candidates = newest({"customer": customer_id, "limit": 100})
        except stripe.InvalidRequestError:
            # Some Stripe-compatible servers cannot filter by customer; the newest page is where a
            # PaymentIntent made moments ago will be.
            candidates = newest({"limit": 100})
        for pi in candidates:
            customer = pi.get("customer")
            customer = customer if isinstance(customer, str) or customer is None else customer.get("id")
            meta = pi.get("metadata") or {}
            if customer != customer_id or meta.get("attempt_id") != str(attempt_id):
                continue
            tag = meta.get(installation.METADATA_KEY)
            if tag is not None and tag != installation.installation_id():
                ownership.reject(ownership.Verdict(False, "installation"), source=ownership.SEARCH,
                                 payment_intent_id=pi.get("id"), attempt_id=attempt_id)
                continue
            key = meta.get("attempt_key")
            if attempt_key is not None and key is not None and key != attempt_key:
                ownership.reject(ownership.Verdict(False, "attempt"), source=ownership.SEARCH,
                                 payment_intent_id=pi.get("id"), attempt_id=attempt_id)
                continue
            return outcome_from_payment_intent(pi)
        return None

    # --- customers and cards ---------------------------------------------------------------------

    def create_customer(self, *, email: str, name: str, metadata: dict[str, str] | None = None,
                        idempotency_key: str) -> str:
        params = {"email": email, "name": name, "metadata": _tagged(metadata)}
        return self._send("POST /v1/customers", lambda o: self._client.v1.customers.create(params, o),
                          idempotency_key=idempotency_key)["id"]

    def create_setup_intent(self, *, customer_id: str, payment_method: str | None,
                            idempotency_key: str, metadata: dict[str, str] | None = None) -> SetupResult:
        """A SetupIntent for future off-session use; with ``payment_method`` it is confirmed here.
        Created and confirmed in two calls, which every Stripe-compatible server accepts.
        https://docs.stripe.com/payments/save-and-reuse"""
        params = {"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"],
                  "metadata": _tagged(metadata)}
        si = self._send("POST /v1/setup_intents", lambda o: self._client.v1.setup_intents.create(params, o),
                        idempotency_key=f"{idempotency_key}-create")
        if not payment_method:
            return _setup_result(si)
        return self.confirm_setup_intent(si["id"], payment_method=payment_method,
                                         idempotency_key=f"{idempotency_key}-confirm")

    def confirm_setup_intent(self, setup_intent_id: str, *, payment_method: str, idempotency_key: str) -> SetupResult:
        params = {"payment_method": payment_method}
        try:
            si = self._send("POST /v1/setup_intents/:id/confirm",
                            lambda o: self._client.v1.setup_intents.confirm(setup_intent_id, params, o),
                            idempotency_key=idempotency_key)
        except stripe.CardError as exc:
            body = (exc.json_body or {}).get("error", {})
            si = body.get("setup_intent") or self._send(
                "GET /v1/setup_intents/:id", lambda o: self._client.v1.setup_intents.retrieve(setup_intent_id, None, o))
            return _setup_result(si, error=body)
        return _setup_result(si)

    def retrieve_setup_intent(self, setup_intent_id: str) -> SetupResult:
        si = self._send("GET /v1/setup_intents/:id",
                        lambda o: self._client.v1.setup_intents.retrieve(setup_intent_id, None, o))
        return _setup_result(si)

    def retrieve_payment_method(self, payment_method_id: str) -> CardDetails:
        pm = self._send("GET /v1/payment_methods/:id",
                        lambda o: self._client.v1.payment_methods.retrieve(payment_method_id, None, o))
        return _card_details(pm)

    def attach_payment_method(self, payment_method_id: str, customer_id: str) -> CardDetails:
        pm = self._send("POST /v1/payment_methods/:id/attach",
                        lambda o: self._client.v1.payment_methods.attach(payment_method_id,
                                                                         {"customer": customer_id}, o),
                        idempotency_key=f"attach-{payment_method_id}-{customer_id}")
        return _card_details(pm)

    # --- events ----------------------------------------------------------------------------------------

    def list_events(self, *, types: tuple[str, ...], created_gte: int | None = None,
                    delivery_success: bool | None = None, starting_after: str | None = None) -> EventPage:
        """One page (100, newest first) of the events of ``types``, for the backfill of missed webhooks.
        Stripe lists events of the last 30 days; ``delivery_success=False`` keeps those still pending or
        failed at one of the account's webhook endpoints. https://docs.stripe.com/api/events/list,
        https://docs.stripe.com/webhooks/process-undelivered-events"""
        params: dict[str, Any] = {"types": list(types), "limit": 100}
        if created_gte is not None:
            params["created"] = {"gte": int(created_gte)}
        if delivery_success is not None:
            params["delivery_success"] = delivery_success
        if starting_after:
            params["starting_after"] = starting_after
        # Refused (a server without the event list, a filter it does not know): StripeRequestRefused.
        page = self._refusable("GET /v1/events", lambda o: self._client.v1.events.list(params, o))
        return EventPage(events=list(page.get("data") or []), has_more=bool(page.get("has_more")))


def build_gateway(settings: Settings, limiter: Limiter | None = None) -> StripeGateway:
    settings.require("stripe_api_key")
    return StripeGateway(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base,
                         limiter=limiter, timeout=settings.stripe_timeout_seconds)


@functools.cache
def get_gateway() -> StripeGateway:
    """The process's gateway, sharing the Redis-backed request budget with every other worker."""
    from billing.ratelimit import limiter_from_settings

    settings = get_settings()
    return build_gateway(settings, limiter_from_settings(settings))


def resolve(gateway: PaymentGateway | None = None) -> PaymentGateway:
    """``gateway`` when one is given (tests pass a fake of :class:`~billing.outcomes.PaymentGateway`),
    else the process's :class:`StripeGateway`."""
    return gateway if gateway is not None else get_gateway()
