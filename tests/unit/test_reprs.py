"""How results look in a notebook: a short repr() line and a small HTML table, never a 900-character dump."""

from __future__ import annotations

from dataclasses import fields

import pyarrow as pa

from pipeline import Estimate, ExitCode, Result, RunSummary

MAX_REPR = 200


def summary(**changes: object) -> RunSummary:
    base: dict[str, object] = {
        "job": "reviews <b>demo</b>",
        "model": "local/smollm2-135m-instruct",
        "exit_code": ExitCode.STOPPED,
        "stop_reason": "budget_usd reached",
        "rows_ok": 7,
        "rows_failed": 2,
        "rows_invalid": 1,
        "rows_skipped": 0,
        "rows_resumed": 3,
        "requests": 11,
        "prompt_tokens": 419,
        "completion_tokens": 141,
        "cost_usd": 0.0123,
        "cost_usd_estimated": 0.012,
        "cost_estimated": False,
        "job_spent_usd": 0.05,
        "price_source": "built-in table",
        "wall_s": 9.34,
        "requests_per_minute": 64.2,
        "errors": {"HTTP 400": 2},
        "output": "data/out/x.parquet",
    }
    base.update(changes)
    return RunSummary(**base)  # type: ignore[arg-type]


def estimate() -> Estimate:
    return Estimate(
        rows=10,
        rows_done=4,
        rows_to_send=6,
        input_tokens=1234,
        output_tokens_max=96,
        output_tokens_expected=40,
        output_tokens_interval=[30, 50],
        output_tokens_basis="max_tokens",
        cost_usd_min=0.0001,
        cost_usd_expected=0.0002,
        cost_usd_interval=[0.0001, 0.0003],
        cost_usd_max=0.0004,
        duration_s_min=0.6,
        requests_per_minute=600,
        model="mistralai/ministral-8b",
        tokenizer="mistral-common Tekken (v3)",
        tokens_exact=True,
        price_source="built-in table",
        input_price_per_million=0.1,
        output_price_per_million=0.1,
        context_length=131072,
        skipped={},
        rows_per_s=None,
    )


def test_run_summary_repr_is_one_short_line_with_the_key_figures() -> None:
    text = repr(summary())
    assert "\n" not in text and len(text) <= MAX_REPR
    assert text.startswith("RunSummary(job='reviews <b>demo</b>', exit_code=3, rows_ok=7, rows_failed=3,")
    assert "cost_usd=0.0123" in text and len(str(summary().to_dict())) > 3 * len(text)


def test_run_summary_html_is_a_small_escaped_table() -> None:
    page = summary()._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") == len(summary().figures())
    assert "reviews &lt;b&gt;demo&lt;/b&gt;" in page and "<b>demo</b>" not in page
    assert "budget_usd reached" in page and "$0.012300" in page and "HTTP 400 x2" in page


def test_estimate_repr_and_html() -> None:
    est = estimate()
    text = repr(est)
    assert "\n" not in text and len(text) <= MAX_REPR
    assert "rows_to_send=6" in text and "cost_usd_expected=$0.000200" in text
    page = est._repr_html_()
    assert "6 of 10 (4 already done)" in page and "1,234" in page and "at least 1 s" in page


def test_result_repr_and_html_preview_the_rows() -> None:
    table = pa.table({"id": list(range(8)), "completion": ["x" * 500] + ["short"] * 7})
    result = Result(table, summary(), ExitCode.STOPPED)
    text = repr(result)
    assert text.startswith("Result(rows=8, columns=2, summary=RunSummary(") and "x" * 100 not in text
    page = result._repr_html_()
    assert page.count("<td>short</td>") == 4  # five rows shown, the first truncated
    assert "x" * 59 + "…" in page and "x" * 61 not in page
    assert "3 more rows" in page


def test_every_summary_field_is_still_in_to_dict() -> None:
    """The short repr hides nothing: to_dict (and --json) still carry every field."""
    assert set(summary().to_dict()) == {f.name for f in fields(RunSummary)}
