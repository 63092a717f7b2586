"""Report charts that do not mislead, and pages that fit a phone.

- The throughput chart's last bucket is where the run ended, part-way through
  it: its rate is over the time it covers (or it is left out), never a false
  drop at the end of every run.
- The latency chart names its median and p95 lines outside the plot area, so a
  label never covers a bar.
- The report pages have no fixed width wider than a phone (375 px): a grid
  column, an image or a table must shrink or scroll inside its own box.
"""

from __future__ import annotations

import io
import re
import sqlite3

import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.reporting import charts
from pipeline.reporting.html import _CSS, page, table
from pipeline.store.journal import SCHEMA
from pipeline.store.stats import journal_summary


def journal_with_answers(times: list[float]) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO results (key, prompt_hash, status, attempts, cost_usd, latency_s, updated) "
        "VALUES (?, 'h', 'ok', 1, 0.001, 0.5, ?)",
        [(str(i), t) for i, t in enumerate(times)],
    )
    return conn


@pytest.mark.parametrize("seconds", [611, 600, 645])
def test_a_steady_run_has_no_false_drop_at_the_end(seconds: int) -> None:
    """One row a second: every bucket, the last included, reads about 60 rows/min.

    611 rows: the final row lands alone at the start of a 61st bucket (before:
    a bar of 6 rows/min at the end); 645: a last bucket a third full.
    """
    stats = journal_summary(journal_with_answers([1000.0 + i for i in range(seconds)]), None, "")
    assert all(54 <= r <= 66 for r in stats.bucket_rows), stats.bucket_rows
    assert 0.25 * stats.bucket_s <= stats.last_bucket_s < 1.25 * stats.bucket_s
    assert stats.bucket_cost[-1] == pytest.approx(0.001 * seconds)  # every row still counted


def test_cost_curve_ends_when_the_run_ends() -> None:
    from pipeline.reporting.journal_report import _cost_curve

    stats = journal_summary(journal_with_answers([1000.0 + i for i in range(611)]), None, "")
    x, y = _cost_curve(stats)
    assert x[-1] == pytest.approx(610 / 60) and y[-1] == pytest.approx(0.611)


def _axes_of(draw: object, *args: object) -> Axes:
    """The chart's axes: draw it with Figure.savefig captured, so its artists can be inspected."""
    captured: list[Figure] = []
    original = charts._png

    def keep(fig: Figure) -> bytes:
        captured.append(fig)
        return original(fig)

    charts._png = keep
    try:
        png = draw(*args)  # type: ignore[operator]
    finally:
        charts._png = original
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
    return captured[0].axes[0]


def test_throughput_draws_the_partial_last_bucket_as_narrow_as_it_is() -> None:
    minutes = [0.0, 0.5, 1.0, 1.5]
    ax = _axes_of(charts.throughput_png, minutes, [60, 60, 60, 58], 30.0, 12.0)
    bars = ax.patches
    assert [b.get_height() for b in bars] == [60, 60, 60, 58]
    assert bars[-1].get_width() == pytest.approx(bars[0].get_width() * 12 / 30)
    assert bars[-1].get_hatch() == "//" and bars[0].get_hatch() is None
    assert ax.get_legend() is not None


def test_throughput_of_a_folded_last_bucket_is_a_plain_bar() -> None:
    ax = _axes_of(charts.throughput_png, [0.0, 0.5, 1.0], [60, 60, 61], 30.0, 33.0)
    assert ax.patches[-1].get_hatch() is None and ax.get_legend() is None


def test_latency_labels_sit_outside_the_plot_area() -> None:
    """No text is drawn inside the axes, where bars are; the lines are named in a legend above them."""
    ax = _axes_of(charts.latency_png, [0.1 * (i % 20) + 0.05 for i in range(400)] + [5.0] * 30)
    assert len(ax.texts) == 0
    fig = ax.figure
    assert isinstance(fig, Figure)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text().split()[0] for t in legend.get_texts()] == ["median", "p95"]
    plot_area = ax.get_window_extent(renderer)
    assert legend.get_window_extent(renderer).y0 >= plot_area.y1 - 1


def test_latency_chart_still_draws_from_a_png() -> None:
    png = charts.latency_png([0.2, 0.3, 0.4])
    assert png.startswith(b"\x89PNG") and len(io.BytesIO(png).getvalue()) > 1000


PHONE_PX = 375


def test_page_css_has_nothing_wider_than_a_phone() -> None:
    """No width, min-width or grid column minimum is wider than 375 px (a max-width may be)."""
    lengths = re.findall(r"(?<![-\w])(?:width|min-width|flex-basis)\s*:\s*([^;}]+)", _CSS)
    lengths += re.findall(r"minmax\(\s*((?:min\([^)]*\))|[^,]+),", _CSS)
    assert lengths, "the CSS no longer sets widths: update this test"
    for value in lengths:
        if re.fullmatch(r"min\([^,]+,\s*100%\)", value.strip()):
            continue  # min(460px, 100%) shrinks with the screen
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(px|em)\b", value):
            px = float(number) * (16 if unit == "em" else 1)
            assert px <= PHONE_PX - 40, f"{value!r} in the report CSS is wider than a phone"
    assert "overflow-wrap: anywhere" in _CSS  # long paths and prompts break instead of widening the page


def test_tables_scroll_inside_their_own_box() -> None:
    html = page("t", [table(["a"] * 12, [["x" * 30] * 12])])
    assert re.search(r"<div class='scroll'><table>", html)
    assert re.search(r"\.scroll\s*\{[^}]*overflow-x:\s*auto", html)


def test_variant_names_at_the_same_place_do_not_overlap() -> None:
    """Three variants with the same accuracy and nearly the same cost: their names are stacked, each readable."""
    points = [
        charts.VariantPoint("ministral-8b-with-a-long-name", 0.767, 0.00200, True, True),
        charts.VariantPoint("ministral-3b", 0.767, 0.00200, True, False),
        charts.VariantPoint("3b-strict", 0.767, 0.00221, False, False),
    ]
    ax = _axes_of(charts.variants_png, points)
    fig = ax.figure
    assert isinstance(fig, Figure)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 3
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two variant names are drawn over each other"
