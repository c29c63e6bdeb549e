"""Latency and fault injection, deterministic from a seed.

Latency is log-normal, given by its median and 99th percentile. Faults are rules: targeted ones
(``count``: fire on the next N matching requests) and random ones (``rate``: probability per
matching request), drawn from one seeded generator so a run is reproducible for a given request
order. API fault kinds:

* ``api_error``     500 api_error, nothing executed; saved under the idempotency key like any 500
                    (https://docs.stripe.com/api/idempotent_requests) unless the rule says ``"saved": false``
* ``rate_limit``    429 rate_limit, nothing executed (https://docs.stripe.com/rate-limits)
* ``lock_timeout``  429 lock_timeout, nothing executed
* ``reset``         connection closed before the request runs: no HTTP response at all
* ``lose_response`` request fully processed (state changed, idempotent result saved), then the
                    connection is closed without a response
* ``slow``          request processed, response held back ``delay_ms`` (client timeouts)

Webhook fault kinds (rules with ``"target": "webhook"``): ``duplicate`` (delivered twice),
``reorder`` (held back ``delay_ms`` so later events overtake it) and ``drop`` (never delivered: the
attempt is recorded as failed, no retry follows, and the event stays ``pending_webhooks`` > 0, so
``GET /v1/events?delivery_success=false`` lists it — an endpoint Stripe gave up on).
"""

from __future__ import annotations

import fnmatch
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

API_FAULTS = {"api_error", "rate_limit", "lock_timeout", "reset", "lose_response", "slow"}
WEBHOOK_FAULTS = {"duplicate", "reorder", "drop"}
ALIASES = {"connection_reset": "reset", "500": "api_error", "429": "rate_limit", "timeout": "slow",
           "delay": "slow", "lost_response": "lose_response", "drop_delivery": "drop"}
Z99 = 2.3263478740408408  # standard normal 99th percentile


@dataclass
class FaultRule:
    fault: str
    method: str | None = None
    path: str | None = None
    count: int | None = None
    rate: float | None = None
    delay_ms: float = 0.0
    saved: bool = True
    event_type: str | None = None
    id: int = 0

    @property
    def target(self) -> str:
        return "webhook" if self.fault in WEBHOOK_FAULTS else "api"

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return not self.path or self.path == path or fnmatch.fnmatchcase(path, self.path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target
        return d


def parse_rule(data: dict[str, Any], rule_id: int) -> FaultRule:
    fault = ALIASES.get(str(data.get("fault", "")), str(data.get("fault", "")))
    if fault not in API_FAULTS | WEBHOOK_FAULTS:
        raise ValueError(f"unknown fault {data.get('fault')!r}; one of {sorted(API_FAULTS | WEBHOOK_FAULTS)}")
    count = data.get("count")
    rate = data.get("rate")
    if count is None and rate is None:
        count = 1
    if rate is not None and not 0 <= float(rate) <= 1:
        raise ValueError("rate must be between 0 and 1")
    delay = float(data.get("delay_ms", 0) or 0)
    if fault == "slow" and delay <= 0:
        raise ValueError("a 'slow' fault needs delay_ms > 0")
    return FaultRule(
        fault=fault,
        method=data.get("method"),
        path=data.get("path"),
        count=int(count) if count is not None else None,
        rate=float(rate) if rate is not None else None,
        delay_ms=delay,
        saved=bool(data.get("saved", True)),
        event_type=data.get("event_type"),
        id=rule_id,
    )


class Faults:
    def __init__(self, seed: int = 0, median_ms: float = 0.0, p99_ms: float | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.rules: list[FaultRule] = []
        self.next_id = 1
        self.fired: dict[str, int] = {}
        self.set_latency(median_ms, p99_ms)

    def reset(self, seed: int, median_ms: float, p99_ms: float | None) -> None:
        self.__init__(seed, median_ms, p99_ms)  # type: ignore[misc]

    def set_latency(self, median_ms: float, p99_ms: float | None = None) -> None:
        median_ms = max(0.0, float(median_ms or 0))
        p99_ms = median_ms if p99_ms is None else max(float(p99_ms), median_ms)
        self.median_ms, self.p99_ms = median_ms, p99_ms
        self.sigma = math.log(p99_ms / median_ms) / Z99 if median_ms > 0 and p99_ms > median_ms else 0.0

    def latency_s(self) -> float:
        if self.median_ms <= 0:
            return 0.0
        if self.sigma == 0:
            return self.median_ms / 1000
        return self.median_ms * math.exp(self.sigma * self.rng.gauss(0.0, 1.0)) / 1000

    def add(self, data: dict[str, Any]) -> FaultRule:
        rule = parse_rule(data, self.next_id)
        self.next_id += 1
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def pick(self, target: str, method: str, path: str, event_type: str | None = None) -> FaultRule | None:
        """Targeted rules first (in the order added), then random-rate rules."""
        for rule in self.rules:
            if rule.target != target or rule.count is None or rule.rate is not None:
                continue
            if target == "webhook":
                if rule.event_type and rule.event_type != event_type:
                    continue
            elif not rule.matches(method, path):
                continue
            rule.count -= 1
            if rule.count <= 0:
                self.rules.remove(rule)
            return self._fired(rule)
        for rule in self.rules:
            if rule.target != target or rule.rate is None:
                continue
            if target == "webhook":
                if rule.event_type and rule.event_type != event_type:
                    continue
            elif not rule.matches(method, path):
                continue
            if self.rng.random() < rule.rate:
                return self._fired(rule)
        return None

    def _fired(self, rule: FaultRule) -> FaultRule:
        self.fired[rule.fault] = self.fired.get(rule.fault, 0) + 1
        return rule
