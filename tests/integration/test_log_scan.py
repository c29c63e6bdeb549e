"""Every log line of a billing cycle is JSON, carries the charge's ids, and holds no secret.

A cycle runs through real processes (see :mod:`tests.integration.cycle`): card setups on ``billing web``
(a client secret and a /setup link), charges in ``billing worker`` (one paid, one declined), a signed
webhook carrying a PaymentIntent's client secret, the outbox relay mailing a recovery link that is
then opened. Then the worker's log, the web app's log and this process's log (written through the
product's JSON handler, and as captured raw by pytest) are scanned.

Two defences are checked, each on its own: stripe-python's request and response logging is held at
WARNING (no ``stripe`` line below that anywhere), and redaction masks what slips through (this
process logs the /setup and /recover URLs it requests, as httpx does, so its file would show the
tokens without it).
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from tests.integration.cycle import run_cycle

pytestmark = pytest.mark.usefixtures("clean_db")

# Shapes, whatever the value: any key, any secret, any token, not only the ones this cycle saw.
SHAPES = {
    "API key": re.compile(r"\b[sr]k_(?:test|live)_[A-Za-z0-9]+"),
    "webhook secret": re.compile(r"\bwhsec_[A-Za-z0-9]+"),
    "client secret": re.compile(r"\b(?:pi|seti)_[A-Za-z0-9]+_secret_[A-Za-z0-9]+"),
    "customer page token": re.compile(r"/(?:recover|setup)/(?!\{|\[redacted\])[^\s\"'/?#<>\\]+"),
}
# What this process itself logs on the product's behalf; the test's own HTTP client and servers are
# scanned through the JSON handler (own.log) instead.
PRODUCT_LOGGERS = ("billing", "workers", "celery", "kombu", "stripe", "uvicorn", "sqlalchemy", "redis", "py.warnings")
CHARGE_LIFE = ("charge claimed", "Stripe answered", "charge attempt finished")


@pytest.fixture
def cycle(app_env, sandbox, smtp_server, redis_client, session_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    yield from run_cycle(app_env, tmp_path, sandbox, smtp_server, session_factory)


def leaks(line: str, secrets: dict[str, set[str]]) -> list[str]:
    found = [kind for kind, values in secrets.items() if any(v in line for v in values)]
    found += [kind for kind, shape in SHAPES.items() if shape.search(line)]
    return found


def json_lines(name: str, text: str) -> list[dict]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{name}:{number} is not JSON: {line[:300]}")
        assert isinstance(entry, dict) and {"timestamp", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def test_every_log_line_is_json_with_charge_ids_and_no_secret(cycle, caplog):
    files = {"worker": cycle.worker.log(), "web": cycle.web_log.read_text(), "this process": cycle.own_log.read_text()}
    entries = {name: json_lines(name, text) for name, text in files.items()}
    assert all(entries.values()), {name: len(e) for name, e in entries.items()}
    assert {kind for kind, values in cycle.secrets.items() if values} == {
        "API key", "webhook secret", "client secret", "setup token", "recovery token", "recovery link"}

    # The cycle ran while the fixture was set up: its records are the setup phase's.
    captured = caplog.get_records("setup") + caplog.get_records("call")
    assert any(r.name == "httpx" for r in captured)  # capture works (the test's own client)
    problems = []
    for name, text in files.items():
        for number, line in enumerate(text.splitlines(), 1):
            if found := leaks(line, cycle.secrets):
                problems.append(f"{name}:{number} {found}: {line[:300]}")
    for record in captured:
        if record.name.startswith(PRODUCT_LOGGERS):
            raw = f"{record.getMessage()} {vars(record)!r}"
            if found := leaks(raw, cycle.secrets):
                problems.append(f"captured {record.name} {found}: {raw[:300]}")
    assert problems == []

    # The SDK's per-request lines (and, at DEBUG, whole bodies) never reach a log.
    quiet = logging.WARNING
    chatty = [f"{name}: {e['message'][:120]}" for name, es in entries.items() for e in es
              if e["logger"].startswith("stripe") and logging.getLevelName(e["level"]) < quiet]
    chatty += [r.getMessage()[:120] for r in captured if r.name.startswith("stripe") and r.levelno < quiet]
    assert chatty == []

    # Redaction did work here: this process logged the pages' URLs (httpx), tokens masked.
    assert "/recover/[redacted]" in files["this process"] and "/setup/[redacted]" in files["this process"]
    # The web app logs requests by route template.
    web = [e["message"] for e in entries["web"]]
    assert "POST /webhooks/stripe 200" in " ".join(web)

    # A charge's life, claim → Stripe → apply, carries its charge and attempt ids.
    worker = entries["worker"]
    for charge_id in cycle.charge_ids:
        lines = [e for e in worker if e.get("charge_id") == charge_id]
        messages = {e["message"] for e in lines}
        assert set(CHARGE_LIFE) <= messages, (charge_id, messages)
        assert all(e.get("attempt_id") for e in lines if e["message"] in CHARGE_LIFE)
        assert all(e.get("task_id") for e in lines if e["message"] in CHARGE_LIFE)
    assert any(e["message"] == "webhook event processed" and e.get("event_row_id") for e in worker)
    assert any(e["logger"].startswith("celery") for e in worker)  # Celery's own lines, as JSON too
