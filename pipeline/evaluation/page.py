"""The evaluation's files: a confusion-matrix PNG per variant, an accuracy-versus-cost PNG
(with variants) and one self-contained HTML page showing every figure."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

from pipeline.evaluation.metrics import ERROR
from pipeline.evaluation.results import Evaluation, VariantEvaluation
from pipeline.reporting import charts
from pipeline.reporting.html import Cell, cards, esc, img, money, page, ratio, table


def write_evaluation(evaluation: Evaluation) -> Evaluation:
    """Draw the charts, write them and the HTML page; return the evaluation with their paths."""
    images: dict[str, bytes] = {}
    for result in evaluation.results:
        s = result.scores
        columns = list(next(iter(s.confusion.values()), {}).keys()) if s.confusion else list(s.labels)
        png = charts.confusion_png(s.labels, columns, s.confusion, f"{result.name}: confusion matrix")
        _write(result.chart, png)
        images[result.name] = png
    variants_png = None
    if evaluation.has_variants:
        variants_png = charts.variants_png(
            [
                charts.VariantPoint(
                    r.name, r.accuracy, r.cost_per_1k_rows, r.frontier, r.name == evaluation.recommended
                )
                for r in evaluation.results
                if r.accuracy is not None and r.cost_per_1k_rows is not None
            ]
        )
        chart = evaluation.report.with_name(evaluation.report.name.replace(".eval.html", ".eval-variants.png"))
        _write(chart, variants_png)
        evaluation = replace(evaluation, variants_chart=chart)
    evaluation.report.parent.mkdir(parents=True, exist_ok=True)
    evaluation.report.write_text(render(evaluation, images, variants_png), encoding="utf-8")
    return evaluation


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def render(evaluation: Evaluation, images: dict[str, bytes], variants_png: bytes | None) -> str:
    e = evaluation
    which = f"a random sample of {e.rows:,} (seed {e.seed})" if e.rows < e.rows_with_gold else f"all {e.rows:,}"
    body = [
        f"<h1>Evaluation: {esc(e.job)}</h1>",
        f"<p class='sub'>{which} of the {e.rows_with_gold:,} rows with a gold label in column "
        f"<code>{esc(e.gold)}</code> ({e.rows_in_job:,} rows in the job), compared on "
        f"<code>{esc(e.field)}</code>.</p>",
    ]
    if e.stop_reason:
        body.append(
            f"<p class='warn'>The evaluation stopped early ({esc(e.stop_reason)}): rows not answered count as "
            "wrong. Rerun the same command to finish; answers already paid for are kept.</p>"
        )
    if e.has_variants:
        body += _variants_section(e, variants_png)
    for result in e.results:
        body += _result_section(e, result, images[result.name])
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body.append(f"<footer>Written by <code>pipeline eval</code> at {stamp}.</footer>")
    return page(f"Evaluation: {e.job}", body)


def _variants_section(e: Evaluation, png: bytes | None) -> list[str]:
    rows, classes = [], []
    for r in e.results:
        rows.append(
            [
                r.name,
                r.model,
                ratio(r.accuracy),
                ratio(r.scores.macro_f1),
                f"{r.scores.errors:,}",
                money(r.cost_usd),
                money(r.cost_per_1k_rows),
                money(r.cost_usd_full_run_expected),
                "yes" if r.frontier else "",
            ]
        )
        classes.append("best" if r.name == e.recommended else "")
    out = [
        "<h2>Variants</h2>",
        f"<p>Every variant answered the same {e.rows:,} rows. Recommended: <b>{esc(e.recommended or 'none')}</b> "
        f"({_rule(e)}). <i>Frontier</i>: no other variant is at least as accurate for less.</p>",
        table(
            ["variant", "model", "accuracy", "macro F1", "errors", "cost", "per 1k rows", "full run", "frontier"],
            rows,
            left=2,
            row_class=classes,
        ),
    ]
    if png is not None:
        out.append(img(png, "accuracy against cost per 1,000 rows"))
    return out


def _rule(e: Evaluation) -> str:
    if e.min_accuracy is None:
        return "the most accurate; with <code>--min-accuracy A</code>, the cheapest at least that accurate"
    if e.recommended is None:
        return f"no variant reaches accuracy {e.min_accuracy:g}"
    return f"the cheapest with accuracy of at least {e.min_accuracy:g}"


def _result_section(e: Evaluation, r: VariantEvaluation, png: bytes) -> list[str]:
    s = r.scores
    title = f"Variant {r.name} ({r.model})" if e.has_variants else f"Results ({r.model})"
    out = [
        f"<h2>{esc(title)}</h2>",
        cards(
            [
                ("accuracy", ratio(s.accuracy)),
                ("correct", f"{s.correct:,} of {s.rows:,}"),
                ("rows with errors (counted wrong)", f"{s.errors:,}"),
                ("evaluation cost", money(r.cost_usd)),
                (f"expected full run ({e.rows_in_job:,} rows)", money(r.cost_usd_full_run_expected)),
            ]
        ),
    ]
    if s.errors:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r.errors_by_status.items()))
        out.append(
            f"<p class='warn'>{s.errors:,} rows had no usable answer ({esc(kinds)}); they count as wrong "
            f"and appear in the <code>{ERROR}</code> column.</p>"
        )
    out.append("<h3>Per label</h3>")
    out.append(
        table(
            ["label", "precision", "recall", "F1", "support"],
            [
                [label, ratio(v.precision), ratio(v.recall), ratio(v.f1), f"{v.support:,}"]
                for label, v in s.per_label.items()
            ],
        )
    )
    out.append("<h3>Confusion matrix (rows: gold, columns: predicted)</h3>")
    columns = list(next(iter(s.confusion.values()), {}).keys())
    grid = []
    for gold, row in s.confusion.items():
        cells: list[Cell] = [gold]
        for predicted in columns:
            count = row[predicted]
            css = "hit" if predicted == gold and count else ("err" if predicted == ERROR and count else "")
            cells.append((f"{count:,}", css) if css else f"{count:,}")
        grid.append(cells)
    out.append(table(["gold \\ predicted", *columns], grid))
    out.append(img(png, f"confusion matrix of {r.name}"))
    if r.mistakes:
        out.append(f"<h3>Wrong answers (first {len(r.mistakes)})</h3>")
        out.append(
            table(
                ["row", "gold", "answer", "prompt"],
                [
                    [m.key, m.gold, m.predicted if m.error is None else f"{m.predicted}: {m.error}", m.prompt]
                    for m in r.mistakes
                ],
                left=4,
            )
        )
    return out
