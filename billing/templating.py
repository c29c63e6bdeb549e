"""The product's one Jinja environment: finance console, customer pages and emails.

Whether a template is HTML-escaped follows from its name, never from the caller: every template is
escaped except the plain-text parts of emails (``*.txt.j2``). Starlette's ``Jinja2Templates`` left to
itself escapes only ``.html/.htm/.xml`` names, and ours end in ``.html.j2``, so the console is handed
this environment too (https://jinja.palletsprojects.com/en/stable/api/#autoescaping).

Templates are named by area: ``email/…``, ``pages/…`` (customer pages, ``billing/templates/pages``),
``finance/…`` (the console, ``billing/web/templates/finance``) and ``docs/…`` (``/docs``, when on).
``StrictUndefined``: a value a template needs and nobody passed is an error at render time, not an
empty space in a customer's email.

What a template prints unescaped (``Markup``) comes only from:

* ``tojson`` — Jinja's filter escapes ``<``, ``>``, ``&`` and ``'``, so the JSON data block of the
  customer pages cannot close its ``<script type="application/json">`` element;
* the SVG charts of :mod:`billing.web.charts`, which escape every text taken from data.

No template uses ``|safe``; ``tests/integration/test_escaping.py`` renders each one with markup in
every field a customer or an operator can type.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, PrefixLoader, StrictUndefined, Template

HERE = Path(__file__).resolve().parent
TEMPLATE_DIRS: dict[str, Path] = {
    "email": HERE / "templates" / "email",
    "pages": HERE / "templates" / "pages",
    "finance": HERE / "web" / "templates" / "finance",
    "docs": HERE / "templates" / "docs",
}
TEXT_SUFFIXES = (".txt.j2", ".txt")


def autoescape(name: str | None) -> bool:
    """Escape unless the template is a plain-text email part; strings too (see :func:`text_from_string`)."""
    return name is None or not name.endswith(TEXT_SUFFIXES)


def _money(amount: int, currency: str) -> str:
    from billing.notifications import format_amount  # imported late: notifications renders through here

    return format_amount(amount, currency)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "—"


def _build() -> Environment:
    environment = Environment(
        loader=PrefixLoader({area: FileSystemLoader(str(path)) for area, path in TEMPLATE_DIRS.items()}),
        autoescape=autoescape,  # noqa: S701 -- a function: on for every name but *.txt.j2
        undefined=StrictUndefined,
        # Whitespace as the text emails want it; HTML does not mind.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["money"] = _money
    environment.filters["when"] = _when
    return environment


env = _build()


def template_names() -> list[str]:
    """Every template of every area (``email/payment_failed.html.j2``…), for tests that must miss none."""
    return sorted(env.list_templates())


def render(name: str, values: Mapping[str, Any]) -> str:
    return env.get_template(name).render(values)


@functools.lru_cache(maxsize=64)
def text_from_string(source: str) -> Template:
    """A template for plain text kept in code (email subjects): explicitly unescaped, since a subject
    is a header, not HTML (``&`` must stay ``&``). Header safety (no CR/LF) is the mail builder's job."""
    return env.from_string("{% autoescape false %}" + source + "{% endautoescape %}")
