"""The end-of-run summary, for people (or ``--json`` for scripts)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from pipeline.engine.canary import CanaryStatus
from pipeline.engine.limits.limiter import LimitSource
from pipeline.engine.plan import Plan
from pipeline.engine.reports import RunSummary
from pipeline.engine.session import RunResult
from pipeline.errors import ExitCode


def print_summary(plan: Plan, result: RunResult, args: argparse.Namespace) -> None:
    summary = result.summary
    if summary.estimate is not None and not args.json:  # --sample: the engine extrapolated the whole job
        from pipeline.engine.estimate import format_report

        print("estimate for the full job from the sample:\n" + format_report(summary.estimate))
    if args.json:
        fields = summary.to_dict()
        if summary.exit_code == ExitCode.STOPPED:
            fields["error"] = _stopped(plan, summary)  # what stopped it, as for any other exit 3
        elif summary.exit_code == ExitCode.USAGE and summary.stop_reason:
            fields["error"] = summary.stop_reason  # a bad record deep in the input
        print(json.dumps(fields))  # one JSON object, for scripts
        _print_problems(plan, summary)  # and the error line on stderr, as with --quiet
        return
    if args.quiet:
        _print_problems(plan, summary)
        return
    print(format_summary(plan, summary, args.job))


def format_summary(plan: Plan, s: RunSummary, job_arg: str) -> str:
    est = s.cost_usd_estimated
    est_text = "unknown" if est is None else f"${est:.6f}"
    lines = [
        f"{plan.job.name}: {s.rows_ok:,} rows ok, {s.rows_failed + s.rows_invalid:,} failed, "
        f"{s.rows_skipped:,} skipped, {s.rows_resumed:,} already done "
        f"in {s.wall_s:.1f} s ({s.requests:,} requests, {s.requests_per_minute:,.0f} per minute)",
        f"  tokens: {s.prompt_tokens:,} in + {s.completion_tokens:,} out; cost ${s.cost_usd:.6f} "
        f"(estimated from tokens {est_text}, prices from {s.price_source}); "
        f"job total ${s.job_spent_usd:.6f}",
    ]
    if s.cached_tokens:
        share = s.cached_tokens / s.prompt_tokens if s.prompt_tokens else 0.0
        lines.append(
            f"  prompt cache: {s.cached_tokens:,} input tokens ({share:.0%}) read from the provider's cache, "
            f"saving ${s.cache_saved_usd:.6f}"
        )
    if s.cost_estimated:
        lines.append(
            "  note: the server reported no usage for some replies; their cost was estimated from "
            "counted tokens at the job's prices (and counted against budget_usd)"
        )
    lines += _rate_lines(s)
    lines += _canary_lines(s)
    if s.errors:
        lines.append("  errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(s.errors.items())))
    if s.mode == "batch":
        lines.append(
            f"  batches: {s.batches_submitted:,} submitted by this run, {s.batches_pending:,} pending at the "
            f"provider ({s.rows_pending:,} rows)"
        )
    if s.output:
        lines.append(f"  output: {s.output} ({s.output_rows:,} rows)")
    lines += _stop_lines(s, job_arg)
    return "\n".join(lines)


def _rate_lines(s: RunSummary) -> list[str]:
    """What ``"auto"`` limits learned, worded so the user can pin it next time."""
    lines: list[str] = []
    if not s.requests:
        return lines  # nothing was sent: nothing was learned
    rpm = s.learned_requests_per_minute
    if rpm is not None and s.learned_rate_source == LimitSource.NOT_REACHED:
        lines.append(
            f"  rate: no rate limit met up to {rpm:,.0f} requests/min "
            '(requests_per_minute = "auto" kept raising it while requests succeeded)'
        )
    elif rpm is not None:
        pin = pinnable(rpm)
        said = ", as it stated" if s.learned_rate_source == LimitSource.STATED else ""
        lines.append(
            f"  rate: the server allowed about {pin:,} requests/min{said} "
            f"(pin it with [limits] requests_per_minute = {pin})"
        )
    if s.learned_tokens_per_minute is not None:
        lines.append(f"  tokens: the server stated a limit of {s.learned_tokens_per_minute:,} tokens/min")
    return lines


def _canary_lines(s: RunSummary) -> list[str]:
    """The canary's verdict and what its replies used of max_tokens."""
    c = s.canary
    if c is None:
        return []
    if c.status == CanaryStatus.PASSED:
        head = f"  canary: passed on its first {c.rows:,} rows"
    elif c.status == CanaryStatus.FAILED:
        head = f"  canary: failed ({c.failure}: {c.share or 0:.0%} of {c.answered:,} answered rows)"
    elif c.status == CanaryStatus.PENDING:
        head = f"  canary: a batch of {c.rows:,} rows waits to be judged"
    else:
        head = f"  canary: none of its {c.rows:,} rows was answered (transient errors): nothing to judge"
    if c.completion_tokens_max is not None:
        head += (
            f"; completion tokens p50 {c.completion_tokens_p50:,}, p95 {c.completion_tokens_p95:,}, "
            f"max {c.completion_tokens_max:,} of max_tokens {c.max_tokens:,}"
        )
    lines = [head]
    if c.max_tokens_suggested is not None:
        lines.append(
            f"  max_tokens: replies use far less than {c.max_tokens:,}; [model] max_tokens = "
            f"{c.max_tokens_suggested:,} would fit them and lower the worst case that budgets reserve"
        )
    return lines


def pinnable(rpm: float) -> int:
    """A learned rate as a whole number to put in a job file: three significant figures, rounded down."""
    if rpm < 1:
        return 1
    step = 10 ** max(0, math.floor(math.log10(rpm)) - 2)
    return int(rpm // step * step)


def _stop_lines(s: RunSummary, job_arg: str) -> list[str]:
    if s.exit_code == ExitCode.STOPPED:
        return [f"  stopped: {s.stop_reason}", f"  resume with: pipeline run {job_arg}"]
    if s.exit_code == ExitCode.USAGE and s.stop_reason:  # a bad record deep in the input
        return [f"  stopped: {s.stop_reason}"]
    if s.exit_code == ExitCode.ROWS_FAILED:
        return [
            f"  {_rows_have_an_error(s)} (see the error column); "
            f"rerun to retry transient failures "
            f"(add --retry-failed for the others): pipeline run {job_arg}"
        ]
    return []


def _print_problems(plan: Plan, s: RunSummary) -> None:
    """``--quiet`` and ``--json``: nothing on success; one line per problem on stderr."""
    if s.exit_code == ExitCode.STOPPED:
        print(f"pipeline: {_stopped(plan, s)}", file=sys.stderr)
    elif s.exit_code == ExitCode.USAGE and s.stop_reason:  # a bad record deep in the input
        print(f"pipeline: error: {s.stop_reason}", file=sys.stderr)
    elif s.exit_code == ExitCode.ROWS_FAILED:
        print(
            f"pipeline: {plan.job.name}: {_rows_have_an_error(s)} (see the error column of {s.output})",
            file=sys.stderr,
        )


def _stopped(plan: Plan, s: RunSummary) -> str:
    return f"{plan.job.name} stopped: {s.stop_reason}; rerun to resume"


def _rows_have_an_error(s: RunSummary) -> str:
    n = _rows_with_error(s)
    return "1 row has an error" if n == 1 else f"{n:,} rows have an error"


def _rows_with_error(s: RunSummary) -> int:
    """Rows of the output with an error; without an output (a sample), this run's failures."""
    return s.output_rows_with_error or s.rows_failed + s.rows_invalid
