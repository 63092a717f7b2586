"""``pipeline eval``: answer rows that have a gold label and score the answers.

The rows are sent through the ordinary runner (:func:`run_plan` with an
explicit set of row offsets), so they are journaled in the job's own journal
and a later ``pipeline run`` does not pay for them again. With
``[[variants]]`` every variant answers the same rows, each in its own journal
beside the job's, so rerunning an evaluation pays nothing.

Rows are chosen among those whose gold cell is not blank: all of them, or a
seeded random sample of ``sample`` of them. Answers are then read back from
the journals and compared with the gold column (:mod:`.metrics`); a row
without a usable answer counts as wrong.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config.job import Job
from pipeline.engine.plan import Plan, prepare
from pipeline.errors import ExitCode, InputError, JobError
from pipeline.evaluation.metrics import ERROR, NULL, canonical, pareto_front, score_counts
from pipeline.evaluation.results import EvalOptions, Evaluation, Mistake, VariantEvaluation
from pipeline.io.fs import is_uri
from pipeline.store.journal import Journal, JournalRow, RowStatus, read_only

if TYPE_CHECKING:
    from pipeline.engine.session import Controls
    from pipeline.structured import StructuredSpec

# Wrong answers kept for the report, per variant.
MAX_MISTAKES = 20
_PROMPT_CHARS = 200
_NOT_RUN = "not_run"  # a chosen row with nothing in the journal (the evaluation stopped early)


@dataclass(frozen=True)
class _Target:
    """One thing to evaluate: a variant's plan (or the job's), and the answer property it is scored on."""

    name: str
    plan: Plan
    column: str
    labels: tuple[str, ...]
    chart: Path


@dataclass
class _Tally:
    """What scoring one target accumulates while streaming over the evaluated rows."""

    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cost: float = 0.0
    cost_known: bool = False
    mistakes: list[Mistake] = field(default_factory=list)


def targets_for(
    job: Job, field_name: str | None, data: Any = None, journal: Path | None = None
) -> tuple[Plan, list[_Target]]:
    """The job's plan, and plans for every variant (or the job itself), checked before anything is sent.

    A variant's journal sits beside the job's: ``<journal stem>.variant-<name>.sqlite``.
    """
    base = prepare(job, data=data, journal=journal)
    if not job.variants:
        column, labels = answer_column(base.structured, field_name)
        return base, [_Target(job.name, base, column, labels, chart_path(base, None))]
    targets = []
    for variant in job.variants:
        plan = prepare(job.variant_job(variant), data=data, journal=variant_journal(base.journal_path, variant.name))
        column, labels = answer_column(plan.structured, field_name, variant.name)
        targets.append(_Target(variant.name, plan, column, labels, chart_path(base, variant.name)))
    return base, targets


def variant_journal(journal: Path, variant: str) -> Path:
    return journal.with_name(f"{journal.stem}.variant-{variant}{journal.suffix}")


def answer_column(
    spec: StructuredSpec | None, field_name: str | None, variant: str | None = None
) -> tuple[str, tuple[str, ...]]:
    """The output column to compare with the gold column, and its labels in the job's order."""
    where = f"variant {variant!r}: " if variant else ""
    if spec is None:
        raise JobError(
            f"{where}pipeline eval compares a structured answer with the gold column: "
            "give the job [prompt] labels or a JSON schema"
        )
    properties: dict[str, Any] = spec.schema["properties"]
    if field_name is None:
        if len(properties) != 1:
            raise JobError(
                f"{where}the job's schema has {len(properties)} properties: name the one to compare with "
                f"--field (one of {', '.join(properties)})"
            )
        field_name = next(iter(properties))
    name = field_name.removeprefix(spec.column_prefix) if field_name not in properties else field_name
    if name not in properties:
        raise JobError(
            f"{where}--field {field_name!r} is not a property of the job's schema (one of {', '.join(properties)})"
        )
    enum = properties[name].get("enum") or []
    labels = tuple(dict.fromkeys(c for c in (canonical(v) for v in enum) if c is not None))
    return spec.column_prefix + name, labels


def gold_rows(plan: Plan, gold: str) -> list[int]:
    """Offsets of the rows whose gold cell holds a value."""
    if gold not in plan.source.columns:
        raise InputError(
            f"--gold {gold!r}: no such column in {plan.job.input.path} (columns: {', '.join(plan.source.columns)})"
        )
    offsets: list[int] = []
    offset = 0
    for batch in plan.source.batches([gold]):
        for i, value in enumerate(batch.column(0).to_pylist()):
            if canonical(value) is not None:
                offsets.append(offset + i)
        offset += batch.num_rows
    if not offsets:
        raise InputError(f"--gold {gold!r}: every cell of the column is empty in {plan.job.input.path}")
    return offsets


def choose_rows(offsets: Sequence[int], sample: int | None, seed: int) -> list[int]:
    """All rows with a gold label, or a seeded random sample of them (the same for every variant)."""
    if sample is None or sample >= len(offsets):
        return list(offsets)
    return sorted(random.Random(seed).sample(list(offsets), sample))


async def aevaluate_job(
    job: Job, options: EvalOptions, *, data: Any = None, journal: Path | None = None, controls: Controls | None = None
) -> Evaluation:
    """Send the chosen rows for every target, score them, and write the charts and the report.

    ``data`` replaces ``[input] path`` (Python API); ``journal`` the job's journal
    (variants' journals go beside it); ``controls`` lets the caller stop the run.
    """
    from pipeline.engine.run import run_plan
    from pipeline.engine.session import RunOptions

    base, targets = targets_for(job, options.field, data, journal)
    with_gold = gold_rows(base, options.gold)
    chosen = choose_rows(with_gold, options.sample, options.seed)
    rows = frozenset(chosen)
    runs = []
    exit_code = ExitCode.OK
    for target in targets:
        run_options = RunOptions(
            quiet=options.quiet,
            fresh=options.fresh,
            rows=rows,
            write_output=False,
            notebook=options.notebook,
            canary=False,  # an evaluation is itself a look at the first answers: no canary
        )
        result = await run_plan(target.plan, run_options, controls)
        runs.append(result.summary)
        if result.exit_code not in (ExitCode.OK, ExitCode.ROWS_FAILED):
            # Stopped (a signal, the budget, the key) or a bad input record: the
            # remaining variants would stop too. What was answered is journaled.
            exit_code = result.exit_code
            break
    tallies = [_score(target, options.gold, rows) for target in targets[: len(runs)]]
    results = [
        _variant_result(t, tally, summary.cost_usd, summary.requests, summary.stop_reason, len(rows))
        for t, tally, summary in zip(targets, tallies, runs, strict=False)
    ]
    front = pareto_front([(r.accuracy, r.cost_per_1k_rows) for r in results])
    results = [replace(r, frontier=f) for r, f in zip(results, front, strict=True)]
    from pipeline.evaluation.page import write_evaluation

    evaluation = Evaluation(
        job=job.name,
        gold=options.gold,
        field=targets[0].column,
        rows=len(rows),
        rows_in_job=base.total_rows,
        rows_with_gold=len(with_gold),
        sample=options.sample,
        seed=options.seed,
        results=tuple(results),
        has_variants=bool(job.variants),
        recommended=recommend(results, options.min_accuracy) if job.variants else None,
        report=report_path(base),
        min_accuracy=options.min_accuracy,
        exit_code=exit_code,
        labels=results[0].scores.labels,
    )
    return write_evaluation(evaluation)


def recommend(results: Sequence[VariantEvaluation], min_accuracy: float | None) -> str | None:
    """The cheapest variant at least ``min_accuracy`` accurate; without a threshold, the most
    accurate (the cheaper one of a tie)."""
    scored = [r for r in results if r.accuracy is not None]
    if min_accuracy is not None:
        scored = [r for r in scored if (r.accuracy or 0.0) >= min_accuracy]
        best = min(scored, key=lambda r: (_cost_key(r), -(r.accuracy or 0.0)), default=None)
    else:
        best = min(scored, key=lambda r: (-(r.accuracy or 0.0), _cost_key(r)), default=None)
    return best.name if best is not None else None


def _cost_key(result: VariantEvaluation) -> tuple[bool, float]:
    """Known costs first, cheapest first."""
    return result.cost_per_1k_rows is None, result.cost_per_1k_rows or 0.0


def _files_beside(plan: Plan) -> Path:
    """The evaluation's files go beside the job's output (or its journal, without one or for an s3:// one)."""
    if plan.output_path is None or is_uri(plan.output_path):
        return plan.journal_path
    return Path(plan.output_path)


def report_path(plan: Plan) -> Path:
    base = _files_beside(plan)
    return base.with_name(f"{base.stem}.eval.html")


def chart_path(plan: Plan, variant: str | None) -> Path:
    base = _files_beside(plan)
    suffix = f"-{variant}" if variant else ""
    return base.with_name(f"{base.stem}.eval-confusion{suffix}.png")


def _score(target: _Target, gold: str, rows: frozenset[int]) -> _Tally:
    """Each evaluated row's gold value against the target's answer, streaming over the input.

    Keys come from the target's own plan: without an id column a row's key is
    its rendered prompt, which a variant's prompt override changes.
    """
    tally = _Tally()
    with read_only(target.plan.journal_path) as journal:
        offset = 0
        for batch, keys in target.plan.keyed_batches():
            picked = [i for i in range(batch.num_rows) if offset + i in rows]
            offset += batch.num_rows
            if picked:
                _tally_batch(tally, target, batch, keys, picked, gold, journal)
    return tally


def _tally_batch(
    tally: _Tally,
    target: _Target,
    batch: pa.RecordBatch,
    keys: list[str],
    picked: list[int],
    gold: str,
    journal: Journal,
) -> None:
    golds = batch.column(gold).to_pylist()
    found = journal.results([keys[i] for i in picked])
    rendered = None
    for i in picked:
        expected = canonical(golds[i])
        assert expected is not None  # rows were chosen for having a gold value
        row = found.get(keys[i])
        predicted, error = _predicted(row, target.column)
        tally.pairs[(expected, predicted)] += 1
        if predicted == ERROR:
            tally.errors[str(row.status) if row else _NOT_RUN] += 1
        if row is not None and row.cost_usd is not None:
            tally.cost += row.cost_usd
            tally.cost_known = True
        if predicted != expected and len(tally.mistakes) < MAX_MISTAKES:
            rendered = rendered or target.plan.renderer.render(batch)
            prompt = " ".join(rendered.users[i].split())
            if len(prompt) > _PROMPT_CHARS:
                prompt = prompt[: _PROMPT_CHARS - 1] + "…"
            tally.mistakes.append(Mistake(keys[i], expected, predicted, prompt, error))


def _predicted(row: JournalRow | None, column: str) -> tuple[str, str | None]:
    """The answer to compare, or ERROR with the reason when the row has none."""
    if row is None:
        return ERROR, "not run"
    if row.status != RowStatus.OK or row.parsed is None:
        return ERROR, row.error or str(row.status)
    value = canonical(json.loads(row.parsed).get(column))
    return (NULL if value is None else value), None


def _variant_result(
    target: _Target, tally: _Tally, paid_now: float, requests: int, stop_reason: str | None, rows: int
) -> VariantEvaluation:
    scores = score_counts(tally.pairs, target.labels)
    # No row with a cost: zero if the model has a price (nothing billed), else unknown.
    cost = tally.cost if tally.cost_known or target.plan.info.cost(0, 0) is not None else None
    # Per row answered: rows a stopped evaluation never sent would cost as much as the others.
    answered = rows - tally.errors.get(_NOT_RUN, 0)
    per_row = cost / answered if cost is not None and answered else None
    return VariantEvaluation(
        name=target.name,
        model=target.plan.model_name,
        scores=scores,
        errors_by_status=dict(tally.errors),
        cost_usd=None if cost is None else round(cost, 10),
        cost_usd_paid_now=round(paid_now, 10),
        cost_per_1k_rows=None if per_row is None else round(per_row * 1000, 10),
        cost_usd_full_run_expected=None if per_row is None else round(per_row * target.plan.total_rows, 10),
        requests=requests,
        journal=target.plan.journal_path,
        chart=target.chart,
        mistakes=tuple(tally.mistakes),
        stop_reason=stop_reason,
    )
