"""The canary: a run's first rows are sent alone and judged before the rest is paid for.

Every other protection is per row: a reply that breaks the schema, is cut off
by ``max_tokens`` or comes back empty is recorded and the run goes on, so a job
that cannot work would pay for every row before anyone looks. The canary is a
first slice of the rows to send (20 by default, when at least 100 are to be
sent; ``[limits] canary_rows``) sent on its own; the rest waits until the
slice's answers are judged:

* replies cut off by ``max_tokens`` (``finish_reason`` ``length``),
* empty completions or permanent (400-class) errors,
* invalid structured replies (not JSON, outside the schema or the labels),
* a mean cost per row far above the dry run's expected cost per row.

Each share is compared with its ``[limits]`` threshold; the first that is
reached stops the run (exit 3) with one line naming it, its share, one example
reply (clipped, the key masked) and what to change. The canary's rows are
ordinary rows: journaled like the others, never sent twice, and part of the
job, so a healthy canary costs nothing extra.

This module holds the pure part (thresholds, the verdict and its message, the
completion-token figures and the suggested ``max_tokens``, shared with the
``--sample`` estimate); :class:`CanaryGate`, the observer the realtime driver
feeds with settled rows and waits on; and :class:`BatchCanary`, batch mode's
canary batch, judged from the journal once collected (through the store it is
given: no I/O of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from pipeline.engine.expectations import TokenFigures, expected_output_tokens, expected_row_cost
from pipeline.engine.settlement import StopReason, Stops
from pipeline.secrets import Redactor
from pipeline.store.journal import JournalRow, RowStatus
from pipeline.store.stats import status_counts

if TYPE_CHECKING:
    from pipeline.config.job import LimitsSpec
    from pipeline.engine.plan import Plan
    from pipeline.engine.settlement import Settled
    from pipeline.store.batches import BatchStore, KnownBatch
    from pipeline.store.journal import Journal

T = TypeVar("T")

# Without [limits] canary_rows, runs of at least DEFAULT_MIN_ROWS rows to send get a
# canary of DEFAULT_ROWS: on a smaller run the canary would be a large part of it.
DEFAULT_ROWS = 20
DEFAULT_MIN_ROWS = 100
EXAMPLE_CHARS = 60
# The provider's word for a reply stopped by max_tokens (Mistral's "model_length"
# means the context window ran out, which a larger max_tokens would not fix).
TRUNCATED_REASON = "length"


class CanaryFailure(StrEnum):
    """What a failed canary found, in the order they are checked (the first found is named)."""

    TRUNCATED = "truncated"  # replies cut off by max_tokens
    FAILED = "failed"  # empty completions or permanent (400-class) errors
    INVALID = "invalid"  # structured replies that do not fit the schema or the labels
    COST = "cost"  # mean cost per row far above the dry run's expectation


class CanaryStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    UNJUDGED = "unjudged"  # no canary row was answered (every one a transient error)
    PENDING = "pending"  # batch mode: the canary batch is still at the provider


@dataclass(frozen=True, slots=True)
class CanarySettings:
    """The ``[limits]`` canary keys, with the run's own switch (``--no-canary``, ``pipeline eval``)."""

    rows: int | None = None  # None: DEFAULT_ROWS when at least DEFAULT_MIN_ROWS rows are to be sent
    invalid_share: float = 0.5
    truncated_share: float = 0.5
    failed_share: float = 0.5
    cost_factor: float = 3.0
    enabled: bool = True

    @classmethod
    def from_limits(cls, limits: LimitsSpec, enabled: bool = True) -> CanarySettings:
        return cls(
            rows=limits.canary_rows,
            invalid_share=limits.canary_invalid_share,
            truncated_share=limits.canary_truncated_share,
            failed_share=limits.canary_failed_share,
            cost_factor=limits.canary_cost_factor,
            enabled=enabled,
        )

    def size(self, to_send: int, final: bool) -> int | None:
        """Canary rows for a run with (at least) ``to_send`` rows to send; None: look at more rows first.

        ``final`` means ``to_send`` is every row the run will send. 0 means no
        canary: it is off, or the run has no more rows to send than the canary would.
        """
        if not self.enabled or self.rows == 0:
            return 0
        if self.rows is None:
            if to_send >= DEFAULT_MIN_ROWS:
                return DEFAULT_ROWS
        elif to_send > self.rows:
            return self.rows
        return 0 if final else None


@dataclass(frozen=True, slots=True)
class CanaryVerdict:
    """What the canary found: the fields of ``canary`` in ``pipeline run --json``."""

    status: CanaryStatus
    rows: int
    """Rows in the canary."""
    answered: int
    """Canary rows with an answer (not a transient error): the shares below are of these."""
    failure: CanaryFailure | None = None
    share: float | None = None
    """The failure's share of the answered rows."""
    message: str | None = None
    """The one line a failed canary stops with."""
    completion_tokens_p50: int | None = None
    completion_tokens_p95: int | None = None
    completion_tokens_max: int | None = None
    max_tokens: int | None = None
    max_tokens_suggested: int | None = None
    cost_usd_per_row: float | None = None
    expected_cost_usd_per_row: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == CanaryStatus.FAILED


@dataclass(frozen=True, slots=True)
class _Found:
    failure: CanaryFailure
    count: int
    example: JournalRow | None


def judge(
    rows: Sequence[JournalRow],
    settings: CanarySettings,
    max_tokens: int,
    expected_cost_per_row: float | None = None,
    redact: Callable[[str], str] = lambda text: text,
) -> CanaryVerdict:
    """The verdict on a canary's settled rows (one row per canary row, its final state)."""
    answered = [r for r in rows if r.status != RowStatus.TRANSIENT]
    truncated = [r for r in answered if r.finish_reason == TRUNCATED_REASON]
    figures = TokenFigures.of(_completion_tokens(answered), max_tokens, len(truncated))
    costs = [r.cost_usd for r in answered if r.cost_usd is not None]
    mean_cost = sum(costs) / len(costs) if costs else None
    base = CanaryVerdict(
        CanaryStatus.UNJUDGED,
        rows=len(rows),
        answered=len(answered),
        completion_tokens_p50=figures.p50,
        completion_tokens_p95=figures.p95,
        completion_tokens_max=figures.max,
        max_tokens=max_tokens,
        max_tokens_suggested=figures.suggested_max_tokens,
        cost_usd_per_row=None if mean_cost is None else round(mean_cost, 10),
        expected_cost_usd_per_row=None if expected_cost_per_row is None else round(expected_cost_per_row, 10),
    )
    if not answered:
        return base
    found = _first_failure(answered, truncated, settings, mean_cost, expected_cost_per_row)
    if found is None:
        return replace(base, status=CanaryStatus.PASSED)
    failed = replace(
        base, status=CanaryStatus.FAILED, failure=found.failure, share=round(found.count / len(answered), 4)
    )
    return replace(failed, message=failure_message(failed, found, redact))


def _completion_tokens(rows: Iterable[JournalRow]) -> list[int]:
    return [r.completion_tokens for r in rows if r.completion_tokens is not None and r.status != RowStatus.FAILED]


def _is_empty(row: JournalRow) -> bool:
    return row.status in (RowStatus.OK, RowStatus.INVALID) and not (row.completion or "").strip()


def _first_failure(
    answered: list[JournalRow],
    truncated: list[JournalRow],
    settings: CanarySettings,
    mean_cost: float | None,
    expected: float | None,
) -> _Found | None:
    n = len(answered)
    if truncated and len(truncated) / n >= settings.truncated_share:
        return _Found(CanaryFailure.TRUNCATED, len(truncated), truncated[0])
    failed = [r for r in answered if r.status == RowStatus.FAILED or _is_empty(r)]
    if failed and len(failed) / n >= settings.failed_share:
        return _Found(CanaryFailure.FAILED, len(failed), failed[0])
    invalid = [r for r in answered if r.status == RowStatus.INVALID]
    if invalid and len(invalid) / n >= settings.invalid_share:
        return _Found(CanaryFailure.INVALID, len(invalid), invalid[0])
    if mean_cost is not None and expected and mean_cost > settings.cost_factor * expected:
        return _Found(CanaryFailure.COST, n, None)
    return None


def failure_message(verdict: CanaryVerdict, found: _Found, redact: Callable[[str], str]) -> str:
    """The one line a failed canary stops with: what, how many, an example, what to change."""
    n = verdict.answered
    share = f"{found.count} of {n} canary rows ({found.count / n:.0%})"
    example = _example(found.example, redact)
    if found.failure == CanaryFailure.TRUNCATED:
        longest = f"; replies used up to {verdict.completion_tokens_max}" if verdict.completion_tokens_max else ""
        what = f"{share} were cut off by max_tokens = {verdict.max_tokens}{longest}"
        fix = "raise [model] max_tokens to fit a whole reply (or ask the prompt for a shorter one)"
    elif found.failure == CanaryFailure.FAILED:
        empty = found.example is not None and found.example.status != RowStatus.FAILED
        what = f"{share} came back {'empty' if empty else 'refused by the provider (permanent error)'}"
        fix = (
            "check the prompt and [model] name (a reasoning model may need a larger max_tokens)"
            if empty
            else "check [model] name, params and the prompt against the provider's error"
        )
    elif found.failure == CanaryFailure.INVALID:
        what = f"{share} are invalid structured replies (not JSON, or outside the schema or labels)"
        fix = "fix the prompt so the model answers in the schema, or use a model that supports structured outputs"
    else:
        what = (
            f"the canary's rows cost ${verdict.cost_usd_per_row:.6f} per row, more than "
            f"{_factor(verdict)} the dry run's expected ${verdict.expected_cost_usd_per_row:.6f}"
        )
        fix = "check [model] name and its prices, shorten the prompt or lower max_tokens"
    tail = f"; e.g. {example}" if example else ""
    return f"canary failed: {what}{tail}; {fix}, then rerun with --fresh (or --no-canary to send anyway)"


def _factor(verdict: CanaryVerdict) -> str:
    cost, expected = verdict.cost_usd_per_row or 0.0, verdict.expected_cost_usd_per_row or 0.0
    return f"{cost / expected:.1f}x" if expected else "several times"


def _example(row: JournalRow | None, redact: Callable[[str], str]) -> str | None:
    if row is None:
        return None
    if row.status == RowStatus.FAILED:
        return f"error {clip(row.error or '', redact)!r}"
    text = clip(row.completion or "", redact)
    if not text:
        return "an empty reply"
    return f"reply {text!r}"


def clip(text: str, redact: Callable[[str], str], limit: int = EXAMPLE_CHARS) -> str:
    """One line of at most ``limit`` characters, the key masked (before clipping, so no part of it shows)."""
    flat = " ".join(redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class CanaryGate:
    """The observer between a driver's settlement and its admission of the rest.

    The driver holds the rows it reads until :meth:`split` knows the canary's
    size, hands the canary's keys to :meth:`start`, reports every row it
    settles (:meth:`observe`, settlement's observer) and waits
    (:meth:`wait`) before admitting more rows; :meth:`verdict` judges what came back.
    """

    def __init__(
        self,
        settings: CanarySettings,
        max_tokens: int,
        redact: Callable[[str], str] = lambda text: text,
        expected_cost: Callable[[float, float], float | None] | None = None,
    ) -> None:
        self.settings = settings
        self.max_tokens = max_tokens
        self.redact = redact
        self.expected_cost = expected_cost  # (prompt tokens, completion tokens) -> the dry run's cost of a row
        self.output_tokens = max_tokens / 2  # the dry run's expected completion tokens per row
        self.deciding = settings.enabled  # the size is not decided yet
        self.keys: set[str] = set()
        self.expected = 0  # canary rows to wait for
        self.rows: dict[str, JournalRow] = {}  # each canary row's latest state
        self.settled = asyncio.Event()
        self.result: CanaryVerdict | None = None

    @classmethod
    def for_plan(cls, plan: Plan, enabled: bool) -> CanaryGate:
        return cls(
            CanarySettings.from_limits(plan.job.limits, enabled),
            plan.job.model.max_tokens,
            Redactor(plan.api_key).redact,
            lambda prompt, completion: expected_row_cost(plan, prompt, completion),
        )

    def size(self, to_send: int, final: bool) -> int | None:
        """As :meth:`CanarySettings.size`; once decided, the gate stops asking."""
        size = self.settings.size(to_send, final)
        if size is not None:
            self.deciding = False
        return size

    def split(self, held: list[T], final: bool) -> tuple[list[T], list[T]] | None:
        """The canary's rows and the rows after it, once its size is known; None: hold on, more rows may come."""
        size = self.size(len(held), final)
        return None if size is None else (held[:size], held[size:])

    def start(self, keys: Sequence[str], sample: Sequence[int] = (), expected: int | None = None) -> None:
        """The canary's rows; ``sample``: completion tokens of rows answered before it (the dry run's basis).

        ``expected``: the canary's size when its keys are added one by one as they go out (:meth:`add`).
        """
        self.keys = set(keys)
        self.expected = len(self.keys) if expected is None else expected
        self.output_tokens = expected_output_tokens(self.max_tokens, sample)
        if not self.expected:
            self.settled.set()

    def add(self, key: str) -> None:
        self.keys.add(key)

    def observe(self, settled: Settled) -> None:
        """Settlement's observer: every committed reply; rows outside the canary are a set lookup.

        The canary is settled once each of its rows has an answer. A row asked
        again (``retry_invalid``) is judged by its latest answer in by then.
        """
        row = settled.row
        if self.result is not None or row.key not in self.keys:
            return
        self.rows[row.key] = row
        if len(self.rows) >= self.expected:
            self.settled.set()

    async def wait(self, stopped: asyncio.Event) -> bool:
        """Until every canary row is settled (True) or the run stops (False)."""
        if not self.settled.is_set():
            settled = asyncio.ensure_future(self.settled.wait())
            stop = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait([settled, stop], return_when=asyncio.FIRST_COMPLETED)
            finally:
                settled.cancel()
                stop.cancel()
        return self.settled.is_set() and not stopped.is_set()

    def verdict(self) -> CanaryVerdict:
        """Judge the rows observed."""
        self.result = self.judge(list(self.rows.values()))
        return self.result

    def judge(self, rows: Sequence[JournalRow]) -> CanaryVerdict:
        """:func:`judge`, against the dry run's expected cost of a row of the canary's mean prompt length."""
        prompts = [r.prompt_tokens for r in rows if r.prompt_tokens]
        expected = None
        if self.expected_cost is not None and prompts:
            expected = self.expected_cost(sum(prompts) / len(prompts), self.output_tokens)
        return judge(rows, self.settings, self.max_tokens, expected, self.redact)


class BatchCanary:
    """Batch mode's canary: a first small batch; the rest is submitted once it is collected and passes.

    The batch's id is journaled with its submission (``BatchStore.record_submission``),
    so a run that ends while it is pending (``--no-wait``) leaves it to the next run to judge.
    """

    def __init__(self, gate: CanaryGate, store: BatchStore, journal: Journal) -> None:
        self.gate = gate
        self.store = store
        self.journal = journal
        self.batch_id = store.canary_batch()  # submitted by this run or an earlier one
        if self.batch_id is not None:
            gate.deciding = False  # that canary decides for this run
        self.verdict: CanaryVerdict | None = None

    def submitted(self, batch_id: str, rows: int) -> None:
        self.batch_id = batch_id
        self.verdict = CanaryVerdict(CanaryStatus.PENDING, rows=rows, answered=0, max_tokens=self.gate.max_tokens)

    def judge(self, pending: list[KnownBatch]) -> CanaryVerdict | None:
        """The verdict once the canary batch is collected (then forgotten); None until then, or without one."""
        if self.batch_id is None:
            return None
        waiting = next((b for b in pending if b.id == self.batch_id), None)
        if waiting is not None:
            self.verdict = CanaryVerdict(
                CanaryStatus.PENDING, rows=waiting.rows, answered=0, max_tokens=self.gate.max_tokens
            )
            return None
        keys = list({r.key for r in self.store.rows_of(self.batch_id).values()})
        rows = list(self.journal.results(keys).values())
        self.verdict = self.gate.judge(rows)
        self.batch_id = None
        self.store.forget_canary()  # judged: a later run sends its own canary (of rows not answered yet)
        return self.verdict


class DispatchCanary:
    """The canary of a driver that hands rows out itself (the Ray driver): its rows first, then none until judged.

    Workers load only a few units ahead, so its size is decided on the rows the run
    may send (``chosen`` rows, else the input less the rows the journal has done).
    """

    def __init__(
        self, gate: CanaryGate, stops: Stops, journal: Journal, total: int, *, chosen: int | None, retry_failed: bool
    ) -> None:
        self.gate = gate
        self.stops = stops
        self.journal = journal
        self.total = total
        self.chosen = chosen  # --sample N, or an evaluation's rows
        self.retry_failed = retry_failed
        self.left: int | None = None  # canary rows still to hand out (None: no canary under way)

    def room(self) -> int | None:
        """Rows that may go out now (None: any number); a failed canary stops the run."""
        gate = self.gate
        if gate.deciding:
            size = gate.size(self._rows_to_send(), final=True)
            if size:
                gate.start([], self.journal.completion_token_sample(), expected=size)
                self.left = size
        if self.left is None or self.left > 0:
            return self.left
        if not gate.settled.is_set():
            return 0
        self.left = None
        verdict = gate.verdict()
        if verdict.failed:
            self.stops.stop(StopReason.canary(verdict.message or "canary failed"))
            return 0
        return None

    def cap(self, room: int) -> int:
        """``room`` rows, or fewer while the canary's own rows go out."""
        return room if self.left is None else min(room, self.left)

    def sent(self, key: str) -> None:
        """A row handed out (a row asked again for an invalid reply is not a new canary row)."""
        if self.left is not None and key not in self.gate.keys:
            self.gate.add(key)
            self.left -= 1

    def _rows_to_send(self) -> int:
        if self.chosen:
            return self.chosen
        done = status_counts(self.journal.conn).by_status
        finished = ("ok", "skipped") if self.retry_failed else ("ok", "skipped", "failed", "invalid")
        return self.total - sum(done.get(status, 0) for status in finished)
