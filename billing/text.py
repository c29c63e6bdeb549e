"""Text typed by customers, merchants and staff: the characters refused before it reaches a row.

A name or an email address travels into email headers, HTML, CSV files, log lines and PostgreSQL.
Control characters break each of those differently: NUL is refused by PostgreSQL's ``text`` type
(the request would fail as a 500), CR and LF split an email header or a log line, and the Unicode
line and paragraph separators (U+2028, U+2029) end a line in JavaScript and in many log viewers. So
they are refused at the edge, with a message naming the field, rather than stripped in one place
and forgotten in another.

"Control character" means Unicode category ``Cc`` (C0 controls U+0000–U+001F, DEL U+007F and the C1
controls U+0080–U+009F), U+2028 and U+2029, and the bidirectional embedding, override and isolate
controls (U+202A–U+202E, U+2066–U+2069), which reorder what staff read next to a name ("Trojan
Source", CVE-2021-42574). Zero-width joiners, which Persian and Indic names need, are allowed.
"""

from __future__ import annotations

import unicodedata

LINE_SEPARATORS = frozenset({"\u2028", "\u2029"})
BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))
# Where multi-line text is legitimate (a written reason in the finance console), these may stay.
MULTILINE_ALLOWED = "\t\r\n"


def is_control(char: str) -> bool:
    return char in LINE_SEPARATORS or char in BIDI_CONTROLS or unicodedata.category(char) == "Cc"


def has_control_characters(value: str, *, allow: str = "") -> bool:
    """Whether ``value`` holds a control character other than those in ``allow``."""
    return any(is_control(c) and c not in allow for c in value)


CONTROL_MESSAGE = "must not contain control characters (NUL, CR, LF, tab, …)"
