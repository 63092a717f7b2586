"""A small HTML kit: one self-contained page, PNGs embedded as base64.

Every piece of text that comes from data (labels, prompts, errors, paths) goes
through :func:`esc`. Pages fit a phone (375 px) without sideways scrolling:
no fixed width is wider, the chart grid drops to one column, long words
break, and wide tables scroll inside their own box; the page loads nothing from anywhere, so it opens offline
and can be mailed or attached to a ticket as one file.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a202c;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; overflow-wrap: anywhere; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #e2e8f0; padding-bottom: .2em; }
.sub { color: #4a5568; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.card { border: 1px solid #e2e8f0; border-radius: 8px; padding: .6em 1em; min-width: 9em; }
.card .v { font-size: 1.5em; font-weight: 600; }
.card .k { color: #4a5568; font-size: .85em; }
.warn { background: #fffaf0; border: 1px solid #f6ad55; border-radius: 6px; padding: .5em .9em; }
.scroll { overflow-x: auto; max-width: 100%; margin: .6em 0; }
table { border-collapse: collapse; overflow-wrap: normal; }
th, td { border: 1px solid #e2e8f0; padding: .3em .7em; text-align: right; }
th { background: #f7fafc; }
td.l, th.l { text-align: left; }
tr.best td { background: #f0fff4; font-weight: 600; }
td.hit { background: #ebf8ff; font-weight: 600; }
td.err { color: #c53030; }
img { max-width: 100%; border: 1px solid #edf2f7; border-radius: 6px; margin: .4em 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(460px, 100%), 1fr)); gap: 1em; }
.grid > div { min-width: 0; }
code { background: #f7fafc; padding: 0 .25em; border-radius: 3px; }
footer { color: #718096; font-size: .85em; margin-top: 3em; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: Iterable[str]) -> str:
    """A complete HTML document."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def img(png: bytes, alt: str) -> str:
    """A PNG embedded in the page."""
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Big figures in boxes: (label, value)."""
    boxes = "".join(
        f"<div class='card'><div class='v'>{esc(v)}</div><div class='k'>{esc(k)}</div></div>" for k, v in items
    )
    return f"<div class='cards'>{boxes}</div>"


# A table cell: its text, or (text, CSS class) to mark it.
Cell = str | tuple[str, str]


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], left: int = 1, row_class: Sequence[str] = ()) -> str:
    """A table whose first ``left`` columns are left-aligned; cells are escaped here.

    A cell may be given as ``(text, css_class)`` to mark it.
    """
    head = "".join(f"<th class='l'>{esc(h)}</th>" if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            text, css = cell if isinstance(cell, tuple) else (cell, "")
            classes = " ".join(c for c in ("l" if i < left else "", css) if c)
            cells.append(f"<td class='{classes}'>{esc(text)}</td>" if classes else f"<td>{esc(text)}</td>")
        cls = row_class[n] if n < len(row_class) and row_class[n] else ""
        body.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>" if cls else "<tr>" + "".join(cells) + "</tr>")
    # A wide table scrolls inside its own box: the page itself never scrolls sideways on a phone.
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def money(value: float | None) -> str:
    """Dollars with three significant digits below a dollar (``$0.0000820``), cents above."""
    if value is None:
        return "unknown"
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    digits = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{digits}f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
