"""Logging for the long-running processes: one JSON object per line, secrets masked on the way out.

:func:`configure` is called once per process by the CLI (``billing web``, ``worker``, ``beat`` and the
interactive commands). ``BILLING_LOG_FORMAT`` chooses ``json`` (the default for web, worker and beat:
what a log shipper reads) or ``text`` (the default for interactive commands: what a person reads).

A JSON line holds ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, every field passed
with ``extra=`` (``charge_id``, ``attempt_id``, ``subscription_id``, ``event_id``…), and ``exception``
when there is one.

:class:`RedactingFormatter` sits on the handler, so it sees every line whichever logger it comes from
(ours, Celery's, uvicorn's, a library's). It is defence in depth: our own code never logs a secret, and
stripe-python's request and response logging is held at WARNING in :mod:`billing.stripe_gateway`.
What it masks: Stripe secret and restricted keys (``sk_…``, ``rk_…``), webhook signing secrets
(``whsec_…``), the JSON API's own keys (``bk_…``), PaymentIntent and SetupIntent client secrets
(``pi_…_secret_…``, ``seti_…_secret_…``), the tokens in customer page paths (``/recover/<token>``,
``/setup/<token>``) and passwords in URLs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from billing.settings import ConfigError

FORMATS = ("json", "text")
FORMAT_VARIABLE = "BILLING_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

REDACTED = "[redacted]"

# Order matters: a client secret is masked before its ``pi_…`` prefix could be taken for anything else.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b((?:pi|seti)_[A-Za-z0-9]+)_secret_[A-Za-z0-9_]+"), rf"\1_secret_{REDACTED}"),
    (re.compile(r"\b(sk|rk)_[A-Za-z0-9_]+"), rf"\1_{REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9_]+"), f"whsec_{REDACTED}"),
    (re.compile(r"\bbk_[A-Za-z0-9_-]+"), f"bk_{REDACTED}"),  # our JSON API's keys (billing.apikeys)
    # Route templates (``/recover/{token}``) stay readable; anything else in that place is a token.
    (re.compile(r"/(recover|setup)/(?!\{)[^\s/?#\"'<>\\]+"), rf"/\1/{REDACTED}"),
    (re.compile(r"(://[^:/\s@\"']+:)[^@\s/\"']+@"), rf"\1{REDACTED}@"),
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                                      "taskName"}


def redact(text: str) -> str:
    """``text`` with every secret-looking part masked."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


class RedactingFormatter(logging.Formatter):
    """Masks secrets in what ``inner`` wrote: message, every ``extra=`` field, traceback, all of it.

    Redaction works on the finished line rather than on the record, because a record is shared by
    every handler it passes through and is not ours to change.
    """

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (newlines inside values are escaped by JSON itself)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve_format(default: str) -> str:
    value = (os.environ.get(FORMAT_VARIABLE) or default).strip().lower()
    if value not in FORMATS:
        raise ConfigError(f"{FORMAT_VARIABLE} is invalid: must be json or text")
    return value


def build_handler(fmt: str, stream=None, text_format: str = TEXT_FORMAT) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(RedactingFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format)))
    handler.set_name("billing")
    return handler


def configure(*, level: int | str = logging.INFO, default_format: str = "json", stream=None,
              text_format: str = TEXT_FORMAT) -> str:
    """Route every logger through one handler on the root logger; returns the format in use.

    Idempotent: called again (Celery's ``setup_logging`` signal, a second command) it replaces the
    handler instead of adding another, so no line is written twice.
    """
    fmt = resolve_format(default_format)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(build_handler(fmt, stream, text_format))
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Library loggers that configure themselves must not bypass the handler above.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    logging.captureWarnings(True)
    return fmt
