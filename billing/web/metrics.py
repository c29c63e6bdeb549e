"""The HTTP app's metrics are defined with all the others in :mod:`billing.metrics`; this name stays
for the modules that import it from here."""

from __future__ import annotations

from billing.metrics import (  # noqa: F401
    CARD_SETUPS,
    CUSTOMERS_CREATED,
    HTTP_LATENCY,
    HTTP_REQUESTS,
    STRIPE_UNAVAILABLE,
    SUBSCRIPTIONS_CANCELED,
    SUBSCRIPTIONS_CREATED,
)
