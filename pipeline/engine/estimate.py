"""Dry runs: what a job would send and cost, offline, without a key.

Every row is read and rendered, and its whole chat request is counted with
the model's own tokenizer where we have it (Mistral models: exact), in
batches. Expected output tokens come from rows already answered (for example
by ``--sample N``) when there are any; otherwise half of ``max_tokens`` is
assumed, and the report says so.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.job import AUTO
from pipeline.engine.admission import Admission
from pipeline.engine.caching import CachedEstimate, SharedPrefixes, cache_rule
from pipeline.engine.expectations import TokenFigures
from pipeline.engine.lanes import LaneTokens, cheapest, price_lanes
from pipeline.engine.limits.adaptive import START_RPM
from pipeline.engine.limits.limiter import estimated_duration_s
from pipeline.engine.plan import Plan
from pipeline.engine.reports import Estimate
from pipeline.engine.selection import RowSelector
from pipeline.store.journal import Journal, read_only

if TYPE_CHECKING:
    from pipeline.store.batches import BatchStore


def dry_run(plan: Plan) -> Estimate:
    """Count what a run would send now: rows the journal already has are left out.

    Admission without the writes: the same selection, context-window check and
    (in batch mode) rows held in pending batches as a run, every prompt counted.
    """
    started = time.perf_counter()
    rows = empty = too_long = input_tokens = done = to_send = 0
    prefixes = SharedPrefixes()
    with _journal_if_any(plan.journal_path) as journal:
        waiting = _batch_store(journal)
        admission = Admission(
            plan,
            RowSelector(journal.seen if journal is not None else None),
            count_all=True,
            # Batch mode: rows waiting in a provider batch are paid for already, not to send.
            hold=waiting.pending_keys if waiting is not None else None,
        )
        sample = journal.completion_token_sample() if journal is not None else []
        for batch, keys, rendered in plan.batches():
            admitted = admission.admit_now(keys, rendered, rows)
            rows += batch.num_rows
            done += admitted.done
            empty += admitted.blank
            too_long += admitted.too_long
            to_send += len(admitted.todo)
            input_tokens += sum(admitted.tokens)
            todo = admitted.todo
            prefixes.add(
                [rendered.systems[i] for i in todo] if rendered.systems is not None else [None] * len(todo),
                [rendered.users[i] for i in todo],
            )
    elapsed = time.perf_counter() - started
    caching = _caching(plan, prefixes)
    report = _figures(plan, rows, to_send, input_tokens, sample, caching.cached_tokens)
    report.update(_cache_report(plan, caching))
    report["rows_done"] = done
    report["skipped"] = {"empty_prompt": empty, "over_context": too_long, "total": empty + too_long}
    report["rows_per_s"] = round(rows / elapsed) if elapsed > 0 else None
    _lanes(plan, report)
    if plan.job.model.mode == "batch":
        _batch_prices(plan, report)
    return Estimate(**report)


def _batch_prices(plan: Plan, report: dict[str, Any]) -> None:
    """Batch mode: cost at the batch discount, beside what realtime mode would cost; no rate limits apply."""
    discount = plan.job.model.batch_discount
    report["realtime_cost_usd_expected"] = report["cost_usd_expected"]
    report["realtime_cost_usd_max"] = report["cost_usd_max"]
    for key in ("cost_usd_min", "cost_usd_expected", "cost_usd_max"):
        report[key] = _discounted(report[key], discount)
    report["cost_usd_interval"] = [_discounted(v, discount) for v in report["cost_usd_interval"]]
    report["mode"] = "batch"
    report["batch_discount"] = discount
    report["duration_s_min"] = 0.0


def _discounted(value: float | None, discount: float) -> float | None:
    return None if value is None else round(value * discount, 10)


def _batch_store(journal: Journal | None) -> BatchStore | None:
    if journal is None:
        return None
    from pipeline.store.batches import BatchStore

    store = BatchStore(journal)
    return store if store.has_tables() else None


@contextlib.contextmanager
def _journal_if_any(journal_path: Path) -> Iterator[Journal | None]:
    """The job's journal, read-only, when a run has made one."""
    if not journal_path.exists():
        yield None
        return
    with read_only(journal_path) as journal:
        yield journal


def _caching(plan: Plan, prefixes: SharedPrefixes) -> CachedEstimate:
    """What the prompt cache is expected to serve: nothing in batch mode (no warm-up there)."""
    rule = cache_rule(plan.model_name, plan.provider.name)
    estimate = prefixes.estimate(plan.counter, rule)
    if plan.job.model.mode == "batch":
        return CachedEstimate(0, 0, estimate.prefix_tokens, "batch mode: no cache discount assumed")
    return estimate


def _cache_report(plan: Plan, caching: CachedEstimate) -> dict[str, Any]:
    info = plan.info
    saved = None
    if info.input_per_million is not None:
        saved = round(caching.cached_tokens * (info.input_per_million - info.cached_price) / 1_000_000, 10)
    return {
        "cached_tokens_expected": caching.cached_tokens,
        "shared_prefix_tokens": caching.prefix_tokens,
        "shared_prefixes": caching.groups,
        "cache_rule": caching.rule,
        "cache_saved_usd_expected": saved,
        "cached_input_price_per_million": info.cached_input_per_million,
        "cache_write_price_per_million": info.cache_write_per_million,
        "missing_prices": [
            f"{f.name.replace('_', ' ')} price: set [model] {f.key}"
            for f in info.missing()
            if f.name in ("input", "output") or (f.name == "cached_input" and caching.cached_tokens)
        ],
    }


def _lanes(plan: Plan, report: dict[str, Any]) -> None:
    """The job priced in each lane the provider offers, and the cheapest."""
    tokens = LaneTokens(
        report["input_tokens"],
        report["cached_tokens_expected"],
        report["output_tokens_expected"],
        report["output_tokens_max"],
    )
    info = plan.info
    lanes = price_lanes(
        info.tier(),
        tokens,
        plan.provider.name,
        batch=info.batch,
        flex=info.flex,
        batch_discount=plan.job.model.batch_discount,
    )
    report["lanes"] = lanes
    report["cheapest_lane"] = cheapest(lanes)


def _figures(
    plan: Plan, rows: int, to_send: int, input_tokens: int, sample: list[int], cached: int = 0
) -> dict[str, Any]:
    info = plan.info
    max_tokens = plan.job.model.max_tokens
    if sample:
        mean = statistics.fmean(sample)
        half_width = 1.96 * statistics.stdev(sample) / math.sqrt(len(sample)) if len(sample) > 1 else mean
        basis = f"mean of {len(sample)} answered rows in the journal"
    else:
        mean, half_width = max_tokens / 2, max_tokens / 2
        basis = "assumed half of max_tokens (run with --sample N to measure)"
    expected = round(min(mean, max_tokens) * to_send)
    low = round(max(0.0, mean - half_width) * to_send)
    high = round(min(max_tokens, mean + half_width) * to_send)
    limits = plan.job.limits
    # The same figures the canary reports: what answered rows used of max_tokens.
    used = TokenFigures.of(sample, max_tokens)
    return {
        "output_tokens_p50": used.p50,
        "output_tokens_p95": used.p95,
        "output_tokens_longest": used.max,
        "max_tokens_suggested": used.suggested_max_tokens,
        "rows": rows,
        "rows_to_send": to_send,
        "input_tokens": input_tokens,
        "output_tokens_max": to_send * max_tokens,
        "output_tokens_expected": expected,
        "output_tokens_interval": [low, high],
        "output_tokens_basis": basis,
        "cost_usd_min": _cost(plan, input_tokens, 0, cached),
        "cost_usd_expected": _cost(plan, input_tokens, expected, cached),
        "cost_usd_interval": [_cost(plan, input_tokens, low, cached), _cost(plan, input_tokens, high, cached)],
        "cost_usd_max": _cost(plan, input_tokens, to_send * max_tokens, cached),
        # The token cap is charged prompt + max_tokens per request, as the limiter does.
        "duration_s_min": estimated_duration_s(
            to_send, limits.requests_per_minute, input_tokens + to_send * max_tokens, limits.tokens_per_minute
        ),
        "requests_per_minute": limits.requests_per_minute,
        "model": plan.model_name,
        "tokenizer": plan.counter.name,
        "tokens_exact": plan.counter.exact,
        "price_source": info.source,
        "input_price_per_million": info.input_per_million,
        "output_price_per_million": info.output_per_million,
        "context_length": plan.context_length,
    }


def _cost(plan: Plan, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> float | None:
    cost = plan.info.cost(prompt_tokens, completion_tokens, cached)
    return None if cost is None else round(cost, 10)


def format_report(estimate: Estimate) -> str:
    """The human-readable dry-run report."""
    report = estimate.to_dict()
    approx = "" if report["tokens_exact"] else " (approximate)"
    skipped = report["skipped"]
    money = _money
    context = report["context_length"]
    window = f"{context:,}-token context window" if context else "context window (unknown: set [model] context_length)"
    lines = [
        f"dry run: {report['rows']:,} rows, {report['rows_done']:,} already done, "
        f"{report['rows_to_send']:,} would be sent; nothing was sent",
        f"  skipped: {skipped['empty_prompt']:,} empty prompt, {skipped['over_context']:,} over the {window}",
        f"  input tokens: {report['input_tokens']:,}{approx} ({report['tokenizer']})",
        f"  output tokens: max {report['output_tokens_max']:,}, expected {report['output_tokens_expected']:,} "
        f"({report['output_tokens_basis']})",
        _cost_line(report),
        _prices_line(report),
        _cache_line(report),
    ]
    lines += [f"  missing price: {text}" for text in report["missing_prices"]]
    if report["output_tokens_longest"] is not None:
        lines[3] += (
            f"; answered rows used p50 {report['output_tokens_p50']:,}, p95 {report['output_tokens_p95']:,}, "
            f"longest {report['output_tokens_longest']:,}"
        )
        if report["max_tokens_suggested"] is not None:
            lines[3] += f" (max_tokens = {report['max_tokens_suggested']:,} would fit them)"
    if report["mode"] == "batch":
        lines[4] += f" at the batch price ({report['batch_discount']:g} of the list price)"
        lines.append(
            f"  realtime mode would cost: expected {money(report['realtime_cost_usd_expected'])}, "
            f"max {money(report['realtime_cost_usd_max'])}"
        )
        lines.append("  time: within the provider's batch window (usually minutes, at most 24 h); no rate limits")
    else:
        lines.append(_time_line(report))
    if report["cheapest_lane"] is not None:
        lanes = ", ".join(f"{lane['lane']} {money(lane['cost_usd_expected'])}" for lane in report["lanes"])
        lines.append(f"  lanes (expected cost): {lanes}; cheapest: {report['cheapest_lane']}")
    return "\n".join(lines)


def _cost_line(report: dict[str, Any]) -> str:
    if report["cost_usd_min"] is None:
        return "  cost: unknown: the model's prices are missing (see below)"
    money = _money
    return (
        f"  cost: min {money(report['cost_usd_min'])}, expected {money(report['cost_usd_expected'])} "
        f"(interval {money(report['cost_usd_interval'][0])} to {money(report['cost_usd_interval'][1])}), "
        f"max {money(report['cost_usd_max'])}"
    )


def _price(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g}"


def _prices_line(report: dict[str, Any]) -> str:
    cached = report["cached_input_price_per_million"]
    cached_text = f", cached input {_price(cached)}" if cached is not None else ""
    return (
        f"  prices: {report['model']} at {_price(report['input_price_per_million'])} / "
        f"{_price(report['output_price_per_million'])} USD per million tokens in/out{cached_text}, "
        f"from {report['price_source']}"
    )


def _cache_line(report: dict[str, Any]) -> str:
    cached = report["cached_tokens_expected"]
    if not cached:
        return (
            f"  prompt cache: nothing expected from it (shared prefix {report['shared_prefix_tokens']:,} tokens; "
            f"{report['cache_rule']})"
        )
    saved = report["cache_saved_usd_expected"]
    return (
        f"  prompt cache: {cached:,} of {report['input_tokens']:,} input tokens expected from it "
        f"({report['shared_prefixes']:,} shared prefix(es), longest {report['shared_prefix_tokens']:,} tokens, each "
        f"warmed by one request; {report['cache_rule']}), saving {_money(saved)}"
    )


def _time_line(report: dict[str, Any]) -> str:
    if report["requests_per_minute"] != AUTO:
        return f"  time: at least {_duration(report['duration_s_min'])} at the job's rate limits"
    at_start = _duration(report["rows_to_send"] / START_RPM * 60)
    return (
        f"  time: {at_start} at the starting {START_RPM:,.0f} requests/min; requests_per_minute = "
        '"auto" then learns the server\'s limit while running (pin a number to fix it)'
    )


def _money(value: float | None) -> str:
    return "unknown (no price)" if value is None else f"${value:,.4f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
