"""Prometheus metrics of the HTTP app, on the process's default registry (``GET /metrics``).

Requests are labelled by route *template* (``/api/subscriptions/{subscription_id}``), never by the
raw path: paths of customer pages carry tokens, and raw paths would make one series per id.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter("billing_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram("billing_http_request_duration_seconds", "HTTP request duration", ["method", "route"])
CUSTOMERS_CREATED = Counter("billing_customers_created", "Customers created through the API")
CARD_SETUPS = Counter("billing_card_setups", "SetupIntents created through the API, by resulting status",
                      ["status"])
SUBSCRIPTIONS_CREATED = Counter("billing_subscriptions_created", "Subscriptions created through the API")
SUBSCRIPTIONS_CANCELED = Counter("billing_subscriptions_canceled", "Subscriptions canceled through the API")
STRIPE_UNAVAILABLE = Counter("billing_api_stripe_unavailable", "API requests answered 503 because Stripe was "
                             "unreachable")
