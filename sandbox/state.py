"""In-memory Stripe objects and the state machines that move them.

Everything here is synchronous and runs on the server's event loop, so one request's changes
are atomic with respect to others. Time comes from the sandbox clock (``Clock``) so tests can
move it forward (idempotency-key pruning, ``created`` timestamps).

Object shapes follow the API reference:
https://docs.stripe.com/api/customers/object, https://docs.stripe.com/api/payment_methods/object,
https://docs.stripe.com/api/setup_intents/object, https://docs.stripe.com/api/payment_intents/object,
https://docs.stripe.com/api/charges/object, https://docs.stripe.com/api/mandates/object,
https://docs.stripe.com/api/events/object.
"""

from __future__ import annotations

import copy
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox import cards
from sandbox.cards import Decline, TestCard
from sandbox.errors import StripeError, invalid, missing, unexpected_state
from sandbox.forms import as_bool, as_list

API_VERSION = "2026-10-28.endive"
_ALPHABET = string.ascii_letters + string.digits
AUTH_FAILURE_MESSAGE = (
    "We are unable to authenticate your payment method. Please choose a different payment method and "
    "try again."
)
MIN_AMOUNT = 50  # https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class Clock:
    """Sandbox time: wall time plus an offset that only moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise invalid("advance_seconds must not be negative", param="advance_seconds")
        self.offset += seconds

    def set(self, now: float) -> None:
        if now < self.now() - 1:
            raise invalid("the sandbox clock only moves forward", param="now")
        self.offset = now - time.time()


@dataclass
class CardInfo:
    """What the sandbox knows about a PaymentMethod beyond its public fields."""

    card: TestCard | None
    set_up: bool = False  # authenticated for off-session use (SetupIntent or setup_future_usage)
    consumed: bool = False  # used once without a customer, or detached: cannot be reused
    # Set through the control API: the issuer starts declining this card after it was saved (a card
    # reported lost, an account run dry), which no documented test card can show.
    later_decline: Decline | None = None


@dataclass
class Pending3DS:
    kind: str  # "setup_intent" | "payment_intent"
    off_session_setup: bool = False


@dataclass
class State:
    clock: Clock = field(default_factory=Clock)
    on_event: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.customers: dict[str, dict] = {}
        self.payment_methods: dict[str, dict] = {}
        self.card_info: dict[str, CardInfo] = {}
        self.setup_intents: dict[str, dict] = {}
        self.payment_intents: dict[str, dict] = {}
        self.charges: dict[str, dict] = {}
        self.mandates: dict[str, dict] = {}
        self.events: dict[str, dict] = {}
        self.event_order: list[str] = []
        self.ledger: list[dict] = []
        self.pending_3ds: dict[str, Pending3DS] = {}
        self.si_mandate_request: dict[str, dict] = {}

    def now(self) -> int:
        return int(self.clock.now())

    # ------------------------------------------------------------------ lookup / expand
    def lookup(self, ident: str) -> dict | None:
        prefix = ident.split("_", 1)[0]
        table = {
            "cus": self.customers,
            "pm": self.payment_methods,
            "seti": self.setup_intents,
            "pi": self.payment_intents,
            "ch": self.charges,
            "mandate": self.mandates,
            "evt": self.events,
        }.get(prefix)
        return table.get(ident) if table is not None else None

    def expand(self, obj: dict, paths: list[str]) -> dict:
        """``expand[]`` (https://docs.stripe.com/api/expanding_objects): ids become objects."""
        if not paths:
            return obj
        obj = copy.deepcopy(obj)
        for path in paths:
            self._expand_path(obj, path.split("."))
        return obj

    def _expand_path(self, node: Any, parts: list[str]) -> None:
        if not parts or not isinstance(node, dict):
            return
        head, rest = parts[0], parts[1:]
        if head == "data" and isinstance(node.get("data"), list):
            for item in node["data"]:
                self._expand_path(item, rest)
            return
        if head not in node and node.get("object") in INCLUDABLE and head in INCLUDABLE[node["object"]]:
            node[head] = _included(node, head)
        value = node.get(head)
        if isinstance(value, str):
            found = self.lookup(value)
            if found is None and head == "payment_method":
                found = self.payment_methods.get(value)
            if found is None:
                raise invalid(f"This property cannot be expanded ({head}).", param="expand")
            node[head] = copy.deepcopy(found)
            value = node[head]
        if rest:
            self._expand_path(value, rest)

    # ------------------------------------------------------------------ events
    def emit(self, type_: str, obj: dict, request: dict | None = None) -> dict:
        """Record an Event (https://docs.stripe.com/api/events/object) and hand it to webhooks."""
        event = {
            "id": new_id("evt"),
            "object": "event",
            "account": None,
            "api_version": API_VERSION,
            "context": None,
            "created": self.now(),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 0,
            "request": request or {"id": None, "idempotency_key": None},
            "type": type_,
        }
        self.events[event["id"]] = event
        self.event_order.append(event["id"])
        if self.on_event is not None:
            self.on_event(event)
        return event

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _metadata(current: dict | None, value: Any) -> dict:
        """Metadata update rules (https://docs.stripe.com/api/metadata): "" unsets a key or all."""
        out = dict(current or {})
        if value is None:
            return out
        if value == "":
            return {}
        if not isinstance(value, dict):
            raise invalid("Invalid hash", param="metadata")
        for k, v in value.items():
            if len(k) > 40:
                raise invalid("Metadata keys can be at most 40 characters.", param=f"metadata[{k}]")
            if v == "":
                out.pop(k, None)
            else:
                if len(str(v)) > 500:
                    raise invalid("Metadata values can be at most 500 characters.", param=f"metadata[{k}]")
                out[k] = str(v)
        if len(out) > 50:
            raise invalid("Metadata can have at most 50 keys.", param="metadata")
        return out

    @staticmethod
    def _int(params: dict, name: str, required: bool = False) -> int | None:
        value = params.get(name)
        if value is None or value == "":
            if required:
                raise invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise invalid(f"Invalid integer: {value}", param=name) from None

    def _customer_id(self, value: Any, param: str = "customer") -> str | None:
        if value in (None, ""):
            return None
        cus = self.customers.get(value)
        if cus is None or cus.get("deleted"):
            raise missing("customer", value, param)
        return value

    # ------------------------------------------------------------------ customers
    def create_customer(self, params: dict) -> dict:
        """https://docs.stripe.com/api/customers/create"""
        cus = {
            "id": new_id("cus"),
            "object": "customer",
            "address": params.get("address") or None,
            "balance": 0,
            "business_name": params.get("business_name") or None,
            "created": self.now(),
            "currency": None,
            "customer_account": None,
            "default_source": None,
            "delinquent": False,
            "description": params.get("description") or None,
            "discount": None,
            "email": params.get("email") or None,
            "individual_name": params.get("individual_name") or None,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                                 "rendering_options": None},
            "livemode": False,
            "metadata": self._metadata({}, params.get("metadata")),
            "name": params.get("name") or None,
            "next_invoice_sequence": 1,
            "phone": params.get("phone") or None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self.customers[cus["id"]] = cus
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"], "payment_method")
            self.attach(pm["id"], {"customer": cus["id"]})
        self.emit("customer.created", cus)
        return cus

    def get_customer(self, cid: str) -> dict:
        cus = self.customers.get(cid)
        if cus is None:
            raise missing("customer", cid)
        if cus.get("deleted"):
            return {"id": cid, "object": "customer", "deleted": True}
        return cus

    def update_customer(self, cid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/customers/update"""
        cus = self.customers.get(cid)
        if cus is None or cus.get("deleted"):
            raise missing("customer", cid)
        for key in ("email", "name", "description", "phone", "address"):
            if key in params:
                cus[key] = params[key] or None
        if "metadata" in params:
            cus["metadata"] = self._metadata(cus["metadata"], params["metadata"])
        inv = params.get("invoice_settings")
        if isinstance(inv, dict) and "default_payment_method" in inv:
            cus["invoice_settings"]["default_payment_method"] = inv["default_payment_method"] or None
        self.emit("customer.updated", cus)
        return cus

    def delete_customer(self, cid: str) -> dict:
        """https://docs.stripe.com/api/customers/delete -- returns a deleted stub."""
        cus = self.customers.get(cid)
        if cus is None or cus.get("deleted"):
            raise missing("customer", cid)
        self.emit("customer.deleted", cus)
        cus["deleted"] = True
        for pm in self.payment_methods.values():
            if pm["customer"] == cid:
                pm["customer"] = None
                self.card_info[pm["id"]].consumed = True
        return {"id": cid, "object": "customer", "deleted": True}

    def list_customers(self, params: dict) -> list[dict]:
        out = [c for c in self.customers.values() if not c.get("deleted")]
        if params.get("email"):
            out = [c for c in out if c["email"] == params["email"]]
        return out

    # ------------------------------------------------------------------ payment methods
    def _card_object(self, number: str, exp_month: int, exp_year: int, card: TestCard | None) -> dict:
        brand = card.brand if card else cards.brand_of(number)
        return {
            "brand": brand,
            "checks": {"address_line1_check": None, "address_postal_code_check": None,
                       "cvc_check": "pass"},
            "country": card.country if card else "US",
            "display_brand": brand,
            "exp_month": exp_month,
            "exp_year": exp_year,
            "fingerprint": cards.card_fingerprint(number),
            "funding": card.funding if card else "credit",
            "generated_from": None,
            "last4": number[-4:],
            "networks": {"available": [brand], "preferred": None},
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        }

    def _new_pm(self, number: str, exp_month: int, exp_year: int, card: TestCard | None,
                params: dict | None = None) -> dict:
        params = params or {}
        pm = {
            "id": new_id("pm"),
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": {
                "address": {"city": None, "country": None, "line1": None, "line2": None,
                            "postal_code": None, "state": None},
                "email": None, "name": None, "phone": None, "tax_id": None,
            },
            "card": self._card_object(number, exp_month, exp_year, card),
            "created": self.now(),
            "customer": None,
            "customer_account": None,
            "livemode": False,
            "metadata": self._metadata({}, params.get("metadata")),
            "radar_options": {},
            "type": "card",
        }
        bd = params.get("billing_details")
        if isinstance(bd, dict):
            for k in ("email", "name", "phone"):
                if k in bd:
                    pm["billing_details"][k] = bd[k] or None
        self.payment_methods[pm["id"]] = pm
        self.card_info[pm["id"]] = CardInfo(card)
        return pm

    def _pm_from_alias(self, alias: str) -> dict | None:
        """``pm_card_*`` test ids: each use yields a fresh PaymentMethod, as in Stripe
        (https://docs.stripe.com/testing#cards -- "use a PaymentMethod such as pm_card_visa")."""
        card = cards.BY_ALIAS.get(alias)
        if card is None:
            return None
        year = time.gmtime(self.clock.now()).tm_year + 1
        return self._new_pm(card.number, 12, year, card)

    def create_payment_method(self, params: dict) -> dict:
        """https://docs.stripe.com/api/payment_methods/create (type=card with raw card details).

        Card validation errors are 402 card errors, as Stripe returns them:
        https://docs.stripe.com/error-codes (incorrect_number, invalid_expiry_month, …).
        A well-formed number that is not a test card is refused in test mode
        (https://docs.stripe.com/testing -- "Don't use real card details").
        """
        type_ = params.get("type")
        if type_ != "card":
            if not type_:
                raise invalid("Missing required param: type.", param="type", code="parameter_missing")
            raise invalid(f"The payment method type {type_!r} is not supported by this sandbox.", param="type")
        card_p = params.get("card")
        if not isinstance(card_p, dict):
            raise invalid("Missing required param: card.", param="card", code="parameter_missing")
        if card_p.get("token"):
            raise invalid("card[token] is not supported by this sandbox; use card[number].", param="card[token]")
        number = re.sub(r"[\s-]", "", str(card_p.get("number", "")))
        if not number:
            raise invalid("Missing required param: card[number].", param="card[number]", code="parameter_missing")
        if not cards.luhn_ok(number):
            raise _card_param_error("incorrect_number", "Your card number is incorrect.", "number")
        exp_month = self._int(card_p, "exp_month")
        exp_year = self._int(card_p, "exp_year")
        if exp_month is None or not 1 <= exp_month <= 12:
            raise _card_param_error("invalid_expiry_month", "Your card's expiration month is invalid.",
                                    "exp_month")
        if exp_year is None:
            raise _card_param_error("invalid_expiry_year", "Your card's expiration year is invalid.",
                                    "exp_year")
        if exp_year < 100:
            exp_year += 2000
        now = time.gmtime(self.clock.now())
        if (exp_year, exp_month) < (now.tm_year, now.tm_mon):
            raise _card_param_error("invalid_expiry_year", "Your card's expiration year is invalid.",
                                    "exp_year")
        cvc = str(card_p.get("cvc", "") or "")
        if cvc and (not cvc.isdigit() or len(cvc) not in (3, 4)):
            raise _card_param_error("invalid_cvc", "Your card's security code is invalid.", "cvc")
        card = cards.BY_NUMBER.get(number)
        if card is None:
            raise StripeError(
                402, "card_error",
                "Your card was declined. Your request was in test mode, but used a non test (live) card. "
                "For a list of valid test cards, visit: https://stripe.com/docs/testing.",
                code="card_declined", extra={"decline_code": "test_mode_live_card"},
            )
        return self._new_pm(number, exp_month, exp_year, card, params)

    def resolve_payment_method(self, ident: Any, param: str = "payment_method") -> dict:
        if not isinstance(ident, str) or not ident:
            raise invalid("Invalid payment_method", param=param)
        pm = self.payment_methods.get(ident)
        if pm is None:
            pm = self._pm_from_alias(ident)
        if pm is None:
            raise missing("PaymentMethod", ident, param)
        return pm

    def get_payment_method(self, pid: str) -> dict:
        return self.resolve_payment_method(pid, "payment_method")

    def update_payment_method(self, pid: str, params: dict) -> dict:
        pm = self.resolve_payment_method(pid)
        if "metadata" in params:
            pm["metadata"] = self._metadata(pm["metadata"], params["metadata"])
        card_p = params.get("card")
        if isinstance(card_p, dict):
            for k in ("exp_month", "exp_year"):
                v = self._int(card_p, k)
                if v is not None:
                    pm["card"][k] = v
        self.emit("payment_method.updated", pm)
        return pm

    def attach(self, pid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/payment_methods/attach

        Attaching validates the card: decline cards (all but 4000000000000341) fail with a 402
        card error (https://docs.stripe.com/testing#declined-payments).
        """
        customer = self._customer_id(params.get("customer"))
        if customer is None:
            raise invalid("Missing required param: customer.", param="customer", code="parameter_missing")
        pm = self.resolve_payment_method(pid)
        info = self.card_info[pm["id"]]
        if pm["customer"] is not None:
            raise invalid("The payment method you provided has already been attached to a customer.",
                          code="payment_method_unexpected_state")
        if info.consumed:
            raise _consumed_error()
        if info.card and info.card.attach_decline:
            d = info.card.attach_decline
            raise StripeError(402, "card_error", d.message, code=d.code,
                              extra=_decline_extra(d), saved=True)
        self._attach(pm, customer)
        return pm

    def _attach(self, pm: dict, customer: str) -> None:
        if pm["customer"] == customer:
            return
        pm["customer"] = customer
        self.emit("payment_method.attached", pm)

    def detach(self, pid: str) -> dict:
        """https://docs.stripe.com/api/payment_methods/detach -- a detached PM can't be reused;
        its mandates become inactive (``mandate.updated``)."""
        pm = self.resolve_payment_method(pid)
        if pm["customer"] is None:
            raise invalid("The payment method you provided is not attached to a customer so detachment "
                          "is impossible.", code="payment_method_unexpected_state")
        pm["customer"] = None
        self.card_info[pm["id"]].consumed = True
        self.emit("payment_method.detached", pm)
        for mandate in self.mandates.values():
            if mandate["payment_method"] == pm["id"] and mandate["status"] == "active":
                mandate["status"] = "inactive"
                self.emit("mandate.updated", mandate)
        return pm

    def list_payment_methods(self, params: dict, customer: str | None = None) -> list[dict]:
        """https://docs.stripe.com/api/payment_methods/list (customer's methods, newest first)."""
        customer = customer or params.get("customer")
        if customer:
            self._customer_id(customer)
        type_ = params.get("type")
        out = [pm for pm in self.payment_methods.values()
               if (not customer or pm["customer"] == customer) and (not type_ or pm["type"] == type_)]
        if not customer:
            out = [pm for pm in out if pm["customer"] is not None]
        return out

    def _check_pm_usable(self, pm: dict, customer: str | None) -> None:
        """https://docs.stripe.com/payments/payment-methods#reusing-payment-methods"""
        info = self.card_info[pm["id"]]
        if pm["customer"] is not None and pm["customer"] != customer:
            if customer is None:
                raise invalid("The provided PaymentMethod was previously attached to a Customer. To use it, "
                              "you must also provide the Customer ID.", param="customer")
            raise invalid(f"The provided PaymentMethod {pm['id']} belongs to a different Customer.",
                          param="payment_method")
        if pm["customer"] is None and info.consumed:
            raise _consumed_error()

    # ------------------------------------------------------------------ mandates
    def _create_mandate(self, pm: dict, acceptance: dict | None, card_options: dict | None) -> dict:
        """Card mandates (https://docs.stripe.com/api/mandates/object): created for a SetupIntent
        confirmed with ``mandate_data`` or, for India-issued cards, with
        ``payment_method_options[card][mandate_options]`` (https://docs.stripe.com/india-recurring-payments)."""
        acceptance = acceptance or {}
        accept_type = acceptance.get("type") or "online"
        cust_acc: dict[str, Any] = {"accepted_at": self.now(), "type": accept_type}
        if accept_type == "online":
            online = acceptance.get("online") if isinstance(acceptance.get("online"), dict) else {}
            cust_acc["online"] = {"ip_address": online.get("ip_address"), "user_agent": online.get("user_agent")}
        else:
            cust_acc["offline"] = {}
        card_details: dict[str, Any] = {}
        if card_options:
            card_details["mandate_options"] = card_options
        mandate = {
            "id": new_id("mandate"),
            "object": "mandate",
            "customer_acceptance": cust_acc,
            "livemode": False,
            "multi_use": {},
            "on_behalf_of": None,
            "payment_method": pm["id"],
            "payment_method_details": {"card": card_details, "type": "card"},
            "status": "active",
            "type": "multi_use",
        }
        self.mandates[mandate["id"]] = mandate
        return mandate

    def get_mandate(self, mid: str) -> dict:
        m = self.mandates.get(mid)
        if m is None:
            raise missing("mandate", mid)
        return m

    # ------------------------------------------------------------------ setup intents
    def create_setup_intent(self, params: dict) -> dict:
        """https://docs.stripe.com/api/setup_intents/create (``usage`` defaults to off_session)."""
        customer = self._customer_id(params.get("customer"))
        usage = params.get("usage") or "off_session"
        if usage not in ("off_session", "on_session"):
            raise invalid("Invalid usage: must be one of off_session or on_session", param="usage")
        types = as_list(params.get("payment_method_types")) or ["card"]
        if types != ["card"]:
            raise invalid("This sandbox supports only payment_method_types=['card'].",
                          param="payment_method_types")
        confirm = as_bool(params.get("confirm"))
        for p in ("mandate_data", "return_url"):
            if params.get(p) and not confirm:
                raise invalid(f"You can only pass {p} when confirm=true.", param=p)
        pm = None
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            self._check_pm_usable(pm, customer)
        sid = new_id("seti")
        si = {
            "id": sid,
            "object": "setup_intent",
            "allowed_payment_method_types": None,
            "application": None,
            "attach_to_self": None,
            "automatic_payment_methods": None,
            "cancellation_reason": None,
            "client_secret": f"{sid}_secret_{secrets.token_urlsafe(18)}",
            "created": self.now(),
            "customer": customer,
            "customer_account": None,
            "description": params.get("description") or None,
            "excluded_payment_method_types": None,
            "flow_directions": None,
            "last_setup_error": None,
            "latest_attempt": None,
            "livemode": False,
            "managed_payments": None,
            "mandate": None,
            "metadata": self._metadata({}, params.get("metadata")),
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": pm["id"] if pm else None,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": self._card_options(params, None)},
            "payment_method_types": ["card"],
            "single_use_mandate": None,
            "status": "requires_confirmation" if pm else "requires_payment_method",
            "usage": usage,
        }
        self.setup_intents[sid] = si
        self.emit("setup_intent.created", si)
        if confirm:
            self._confirm_setup(si, params)
        return si

    @staticmethod
    def _card_options(params: dict, current: dict | None) -> dict:
        out = current or {"mandate_options": None, "network": None, "request_three_d_secure": "automatic"}
        pmo = params.get("payment_method_options")
        if isinstance(pmo, dict) and isinstance(pmo.get("card"), dict):
            card_o = pmo["card"]
            if isinstance(card_o.get("mandate_options"), dict):
                out["mandate_options"] = card_o["mandate_options"]
            if card_o.get("request_three_d_secure"):
                out["request_three_d_secure"] = card_o["request_three_d_secure"]
        return out

    def get_setup_intent(self, sid: str) -> dict:
        si = self.setup_intents.get(sid)
        if si is None:
            raise missing("setup_intent", sid, "intent")
        return si

    def update_setup_intent(self, sid: str, params: dict) -> dict:
        si = self.get_setup_intent(sid)
        if si["status"] in ("succeeded", "canceled"):
            raise unexpected_state("setup_intent", f"You cannot update this SetupIntent because it has a "
                                   f"status of {si['status']}.")
        if "metadata" in params:
            si["metadata"] = self._metadata(si["metadata"], params["metadata"])
        if params.get("customer"):
            si["customer"] = self._customer_id(params["customer"])
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            self._check_pm_usable(pm, si["customer"])
            si["payment_method"] = pm["id"]
            si["status"] = "requires_confirmation"
        return si

    def confirm_setup_intent(self, sid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/setup_intents/confirm"""
        si = self.get_setup_intent(sid)
        self._confirm_setup(si, params)
        return si

    def _confirm_setup(self, si: dict, params: dict) -> None:
        if si["status"] not in ("requires_payment_method", "requires_confirmation", "requires_action"):
            raise unexpected_state(
                "setup_intent",
                f"You cannot confirm this SetupIntent because it has already {si['status']}"
                if si["status"] in ("succeeded", "canceled")
                else f"You cannot confirm this SetupIntent because it has a status of {si['status']}.",
            )
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            si["payment_method"] = pm["id"]
        if not si["payment_method"]:
            raise invalid("You cannot confirm this SetupIntent because it's missing a payment method. To "
                          "confirm the SetupIntent with cus, pass a payment_method.", param="payment_method",
                          code="setup_intent_unexpected_state")
        pm = self.payment_methods[si["payment_method"]]
        self._check_pm_usable(pm, si["customer"])
        si["payment_method_options"]["card"] = self._card_options(params, si["payment_method_options"]["card"])
        if params.get("mandate_data") is not None:
            md = params["mandate_data"]
            self.si_mandate_request[si["id"]] = md if isinstance(md, dict) else {}
        info = self.card_info[pm["id"]]
        card = info.card
        si["latest_attempt"] = new_id("setatt")
        si["next_action"] = None
        if card and card.attach_decline:
            self._setup_declined(si, pm, card.attach_decline)
        card_opts = si["payment_method_options"]["card"]
        india_emandate = bool(card and card.country == "IN" and card_opts.get("mandate_options"))
        needs_3ds = bool(card and card.setup_3ds) or india_emandate \
            or card_opts.get("request_three_d_secure") == "any"
        if needs_3ds:
            si["status"] = "requires_action"
            si["next_action"] = _next_action(si, params.get("return_url"))
            self.pending_3ds[si["id"]] = Pending3DS("setup_intent")
            self.emit("setup_intent.requires_action", si)
            return
        self._setup_succeeded(si, pm)

    def _setup_declined(self, si: dict, pm: dict, d: Decline) -> None:
        """https://docs.stripe.com/api/setup_intents/object#setup_intent_object-last_setup_error"""
        err = {"type": "card_error", "code": d.code, "decline_code": d.decline_code, "doc_url": d.doc_url,
               "message": d.message, "payment_method": copy.deepcopy(pm)}
        if d.advice_code:
            err["advice_code"] = d.advice_code
        si["status"] = "requires_payment_method"
        si["last_setup_error"] = err
        si["payment_method"] = None
        self.emit("setup_intent.setup_failed", si)
        raise StripeError(402, "card_error", d.message, code=d.code,
                          extra={**_decline_extra(d), "payment_method": copy.deepcopy(pm),
                                 "setup_intent": copy.deepcopy(si)}, saved=True)

    def _setup_succeeded(self, si: dict, pm: dict) -> None:
        """On success the PaymentMethod is attached to the SetupIntent's customer
        (https://docs.stripe.com/payments/save-and-reuse)."""
        info = self.card_info[pm["id"]]
        si["status"] = "succeeded"
        si["next_action"] = None
        si["last_setup_error"] = None
        if si["usage"] == "off_session":
            info.set_up = True
        card_opts = si["payment_method_options"]["card"]
        wants_mandate = si["id"] in self.si_mandate_request or (
            info.card is not None and info.card.country == "IN" and card_opts.get("mandate_options"))
        if wants_mandate:
            md = self.si_mandate_request.pop(si["id"], {}) or {}
            acceptance = md.get("customer_acceptance") if isinstance(md, dict) else None
            options = card_opts.get("mandate_options") if info.card and info.card.country == "IN" else None
            mandate = self._create_mandate(pm, acceptance, options)
            si["mandate"] = mandate["id"]
        if si["customer"]:
            self._attach(pm, si["customer"])
        self.pending_3ds.pop(si["id"], None)
        self.emit("setup_intent.succeeded", si)

    def cancel_setup_intent(self, sid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/setup_intents/cancel"""
        si = self.get_setup_intent(sid)
        if si["status"] in ("succeeded", "canceled", "processing"):
            raise unexpected_state("setup_intent", f"You cannot cancel this SetupIntent because it has a "
                                   f"status of {si['status']}.")
        si["status"] = "canceled"
        si["cancellation_reason"] = params.get("cancellation_reason") or None
        si["next_action"] = None
        self.pending_3ds.pop(sid, None)
        self.emit("setup_intent.canceled", si)
        return si

    def list_setup_intents(self, params: dict) -> list[dict]:
        out = list(self.setup_intents.values())
        if params.get("customer"):
            out = [s for s in out if s["customer"] == params["customer"]]
        if params.get("payment_method"):
            out = [s for s in out if s["payment_method"] == params["payment_method"]]
        return out

    # ------------------------------------------------------------------ payment intents
    def create_payment_intent(self, params: dict, request: dict | None = None) -> dict:
        """https://docs.stripe.com/api/payment_intents/create"""
        amount = self._int(params, "amount", required=True)
        assert amount is not None
        if amount < MIN_AMOUNT:
            raise invalid("Amount must be at least 50 cents", param="amount", code="amount_too_small")
        if amount > 99999999:
            raise invalid("Amount must be no more than 999,999.99", param="amount", code="amount_too_large")
        currency = str(params.get("currency") or "").lower()
        if not currency:
            raise invalid("Missing required param: currency.", param="currency", code="parameter_missing")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise invalid(f"Invalid currency: {currency}.", param="currency")
        customer = self._customer_id(params.get("customer"))
        types = as_list(params.get("payment_method_types")) or ["card"]
        if types != ["card"]:
            raise invalid("This sandbox supports only payment_method_types=['card'].",
                          param="payment_method_types")
        confirm = as_bool(params.get("confirm"))
        off_session = params.get("off_session")
        if off_session not in (None, "") and not confirm:
            raise invalid("You may only specify `off_session` when `confirm` is `true`.", param="off_session")
        if params.get("mandate") and not confirm:
            raise invalid("You may only specify `mandate` when `confirm` is `true`.", param="mandate")
        sfu = params.get("setup_future_usage") or None
        if sfu not in (None, "on_session", "off_session"):
            raise invalid("Invalid setup_future_usage", param="setup_future_usage")
        if params.get("capture_method") not in (None, "", "automatic", "automatic_async"):
            raise invalid("This sandbox supports only capture_method=automatic.", param="capture_method")
        pm = None
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            self._check_pm_usable(pm, customer)
        pid = new_id("pi")
        pi = {
            "id": pid,
            "object": "payment_intent",
            "allowed_payment_method_types": None,
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": params.get("capture_method") or "automatic",
            "client_secret": f"{pid}_secret_{secrets.token_urlsafe(18)}",
            "confirmation_method": params.get("confirmation_method") or "automatic",
            "created": self.now(),
            "currency": currency,
            "customer": customer,
            "customer_account": None,
            "description": params.get("description") or None,
            "excluded_payment_method_types": None,
            "hooks": None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "managed_payments": None,
            "metadata": self._metadata({}, params.get("metadata")),
            "next_action": None,
            "on_behalf_of": None,
            "payment_details": None,
            "payment_method": pm["id"] if pm else None,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"installments": None, "mandate_options": None,
                                                "network": None, "request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "payment_record": None,
            "presentment_details": None,
            "processing": None,
            "receipt_email": params.get("receipt_email") or None,
            "review": None,
            "setup_future_usage": sfu,
            "shipping": None,
            "source": None,
            "statement_descriptor": params.get("statement_descriptor") or None,
            "statement_descriptor_suffix": params.get("statement_descriptor_suffix") or None,
            "status": "requires_confirmation" if pm else "requires_payment_method",
            "transfer_data": None,
            "transfer_group": None,
        }
        self.payment_intents[pid] = pi
        self.emit("payment_intent.created", pi, request)
        if confirm:
            self._confirm_payment(pi, params, request)
        return pi

    def get_payment_intent(self, pid: str) -> dict:
        pi = self.payment_intents.get(pid)
        if pi is None:
            raise missing("payment_intent", pid, "intent")
        return pi

    def update_payment_intent(self, pid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/payment_intents/update"""
        pi = self.get_payment_intent(pid)
        if pi["status"] in ("succeeded", "canceled", "processing"):
            raise unexpected_state("payment_intent", f"You cannot update this PaymentIntent because it has a "
                                   f"status of {pi['status']}.")
        if "metadata" in params:
            pi["metadata"] = self._metadata(pi["metadata"], params["metadata"])
        if params.get("amount"):
            pi["amount"] = self._int(params, "amount")
        for key in ("description", "receipt_email"):
            if key in params:
                pi[key] = params[key] or None
        if params.get("customer"):
            pi["customer"] = self._customer_id(params["customer"])
        if "setup_future_usage" in params:
            pi["setup_future_usage"] = params["setup_future_usage"] or None
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            self._check_pm_usable(pm, pi["customer"])
            pi["payment_method"] = pm["id"]
            pi["status"] = "requires_confirmation"
        return pi

    def confirm_payment_intent(self, pid: str, params: dict, request: dict | None = None) -> dict:
        """https://docs.stripe.com/api/payment_intents/confirm -- also re-confirming a
        ``requires_payment_method`` PaymentIntent with the same or another PaymentMethod
        (https://docs.stripe.com/payments/paymentintents/lifecycle)."""
        pi = self.get_payment_intent(pid)
        self._confirm_payment(pi, params, request)
        return pi

    def _confirm_payment(self, pi: dict, params: dict, request: dict | None) -> None:
        if pi["status"] not in ("requires_payment_method", "requires_confirmation", "requires_action"):
            raise unexpected_state(
                "payment_intent",
                f"This PaymentIntent's payment_method could not be updated because it has a status of "
                f"{pi['status']}. You may only update the payment_method of a PaymentIntent with one of the "
                f"following statuses: requires_payment_method, requires_confirmation, requires_action."
                if params.get("payment_method") else
                f"You cannot confirm this PaymentIntent because it has a status of {pi['status']}.",
            )
        if params.get("payment_method"):
            pm = self.resolve_payment_method(params["payment_method"])
            pi["payment_method"] = pm["id"]
        if not pi["payment_method"]:
            raise invalid("You cannot confirm this PaymentIntent because it's missing a payment method. To "
                          "confirm the PaymentIntent, pass a payment_method.", param="payment_method",
                          code="payment_intent_unexpected_state")
        if params.get("setup_future_usage") is not None:
            pi["setup_future_usage"] = params["setup_future_usage"] or None
        pm = self.payment_methods[pi["payment_method"]]
        self._check_pm_usable(pm, pi["customer"])
        off_session = as_bool(params.get("off_session"))
        if params.get("mandate"):
            mandate = self.mandates.get(params["mandate"])
            if mandate is None:
                raise missing("mandate", params["mandate"], "mandate")
            if mandate["payment_method"] != pm["id"]:
                raise invalid("The provided mandate is not associated with the PaymentIntent's payment "
                              "method.", param="mandate")
            if mandate["status"] != "active":
                raise invalid("The provided mandate is inactive.", param="mandate")
        info = self.card_info[pm["id"]]
        card = info.card
        pi["next_action"] = None
        if info.later_decline is not None:
            self._payment_declined(pi, pm, info.later_decline, request)
        if off_session:
            if card and (card.off_session == cards.OFF_AUTH_ALWAYS or (
                    card.off_session == cards.OFF_AUTH_UNLESS_SET_UP and not info.set_up)):
                self._payment_declined(pi, pm, cards.AUTH_REQUIRED, request)
            if card and card.charge_decline:
                self._payment_declined(pi, pm, card.charge_decline, request)
            self._payment_succeeded(pi, pm, request)
            return
        if card and card.on_session_3ds:
            pi["status"] = "requires_action"
            pi["next_action"] = _next_action(pi, params.get("return_url"))
            self.pending_3ds[pi["id"]] = Pending3DS("payment_intent")
            self.emit("payment_intent.requires_action", pi, request)
            return
        if card and card.charge_decline:
            self._payment_declined(pi, pm, card.charge_decline, request)
        self._payment_succeeded(pi, pm, request)

    def _charge(self, pi: dict, pm: dict, decline: Decline | None) -> dict:
        """https://docs.stripe.com/api/charges/object -- one per attempt that reached the issuer."""
        cid = new_id("ch")
        ok = decline is None
        outcome = {
            "network_status": "approved_by_network" if ok else "declined_by_network",
            "reason": None if ok else decline.decline_code,
            "risk_level": "normal",
            "seller_message": "Payment complete." if ok else "The bank did not return any further details "
                                                               "with this decline.",
            "type": "authorized" if ok else "issuer_declined",
        }
        if not ok and decline.advice_code:
            outcome["advice_code"] = decline.advice_code
        ch = {
            "id": cid,
            "object": "charge",
            "amount": pi["amount"],
            "amount_captured": pi["amount"] if ok else 0,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "authorization_code": None,
            "balance_transaction": new_id("txn") if ok else None,
            "billing_details": copy.deepcopy(pm["billing_details"]),
            "calculated_statement_descriptor": None,
            "captured": ok,
            "created": self.now(),
            "currency": pi["currency"],
            "customer": pi["customer"],
            "description": pi["description"],
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": None if ok else decline.code,
            "failure_message": None if ok else decline.message,
            "fraud_details": {},
            "level3": None,
            "livemode": False,
            "metadata": dict(pi["metadata"]),
            "on_behalf_of": None,
            "outcome": outcome,
            "paid": ok,
            "payment_intent": pi["id"],
            "payment_method": pm["id"],
            "payment_method_details": {"card": {**{k: pm["card"][k] for k in (
                "brand", "country", "exp_month", "exp_year", "fingerprint", "funding", "last4")},
                "network": pm["card"]["brand"]}, "type": "card"},
            "presentment_details": None,
            "radar_options": None,
            "receipt_email": pi["receipt_email"],
            "receipt_number": None,
            "receipt_url": None,
            "refunded": False,
            "review": None,
            "shipping": copy.deepcopy(pi["shipping"]),
            "source": None,
            "source_transfer": None,
            "statement_descriptor": pi["statement_descriptor"],
            "statement_descriptor_suffix": pi["statement_descriptor_suffix"],
            "status": "succeeded" if ok else "failed",
            "transfer": None,
            "transfer_data": None,
            "transfer_group": pi["transfer_group"],
        }
        self.charges[cid] = ch
        pi["latest_charge"] = cid
        return ch

    def _payment_declined(self, pi: dict, pm: dict, d: Decline, request: dict | None) -> None:
        """Off-session/declined confirm: HTTP 402 card_error, PaymentIntent back to
        ``requires_payment_method`` with ``last_payment_error``, the error carrying the PaymentIntent
        (https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method,
        https://docs.stripe.com/declines/codes)."""
        ch = self._charge(pi, pm, d)
        err = {"type": "card_error", "charge": ch["id"], "code": d.code, "decline_code": d.decline_code,
               "doc_url": d.doc_url, "message": d.message, "payment_method": copy.deepcopy(pm)}
        if d.advice_code:
            err["advice_code"] = d.advice_code
        pi["status"] = "requires_payment_method"
        pi["last_payment_error"] = err
        pi["next_action"] = None
        self.pending_3ds.pop(pi["id"], None)
        self.emit("charge.failed", ch, request)
        self.emit("payment_intent.payment_failed", pi, request)
        raise StripeError(402, "card_error", d.message, code=d.code,
                          extra={**_decline_extra(d), "charge": ch["id"], "payment_method": copy.deepcopy(pm),
                                 "payment_intent": copy.deepcopy(pi)}, saved=True)

    def _payment_succeeded(self, pi: dict, pm: dict, request: dict | None) -> None:
        info = self.card_info[pm["id"]]
        ch = self._charge(pi, pm, None)
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        pi["last_payment_error"] = None
        pi["next_action"] = None
        self.pending_3ds.pop(pi["id"], None)
        if pi["setup_future_usage"] and pi["customer"]:
            # https://docs.stripe.com/payments/save-during-payment: the PM is attached on success.
            if pi["setup_future_usage"] == "off_session":
                info.set_up = True
            self._attach(pm, pi["customer"])
        elif pm["customer"] is None:
            info.consumed = True
        self.ledger.append({
            "payment_intent": pi["id"],
            "charge": ch["id"],
            "amount": pi["amount"],
            "currency": pi["currency"],
            "customer": pi["customer"],
            "payment_method": pm["id"],
            "metadata": dict(pi["metadata"]),
            "created": ch["created"],
        })
        self.emit("charge.succeeded", ch, request)
        self.emit("payment_intent.succeeded", pi, request)

    def cancel_payment_intent(self, pid: str, params: dict) -> dict:
        """https://docs.stripe.com/api/payment_intents/cancel"""
        pi = self.get_payment_intent(pid)
        if pi["status"] in ("succeeded", "canceled"):
            raise unexpected_state("payment_intent", f"You cannot cancel this PaymentIntent because it has a "
                                   f"status of {pi['status']}. Only a PaymentIntent with one of the following "
                                   "statuses may be canceled: requires_payment_method, requires_capture, "
                                   "requires_confirmation, requires_action, processing.")
        reason = params.get("cancellation_reason") or None
        allowed = (None, "duplicate", "fraudulent", "requested_by_customer", "abandoned")
        if reason not in allowed:
            raise invalid("Invalid cancellation_reason", param="cancellation_reason")
        pi["status"] = "canceled"
        pi["cancellation_reason"] = reason
        pi["canceled_at"] = self.now()
        pi["next_action"] = None
        self.pending_3ds.pop(pid, None)
        self.emit("payment_intent.canceled", pi)
        return pi

    def list_payment_intents(self, params: dict) -> list[dict]:
        out = list(self.payment_intents.values())
        if params.get("customer"):
            out = [p for p in out if p["customer"] == params["customer"]]
        return out

    def search_payment_intents(self, query: str) -> list[dict]:
        """https://docs.stripe.com/search#search-query-language -- clauses joined by AND or OR;
        ``field:'value'``, ``metadata['key']:'value'``, ``-`` negates, ``amount>100`` compares.
        Results are immediate here; Stripe's index may lag up to a minute."""
        preds = _parse_query(query)
        return [pi for pi in self.payment_intents.values() if preds(pi)]

    # ------------------------------------------------------------------ 3-D Secure
    def resolve_3ds(self, intent_id: str, outcome: str) -> dict:
        """Finish a pending 3-D Secure challenge as the customer would in the browser.

        complete: SetupIntent → succeeded (PM attached); PaymentIntent → charged (succeeded, or
        declined for cards that decline after authentication, e.g. 4000008260003178).
        fail: ``requires_payment_method`` with ``setup_intent_authentication_failure`` /
        ``payment_intent_authentication_failure`` (https://docs.stripe.com/payments/3d-secure,
        https://docs.stripe.com/error-codes#payment-intent-authentication-failure).
        """
        pending = self.pending_3ds.get(intent_id)
        intent = self.setup_intents.get(intent_id) or self.payment_intents.get(intent_id)
        if intent is None:
            raise missing("intent", intent_id, "intent")
        if pending is None or intent["status"] != "requires_action":
            raise invalid(f"{intent_id} has no pending 3-D Secure authentication (status "
                          f"{intent['status']}).", code=f"{intent['object']}_unexpected_state")
        if outcome not in ("complete", "fail"):
            raise invalid("outcome must be 'complete' or 'fail'", param="outcome")
        pm = self.payment_methods[intent["payment_method"]]
        del self.pending_3ds[intent_id]
        if pending.kind == "setup_intent":
            if outcome == "complete":
                self._setup_succeeded(intent, pm)
            else:
                intent["status"] = "requires_payment_method"
                intent["next_action"] = None
                intent["last_setup_error"] = {
                    "type": "invalid_request_error", "code": "setup_intent_authentication_failure",
                    "doc_url": "https://stripe.com/docs/error-codes/setup-intent-authentication-failure",
                    "message": AUTH_FAILURE_MESSAGE, "payment_method": copy.deepcopy(pm)}
                intent["payment_method"] = None
                self.emit("setup_intent.setup_failed", intent)
            return intent
        if outcome == "complete":
            card = self.card_info[pm["id"]].card
            try:
                if card and card.charge_decline:
                    self._payment_declined(intent, pm, card.charge_decline, None)
                self._payment_succeeded(intent, pm, None)
            except StripeError:
                pass
        else:
            intent["status"] = "requires_payment_method"
            intent["next_action"] = None
            intent["last_payment_error"] = {
                "type": "invalid_request_error", "code": "payment_intent_authentication_failure",
                "doc_url": "https://stripe.com/docs/error-codes/payment-intent-authentication-failure",
                "message": "The provided PaymentMethod has failed authentication. You can provide "
                           "payment_method_data or a new PaymentMethod to attempt to fulfill this "
                           "PaymentIntent again.",
                "payment_method": copy.deepcopy(pm)}
            self.emit("payment_intent.payment_failed", intent)
        return intent

    # ------------------------------------------------------------------ charges / events
    def get_charge(self, cid: str) -> dict:
        ch = self.charges.get(cid)
        if ch is None:
            raise missing("charge", cid)
        return ch

    def list_charges(self, params: dict) -> list[dict]:
        out = list(self.charges.values())
        if params.get("customer"):
            out = [c for c in out if c["customer"] == params["customer"]]
        if params.get("payment_intent"):
            out = [c for c in out if c["payment_intent"] == params["payment_intent"]]
        return out

    def get_event(self, eid: str) -> dict:
        ev = self.events.get(eid)
        if ev is None:
            raise missing("event", eid)
        return ev

    def list_events(self, params: dict) -> list[dict]:
        """https://docs.stripe.com/api/events/list (``type`` may end with ``.*``; ``types[]``;
        ``delivery_success``: false keeps the events still pending or failed at an endpoint, true those
        delivered to every endpoint, by ``pending_webhooks``)."""
        out = [self.events[e] for e in self.event_order]
        delivered = params.get("delivery_success")
        if delivered not in (None, ""):
            if str(delivered).lower() not in ("true", "false"):
                raise invalid("Invalid boolean: delivery_success", param="delivery_success")
            wanted = str(delivered).lower() == "true"
            out = [e for e in out if (e.get("pending_webhooks", 0) == 0) == wanted]
        type_ = params.get("type")
        if type_:
            if type_.endswith(".*"):
                out = [e for e in out if e["type"].startswith(type_[:-1])]
            else:
                out = [e for e in out if e["type"] == type_]
        types = as_list(params.get("types"))
        if types:
            out = [e for e in out if e["type"] in types]
        created = params.get("created")
        if isinstance(created, dict):
            for op, fn in (("gt", int.__gt__), ("gte", int.__ge__), ("lt", int.__lt__), ("lte", int.__le__)):
                if op in created:
                    bound = int(created[op])
                    out = [e for e in out if fn(e["created"], bound)]
        elif created:
            out = [e for e in out if e["created"] == int(created)]
        return out


# ---------------------------------------------------------------------- module helpers
# Fields Stripe leaves out of an object unless they are named in ``expand[]`` ("This field is not included
# by default"; marked Expandable, and not an id, on https://docs.stripe.com/api/customers/object and
# https://docs.stripe.com/api/charges/object). Nothing in the sandbox holds them, so expanded they are empty.
INCLUDABLE: dict[str, frozenset[str]] = {
    "customer": frozenset({"cash_balance", "invoice_credit_balance", "sources", "subscriptions", "tax", "tax_ids"}),
    "charge": frozenset({"refunds"}),
}


def _included(obj: dict, field_: str) -> Any:
    path = {"customer": "customers", "charge": "charges"}[obj["object"]]
    if field_ in ("sources", "subscriptions", "tax_ids", "refunds"):
        return {"object": "list", "data": [], "has_more": False, "url": f"/v1/{path}/{obj['id']}/{field_}"}
    if field_ == "tax":
        return {"automatic_tax": "unrecognized_location", "ip_address": None, "location": None}
    if field_ == "cash_balance":
        return {"object": "cash_balance", "available": None, "customer": obj["id"], "livemode": False,
                "settings": {"reconciliation_mode": "automatic", "using_merchant_default": True}}
    return {}  # invoice_credit_balance: no balance in any currency


def _card_param_error(code: str, message: str, field_: str) -> StripeError:
    return StripeError(402, "card_error", message, code=code, param=field_)


def _consumed_error() -> StripeError:
    return invalid("This PaymentMethod was previously used without being attached to a Customer or was "
                   "detached from a Customer, and may not be used again.", param="payment_method")


def _decline_extra(d: Decline) -> dict:
    extra: dict[str, Any] = {"decline_code": d.decline_code, "doc_url": d.doc_url}
    if d.advice_code:
        extra["advice_code"] = d.advice_code
    return extra


def _next_action(intent: dict, return_url: str | None) -> dict:
    """``next_action`` for a 3-D Secure challenge (https://docs.stripe.com/payments/3d-secure/authentication-flow):
    ``redirect_to_url`` when a ``return_url`` was given, otherwise ``use_stripe_sdk``. The URLs point
    at the sandbox's own challenge page (``/_sandbox/3ds/{id}``), relative to the API base."""
    page = f"/_sandbox/3ds/{intent['id']}"
    if return_url:
        return {"type": "redirect_to_url",
                "redirect_to_url": {"return_url": return_url, "url": f"{page}?return_url={return_url}"}}
    return {"type": "use_stripe_sdk",
            "use_stripe_sdk": {"type": "three_d_secure_redirect", "stripe_js": page,
                               "source": new_id("src")}}


_CLAUSE = re.compile(
    r"""\s*(-?)\s*(metadata\[\s*(['"])(?P<mkey>.*?)\3\s*\]|(?P<field>[a-z_]+))\s*(?P<op>:|>=|<=|>|<)\s*"""
    r"""(?:(['"])(?P<sval>.*?)\7|(?P<nval>-?\d+))\s*""",
)


def _parse_query(query: str) -> Callable[[dict], bool]:
    if not query or not query.strip():
        raise invalid("Missing required param: query.", param="query", code="parameter_missing")
    joiner = "OR" if re.search(r"\sOR\s", query) else "AND"
    if joiner == "OR" and re.search(r"\sAND\s", query):
        raise invalid("Search queries cannot mix AND and OR.", param="query")
    preds = []
    for part in re.split(rf"\s{joiner}\s", query):
        m = _CLAUSE.fullmatch(part)
        if not m:
            raise invalid(f"Invalid search query: {part.strip()!r}", param="query")
        neg = m.group(1) == "-"
        mkey, fld, op = m.group("mkey"), m.group("field"), m.group("op")
        sval = m.group("sval") if m.group("sval") is not None else m.group("nval")
        if fld and fld not in ("status", "customer", "currency", "amount", "created", "metadata"):
            raise invalid(f"Field '{fld}' is not supported for search on payment_intents.", param="query")

        def pred(pi: dict, mkey=mkey, fld=fld, op=op, sval=sval, neg=neg) -> bool:
            value = pi["metadata"].get(mkey) if mkey is not None else pi.get(fld)
            if op == ":":
                ok = value is not None and str(value) == sval
            else:
                try:
                    a, b = float(value), float(sval)
                except (TypeError, ValueError):
                    return False
                ok = {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]
            return ok != neg

        preds.append(pred)
    if joiner == "AND":
        return lambda pi: all(p(pi) for p in preds)
    return lambda pi: any(p(pi) for p in preds)
