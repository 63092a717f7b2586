"""``pipeline prices``: the known models' prices, for people."""

from __future__ import annotations

from pipeline.engine.pricing import ModelInfo


def format_price_table(models: list[ModelInfo]) -> str:
    """``pipeline prices``: one line per known model, prices in USD per million tokens."""
    width = max([len("model"), *(len(m.model) for m in models)])
    lines = [f"{'model':<{width}}  {'input':>8}  {'output':>8}  {'context':>9}  source"]
    for m in models:
        context = f"{m.context_length:,}" if m.context_length else "?"
        lines.append(
            f"{m.model:<{width}}  {_price(m.input_per_million):>8}  {_price(m.output_per_million):>8}  "
            f"{context:>9}  {m.source}"
        )
    lines.append(f"{len(models)} models; prices in USD per million tokens (input / output)")
    return "\n".join(lines)


def _price(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"
