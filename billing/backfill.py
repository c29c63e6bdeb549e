"""The backfill of missed Stripe webhooks: events we never stored are read back from Stripe's event list and
fed through the same inbox as deliveries.

Stripe retries a failed delivery for up to three days and then gives up; a webhook it gave up on is never
sent again. Its event list keeps every event for 30 days and can filter those whose delivery failed, which is
how Stripe documents recovering missed events (https://docs.stripe.com/webhooks#missed-events,
https://docs.stripe.com/webhooks/process-undelivered-events, https://docs.stripe.com/api/events/list:
``delivery_success=false`` returns "events which are still pending or have failed all delivery attempts to a
webhook endpoint").

Each run (beat, every ``BACKFILL_EVENTS_INTERVAL``) lists, for the event types we handle only
(:data:`billing.webhooks.HANDLED_TYPES`):

1. events with ``delivery_success=false`` from the last 30 days — deliveries Stripe is still retrying, or gave
   up on;
2. every event created at or after the newest one we have stored — events whose delivery Stripe counted as
   done but that never reached our inbox (a proxy that answered 2xx, an endpoint pointed elsewhere for a
   while).

Events already in the inbox are skipped with one query per page; the others go through
:func:`billing.webhooks.accept_listed`: stored once per event id (``INSERT … ON CONFLICT DO NOTHING``, so a
delivery arriving at the same moment is a harmless duplicate) and processed by the same task and handlers as
a delivery. Nothing else is trusted more for having been listed: the handlers check every object against our
rows as they do for deliveries.

Bounded work: at most :data:`MAX_PAGES` pages of 100 per listing and run, oldest first within what was read.
A first listing-2 run on a busy account may stop there (logged as ``truncated``); listing 1 still finds every
failed delivery on later runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from billing import stripe_gateway, webhooks
from billing.db import unit_of_work
from billing.models import WebhookEvent
from billing.outcomes import PaymentGateway

log = logging.getLogger(__name__)

# Stripe's event list reaches back this far.
HORIZON = timedelta(days=30)
MAX_PAGES = 20


@dataclass
class BackfillReport:
    listed: int = 0
    stored: int = 0  # new to the inbox, handed to processing
    known: int = 0  # already in the inbox (delivered, or backfilled before)
    refused: int = 0  # could not be stored or enqueued (logged)
    truncated: bool = False


def run(*, enqueue: Callable[[int], None], gateway: PaymentGateway | None = None,
        now: datetime | None = None, max_pages: int = MAX_PAGES) -> BackfillReport:
    gateway = stripe_gateway.resolve(gateway)
    now = now or datetime.now(UTC)
    report = BackfillReport()
    newest = _newest_stored()
    listings = [{"delivery_success": False, "created_gte": int((now - HORIZON).timestamp())}]
    if newest is not None:
        listings.append({"created_gte": newest})
    seen: set[str] = set()
    for listing in listings:
        events, truncated = _read(gateway, listing, max_pages)
        report.truncated |= truncated
        fresh = [e for e in events if e.get("id") not in seen]
        seen.update(e.get("id") for e in fresh)
        _feed(fresh, enqueue, report)
    if report.truncated:
        log.warning("event backfill stopped at its page limit; the rest is read on later runs",
                    extra={"max_pages": max_pages})
    if report.stored or report.refused:
        log.info("event backfill stored missed events", extra={"listed": report.listed, "stored": report.stored,
                                                              "known": report.known, "refused": report.refused})
    return report


def _newest_stored() -> int | None:
    with unit_of_work() as uow:
        return uow.session.scalar(select(func.max(WebhookEvent.event_created)))


def _read(gateway: PaymentGateway, listing: dict, max_pages: int) -> tuple[list[dict], bool]:
    """Up to ``max_pages`` pages of one listing, oldest first; and whether more were left unread."""
    events: list[dict] = []
    after = None
    for _ in range(max_pages):
        page = gateway.list_events(types=webhooks.HANDLED_TYPES, starting_after=after, **listing)
        events.extend(page.events)
        if not page.has_more or not page.events:
            return events[::-1], False
        after = page.events[-1]["id"]
    return events[::-1], True


def _known(ids: list[str]) -> set[str]:
    if not ids:
        return set()
    with unit_of_work() as uow:
        return set(uow.session.scalars(select(WebhookEvent.stripe_event_id)
                                       .where(WebhookEvent.stripe_event_id.in_(ids))))


def _feed(events: list[dict], enqueue: Callable[[int], None], report: BackfillReport) -> None:
    """Store the events not in the inbox yet, each on its own (one bad event never stops the others)."""
    # Only types we handle, whatever the server did with the filter.
    events = [e for e in events if isinstance(e, dict) and e.get("type") in webhooks.HANDLED_TYPES]
    report.listed += len(events)
    known = _known([str(e.get("id")) for e in events])
    for event in events:
        if event.get("id") in known:
            report.known += 1
            continue
        try:
            accepted = webhooks.accept_listed(event, enqueue=enqueue)
        except webhooks.WebhookError as exc:
            report.refused += 1
            log.warning("listed event refused", extra={"event_id": event.get("id"), "reason": exc.reason})
            continue
        except Exception:
            # Stored but not enqueued (the broker is down): the inbox's requeue sweep hands it on later.
            report.refused += 1
            log.exception("listed event not handed on", extra={"event_id": event.get("id")})
            continue
        if accepted.duplicate:
            report.known += 1  # a delivery stored it in the meantime
        else:
            report.stored += 1
