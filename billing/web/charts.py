"""Small charts as server-rendered SVG: no script, no CDN, readable without colour (every bar is labelled).

Each function returns ``Markup`` for a Jinja template; every text that came from data is escaped.
"""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup, escape

OUTCOME_COLOURS = {"recovered": "#2f7d4f", "waiting": "#c98a1b", "lost": "#b3403a"}


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    # Every data-derived text in body was escaped where it was formatted.
    svg = (f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>')
    return Markup(svg)  # noqa: S704


def recovery_rate(weekly: list[tuple[datetime, int, int]]) -> Markup:
    """Per week: failed charges (grey bar), of which recovered (green), and the rate above."""
    width, height, top, bottom, left = 720, 220, 28, 34, 8
    n = max(len(weekly), 1)
    slot = (width - left * 2) / n
    peak = max((f for _, f, _ in weekly), default=0) or 1
    scale = (height - top - bottom) / peak
    body = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - left}" y2="{height - bottom}" class="axis"/>']
    for i, (week, failed, recovered) in enumerate(weekly):
        x = left + i * slot + slot * 0.15
        w = slot * 0.7
        base = height - bottom
        body.append(f'<rect x="{x:.1f}" y="{base - failed * scale:.1f}" width="{w:.1f}" '
                    f'height="{failed * scale:.1f}" fill="#c9ced6"><title>{failed} failed</title></rect>')
        body.append(f'<rect x="{x:.1f}" y="{base - recovered * scale:.1f}" width="{w:.1f}" '
                    f'height="{recovered * scale:.1f}" fill="{OUTCOME_COLOURS["recovered"]}">'
                    f'<title>{recovered} recovered</title></rect>')
        rate = f"{recovered / failed:.0%}" if failed else "–"
        body.append(f'<text x="{x + w / 2:.1f}" y="{base - failed * scale - 6:.1f}" class="value">{rate}</text>')
        body.append(f'<text x="{x + w / 2:.1f}" y="{height - 14}" class="tick">{week:%d %b}</text>')
    return _svg(width, height, body, "Recovery rate per week: recovered divided by failed")


def outcome_bars(rows: list[tuple[str, dict[str, int]]], *, limit: int = 10, label: str = "") -> Markup:
    """One horizontal bar per key, split into recovered / waiting / lost, with the count at the end."""
    rows = rows[:limit]
    row_h, left, width = 26, 170, 720
    height = max(len(rows), 1) * row_h + 30
    peak = max((sum(v.values()) for _, v in rows), default=0) or 1
    scale = (width - left - 60) / peak
    body = []
    for i, (key, outcomes) in enumerate(rows):
        y = 8 + i * row_h
        body.append(f'<text x="{left - 8}" y="{y + 15}" class="key">{escape(key)}</text>')
        x = float(left)
        for name in ("recovered", "waiting", "lost"):
            value = outcomes.get(name, 0)
            if value:
                body.append(f'<rect x="{x:.1f}" y="{y}" width="{value * scale:.1f}" height="{row_h - 8}" '
                            f'fill="{OUTCOME_COLOURS[name]}"><title>{escape(key)}: {value} {name}</title></rect>')
                x += value * scale
        total = sum(outcomes.values())
        rate = outcomes.get("recovered", 0) / total if total else 0
        body.append(f'<text x="{x + 6:.1f}" y="{y + 15}" class="count">{total} · {rate:.0%}</text>')
    legend_y = height - 8
    lx = left
    for name, colour in OUTCOME_COLOURS.items():
        body.append(f'<rect x="{lx}" y="{legend_y - 10}" width="10" height="10" fill="{colour}"/>'
                    f'<text x="{lx + 14}" y="{legend_y}" class="legend">{name}</text>')
        lx += 100
    return _svg(width, height, body, label)
