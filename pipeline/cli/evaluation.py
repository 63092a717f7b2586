"""``pipeline eval`` and ``pipeline report``: run them and print what they found."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pipeline.cli.loop import run_async
from pipeline.cli.signals import STOP_SIGNALS
from pipeline.config.job import Job
from pipeline.errors import ExitCode
from pipeline.evaluation.evaluate import aevaluate_job
from pipeline.evaluation.results import EvalOptions, Evaluation, VariantEvaluation
from pipeline.reporting.html import money

_SHOWN_MISTAKES = 5


def eval_command(job: Job, args: argparse.Namespace) -> int:
    options = EvalOptions(
        gold=args.gold,
        sample=args.sample,
        seed=args.seed,
        field=args.field,
        quiet=args.quiet or args.json,
        min_accuracy=args.min_accuracy,
        fresh=args.fresh,
    )
    evaluation = run_async(_with_signals(job, options))
    stopped = f"{evaluation.job} stopped: {evaluation.stop_reason}; rerun to finish" if evaluation.stop_reason else None
    if args.json:
        fields = evaluation.to_dict()
        if stopped:
            fields["error"] = stopped
        print(json.dumps(fields))
    else:
        print(format_evaluation(evaluation, args.job))
    if stopped and (args.json or args.quiet):  # the error line on stderr too: scripts read stdout
        print(f"pipeline: {stopped}", file=sys.stderr)
    return int(evaluation.exit_code)


async def _with_signals(job: Job, options: EvalOptions) -> Evaluation:
    """Ctrl-C, SIGTERM and SIGHUP stop gracefully, as for ``pipeline run``: answers paid for are journaled."""
    from pipeline.engine.session import Controls

    controls = Controls()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, controls.stop, f"interrupted by {sig.name}")
    try:
        return await aevaluate_job(job, options, controls=controls)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def report_command(job: Job, args: argparse.Namespace) -> int:
    from pipeline.reporting.journal_report import write_report

    report = write_report(job)
    print(json.dumps(report.to_dict()) if args.json else f"report: {report.path} ({report.charts} charts)")
    return int(ExitCode.OK)


def format_evaluation(e: Evaluation, job_arg: str) -> str:
    which = f"a sample of {e.rows:,} (seed {e.seed})" if e.rows < e.rows_with_gold else f"all {e.rows:,}"
    lines = [
        f"{e.job}: evaluated {which} of {e.rows_with_gold:,} rows with a gold label in column {e.gold!r} "
        f"({e.rows_in_job:,} rows in the job), comparing {e.field!r}"
    ]
    if e.has_variants:
        lines += _variants_table(e)
    for result in e.results:
        lines += _result_lines(e, result)
    if e.stop_reason:
        lines.append(f"  stopped: {e.stop_reason}; rows not answered count as wrong")
        lines.append(f"  finish with: pipeline eval {job_arg} --gold {e.gold}")
    lines.append(f"  report: {e.report}")
    return "\n".join(lines)


def _variants_table(e: Evaluation) -> list[str]:
    lines = ["", f"  {'variant':<16} {'accuracy':>8} {'errors':>7} {'cost':>12} {'per 1k rows':>12} {'full run':>12}"]
    for r in e.results:
        mark = "  <- recommended" if r.name == e.recommended else ""
        lines.append(
            f"  {r.name:<16} {_ratio(r.accuracy):>8} {r.scores.errors:>7,} {money(r.cost_usd):>12} "
            f"{money(r.cost_per_1k_rows):>12} {money(r.cost_usd_full_run_expected):>12}{mark}"
        )
    if e.variants_chart:
        lines.append(f"  accuracy against cost: {e.variants_chart}")
    return lines


def _result_lines(e: Evaluation, r: VariantEvaluation) -> list[str]:
    s = r.scores
    head = f"variant {r.name} ({r.model})" if e.has_variants else f"model {r.model}"
    lines = ["", f"{head}: accuracy {_ratio(s.accuracy)} ({s.correct:,} of {s.rows:,} right)"]
    if s.errors:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r.errors_by_status.items()))
        lines.append(f"  {s.errors:,} rows without a usable answer count as wrong ({kinds})")
    width = max([len("label"), *(len(label) for label in s.labels)])
    lines.append(f"  {'label':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for label, v in s.per_label.items():
        lines.append(f"  {label:<{width}} {v.precision:>9.3f} {v.recall:>7.3f} {v.f1:>6.3f} {v.support:>8,}")
    columns = list(next(iter(s.confusion.values()), {}).keys())
    cell = max([6, *(len(c) for c in columns)])
    lines.append("  confusion (rows: gold, columns: predicted)")
    lines.append(f"  {'':<{width}} " + " ".join(f"{c:>{cell}}" for c in columns))
    for gold, row in s.confusion.items():
        lines.append(f"  {gold:<{width}} " + " ".join(f"{row[c]:>{cell},}" for c in columns))
    lines.append(
        f"  cost: {money(r.cost_usd)} for these rows ({money(r.cost_usd_paid_now)} paid now); "
        f"expected full run {money(r.cost_usd_full_run_expected)} ({e.rows_in_job:,} rows at "
        f"{money(r.cost_per_1k_rows)} per 1,000)"
    )
    if r.mistakes:
        lines.append(f"  wrong answers, first {min(len(r.mistakes), _SHOWN_MISTAKES)} (more in the report):")
        for m in r.mistakes[:_SHOWN_MISTAKES]:
            answer = m.predicted if m.error is None else f"{m.predicted} {m.error}"
            prompt = m.prompt if len(m.prompt) <= 70 else m.prompt[:69] + "…"
            lines.append(f"    {m.key}: gold {m.gold}, answered {answer}: {prompt}")
    lines.append(f"  chart: {r.chart}")
    return lines


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
