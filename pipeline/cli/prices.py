"""``pipeline prices``: the known models' prices, for people."""

from __future__ import annotations

from pipeline.engine.pricing import ModelInfo


def format_price_table(models: list[ModelInfo]) -> str:
    """``pipeline prices``: one line per known model, prices in USD per million tokens."""
    width = max([len("model"), *(len(m.model) for m in models)])
    lines = [f"{'model':<{width}}  {'input':>8}  {'output':>8}  {'cached':>8}  {'context':>9}  source"]
    for m in models:
        context = f"{m.context_length:,}" if m.context_length else "?"
        lines.append(
            f"{m.model:<{width}}  {_price(m.input_per_million):>8}  {_price(m.output_per_million):>8}  "
            f"{_price(m.cached_input_per_million):>8}  {context:>9}  {m.source}"
        )
    lines.append(
        f"{len(models)} models; prices in USD per million tokens (input / output / cached input; "
        "? = unknown: the job's [model] keys set it)"
    )
    return "\n".join(lines)


def format_model_prices(info: ModelInfo) -> str:
    """``pipeline prices MODEL``: each price with its source, and the key that overrides it."""
    context = f"{info.context_length:,} tokens" if info.context_length else "unknown"
    lines = [f"{info.model}: prices in USD per million tokens; context window {context}"]
    for figure in info.figures:
        name = figure.name.replace("_", " ")
        if figure.value is None:
            lines.append(f"  {name:<12} {'unknown':>10}  (a job sets it with [model] {figure.key})")
        else:
            lines.append(f"  {name:<12} {figure.value:>10g}  from {figure.source}  ([model] {figure.key})")
    return "\n".join(lines)


def _price(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"
