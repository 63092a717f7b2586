"""PNG charts with matplotlib, drawn off-screen.

Figures are built with :class:`matplotlib.figure.Figure` directly rather than
through ``pyplot``: no global state, no display and no GUI backend, so they
can be drawn from any thread and on a server without a screen. Every function
returns the PNG's bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

_DPI = 100
_ACCENT = "#2b6cb0"
_GOOD = "#2f855a"
_BAD = "#c53030"
_MUTED = "#a0aec0"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#4a5568")
    ax.set_xticks([])
    ax.set_yticks([])


def _dollars(value: float, _pos: object = None) -> str:
    """Axis labels in dollars with enough digits for fractions of a cent, without 1e-5 offsets."""
    if value == 0:
        return "$0"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.3g}" if abs(value) >= 1e-4 else f"${value:.2e}"


def confusion_png(
    labels: Sequence[str], columns: Sequence[str], confusion: Mapping[str, Mapping[str, int]], title: str
) -> bytes:
    """A confusion matrix as a heat map: gold labels down, predicted labels across, counts in cells."""
    grid = [[confusion[g].get(p, 0) for p in columns] for g in labels]
    size = max(4.0, 0.9 * len(columns) + 2.5)
    fig = Figure(figsize=(size, max(3.2, 0.7 * len(labels) + 2.0)))
    ax = fig.subplots()
    top = max((max(row) for row in grid if row), default=0) or 1
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, count in enumerate(row):
            color = "white" if count > top / 2 else "#1a202c"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=11)
    return _png(fig)


@dataclass(frozen=True)
class VariantPoint:
    """One variant on the accuracy-versus-cost chart."""

    name: str
    accuracy: float
    cost_per_1k_rows: float
    frontier: bool
    recommended: bool


def variants_png(points: Sequence[VariantPoint]) -> bytes:
    """Accuracy against cost per 1,000 rows; the cheapest-for-its-accuracy frontier is drawn as a line."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    if not points:
        _empty(ax, "no variant has both an accuracy and a cost")
        return _png(fig)
    front = sorted((p for p in points if p.frontier), key=lambda p: p.cost_per_1k_rows)
    if len(front) > 1:
        ax.plot(
            [p.cost_per_1k_rows for p in front],
            [p.accuracy for p in front],
            color=_GOOD,
            linestyle="--",
            linewidth=1,
            label="best accuracy for the cost",
        )
    # Zoomed to the accuracies shown (variants often differ by a few points), never past 0..1.
    low = min(p.accuracy for p in points)
    top = max(p.accuracy for p in points)
    y_low, y_high = max(0.0, low - 0.1) - 0.02, min(1.0, top + 0.1) + 0.02
    ax.set_ylim(y_low, y_high)
    high = max(p.cost_per_1k_rows for p in points)
    x_high = high * 1.35 if high > 0 else 1
    ax.set_xlim(0, x_high)
    placed: list[tuple[float, float]] = []
    for p in points:
        color = _GOOD if p.frontier else _MUTED
        ax.scatter(
            [p.cost_per_1k_rows],
            [p.accuracy],
            s=160 if p.recommended else 70,
            color=color,
            edgecolors="#1a202c" if p.recommended else "none",
            linewidths=2,
            zorder=3,
        )
        suffix = "  (recommended)" if p.recommended else ""
        # Variants at (nearly) the same place get their names stacked, not printed over each other.
        at = (p.cost_per_1k_rows / x_high, (p.accuracy - y_low) / (y_high - y_low))
        crowd = sum(1 for q in placed if abs(q[0] - at[0]) < 0.3 and abs(q[1] - at[1]) < 0.06)
        placed.append(at)
        ax.annotate(
            f"{p.name}{suffix}",
            (p.cost_per_1k_rows, p.accuracy),
            textcoords="offset points",
            xytext=(11, -13 * crowd),
            va="center",
        )
    ax.xaxis.set_major_formatter(FuncFormatter(_dollars))
    ax.set_xlabel("cost per 1,000 rows")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy against cost: up and to the left is better")
    if len(front) > 1:
        ax.legend(loc="lower right")
    return _png(fig)


def throughput_png(
    minutes: Sequence[float], rows: Sequence[int], bucket_s: float | None = None, last_bucket_s: float | None = None
) -> bytes:
    """Rows finished per minute, against minutes since the first row.

    ``rows`` are rates. The run ends part-way through its last bucket, whose
    rate is over the ``last_bucket_s`` seconds it covers (of ``bucket_s``):
    that bar is drawn as wide as that time, hatched when it is a part.
    """
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    if not rows:
        _empty(ax, "no rows answered yet")
    else:
        width = (minutes[1] - minutes[0]) if len(minutes) > 1 else 1.0
        share = last_bucket_s / bucket_s if bucket_s and last_bucket_s is not None and len(rows) > 1 else 1.0
        ax.bar(minutes[:-1], rows[:-1], width=width * 0.9, align="edge", color=_ACCENT)
        partial = share < 1.0
        label = "the run's last part-bucket: rows per minute over the time it covers" if partial else None
        ax.bar(
            minutes[-1:],
            rows[-1:],
            width=width * share * 0.9,
            align="edge",
            color=_ACCENT,
            alpha=0.45 if partial else 1.0,
            hatch="//" if partial else None,
            edgecolor=_ACCENT,
            label=label,
        )
        if partial:
            ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, fontsize=8)
        ax.set_xlabel("minutes since the first row")
        ax.set_ylabel("rows per minute")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("Throughput", loc="right")
    return _png(fig)


def latency_png(latencies: Sequence[float]) -> bytes:
    """A histogram of request latency, with the median and 95th percentile marked.

    The two lines are named in a legend above the plot area, never on it, so a
    label cannot cover a bar whatever the distribution's shape.
    """
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    if not latencies:
        _empty(ax, "no latencies recorded")
    else:
        ordered = sorted(latencies)
        ax.hist(ordered, bins=min(40, max(5, len(ordered) // 5)), color=_ACCENT)
        for q, name, color in ((0.5, "median", "#1a202c"), (0.95, "p95", _BAD)):
            value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
            ax.axvline(value, color=color, linestyle="--", linewidth=1, label=f"{name} {value:.2f} s")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False, fontsize=9)
        ax.set_xlabel("seconds (final attempt)")
        ax.set_ylabel("rows")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("Latency", loc="right")
    return _png(fig)


def cumulative_cost_png(minutes: Sequence[float], cost: Sequence[float]) -> bytes:
    """Money spent by the end of each minute mark, from zero at the first row."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    if not cost or not max(cost):
        _empty(ax, "no cost recorded (nothing paid, a free model, or no price known)")
    else:
        ax.plot(minutes, cost, color=_ACCENT, marker="." if len(cost) < 30 else None)
        ax.fill_between(minutes, cost, alpha=0.15, color=_ACCENT)
        ax.yaxis.set_major_formatter(FuncFormatter(_dollars))
        ax.set_xlabel("minutes since the first row")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax.set_title("Cumulative cost")
    return _png(fig)


def bars_png(counts: Mapping[str, int], title: str, empty: str, color: str = _ACCENT) -> bytes:
    """Horizontal bars, one per category, in the mapping's order (top to bottom)."""
    fig = Figure(figsize=(7.5, max(3.6, 0.45 * len(counts) + 1.4)))
    ax = fig.subplots()
    if not counts:
        _empty(ax, empty)
    else:
        names = list(counts)[::-1]
        values = [counts[n] for n in names]
        ax.barh(names, values, color=color)
        for y, v in enumerate(values):
            ax.annotate(f"{v:,}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
        ax.set_xlim(0, max(values) * 1.15 or 1)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return _png(fig)


ERROR_COLOR = _BAD
