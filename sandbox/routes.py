"""The /v1 route table: method + path template → handler on ``State``.

Each route names the object it writes (``lock``: index of the path id) so concurrent writes to
one object can be answered with ``lock_timeout``.
List endpoints follow https://docs.stripe.com/api/pagination (newest first, ``limit`` 1–100,
default 10, ``starting_after``/``ending_before``); search follows
https://docs.stripe.com/api/pagination/search.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.errors import invalid
from sandbox.forms import as_list
from sandbox.state import State

Handler = Callable[[State, dict[str, Any], tuple[str, ...], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    regex: re.Pattern[str]
    handler: Handler
    lock: bool  # writes the object named by the first path id

    @property
    def name(self) -> str:
        return f"{self.method} {self.template}"


def paginate(state: State, items: list[dict], params: dict[str, Any], url: str) -> dict[str, Any]:
    items = list(reversed(items))  # stores keep creation order; lists are newest first
    try:
        limit = int(params.get("limit") or 10)
    except ValueError:
        raise invalid("Invalid integer: limit", param="limit") from None
    if not 1 <= limit <= 100:
        raise invalid("Limit must be between 1 and 100.", param="limit")
    ids = [o["id"] for o in items]
    start = 0
    if params.get("starting_after"):
        if params["starting_after"] not in ids:
            raise invalid(f"No such object: '{params['starting_after']}'", param="starting_after")
        start = ids.index(params["starting_after"]) + 1
        page = items[start:start + limit]
        has_more = start + limit < len(items)
    elif params.get("ending_before"):
        if params["ending_before"] not in ids:
            raise invalid(f"No such object: '{params['ending_before']}'", param="ending_before")
        end = ids.index(params["ending_before"])
        page = items[max(0, end - limit):end]
        has_more = end - limit > 0
    else:
        page = items[:limit]
        has_more = len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _list(fn: Callable[[State, dict], list[dict]], url: str) -> Handler:
    return lambda s, p, ids, req: paginate(s, fn(s, p), p, url)


def _search(s: State, p: dict, ids: tuple[str, ...], req: dict) -> dict:
    results = list(reversed(s.search_payment_intents(p.get("query", ""))))
    limit = int(p.get("limit") or 10)
    offset = int(p["page"]) if str(p.get("page", "")).isdigit() else 0
    page = results[offset:offset + limit]
    more = offset + limit < len(results)
    return {"object": "search_result", "data": page, "has_more": more,
            "next_page": str(offset + limit) if more else None, "url": "/v1/payment_intents/search"}


ROUTE_SPECS: list[tuple[str, str, Handler, bool]] = [
    # customers -- https://docs.stripe.com/api/customers
    ("POST", "/v1/customers", lambda s, p, i, r: s.create_customer(p), False),
    ("GET", "/v1/customers", _list(lambda s, p: s.list_customers(p), "/v1/customers"), False),
    ("GET", "/v1/customers/{id}", lambda s, p, i, r: s.get_customer(i[0]), False),
    ("POST", "/v1/customers/{id}", lambda s, p, i, r: s.update_customer(i[0], p), True),
    ("DELETE", "/v1/customers/{id}", lambda s, p, i, r: s.delete_customer(i[0]), True),
    ("GET", "/v1/customers/{id}/payment_methods",
     lambda s, p, i, r: paginate(s, s.list_payment_methods(p, i[0]), p, f"/v1/customers/{i[0]}/payment_methods"),
     False),
    # payment methods -- https://docs.stripe.com/api/payment_methods
    ("POST", "/v1/payment_methods", lambda s, p, i, r: s.create_payment_method(p), False),
    ("GET", "/v1/payment_methods", _list(lambda s, p: s.list_payment_methods(p), "/v1/payment_methods"), False),
    ("GET", "/v1/payment_methods/{id}", lambda s, p, i, r: s.get_payment_method(i[0]), False),
    ("POST", "/v1/payment_methods/{id}", lambda s, p, i, r: s.update_payment_method(i[0], p), True),
    ("POST", "/v1/payment_methods/{id}/attach", lambda s, p, i, r: s.attach(i[0], p), True),
    ("POST", "/v1/payment_methods/{id}/detach", lambda s, p, i, r: s.detach(i[0]), True),
    # setup intents -- https://docs.stripe.com/api/setup_intents
    ("POST", "/v1/setup_intents", lambda s, p, i, r: s.create_setup_intent(p), False),
    ("GET", "/v1/setup_intents", _list(lambda s, p: s.list_setup_intents(p), "/v1/setup_intents"), False),
    ("GET", "/v1/setup_intents/{id}", lambda s, p, i, r: s.get_setup_intent(i[0]), False),
    ("POST", "/v1/setup_intents/{id}", lambda s, p, i, r: s.update_setup_intent(i[0], p), True),
    ("POST", "/v1/setup_intents/{id}/confirm", lambda s, p, i, r: s.confirm_setup_intent(i[0], p), True),
    ("POST", "/v1/setup_intents/{id}/cancel", lambda s, p, i, r: s.cancel_setup_intent(i[0], p), True),
    # payment intents -- https://docs.stripe.com/api/payment_intents
    ("POST", "/v1/payment_intents", lambda s, p, i, r: s.create_payment_intent(p, r), False),
    ("GET", "/v1/payment_intents", _list(lambda s, p: s.list_payment_intents(p), "/v1/payment_intents"), False),
    ("GET", "/v1/payment_intents/search", _search, False),
    ("GET", "/v1/payment_intents/{id}", lambda s, p, i, r: s.get_payment_intent(i[0]), False),
    ("POST", "/v1/payment_intents/{id}", lambda s, p, i, r: s.update_payment_intent(i[0], p), True),
    ("POST", "/v1/payment_intents/{id}/confirm",
     lambda s, p, i, r: s.confirm_payment_intent(i[0], p, r), True),
    ("POST", "/v1/payment_intents/{id}/cancel", lambda s, p, i, r: s.cancel_payment_intent(i[0], p), True),
    # mandates, charges, events
    ("GET", "/v1/mandates/{id}", lambda s, p, i, r: s.get_mandate(i[0]), False),
    ("GET", "/v1/charges", _list(lambda s, p: s.list_charges(p), "/v1/charges"), False),
    ("GET", "/v1/charges/{id}", lambda s, p, i, r: s.get_charge(i[0]), False),
    ("GET", "/v1/events", _list(lambda s, p: s.list_events(p), "/v1/events"), False),
    ("GET", "/v1/events/{id}", lambda s, p, i, r: s.get_event(i[0]), False),
]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{id\\\}", r"([^/]+)", re.escape(template)) + "/?$")


ROUTES: list[Route] = [Route(m, t, _compile(t), h, lock) for m, t, h, lock in ROUTE_SPECS]


def match(method: str, path: str) -> tuple[Route, tuple[str, ...]] | None:
    for route in ROUTES:
        if route.method != method:
            continue
        m = route.regex.match(path)
        if m:
            return route, m.groups()
    return None


def expand_paths(params: dict[str, Any]) -> list[str]:
    return [str(x) for x in as_list(params.pop("expand", None))]
