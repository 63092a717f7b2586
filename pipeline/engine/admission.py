"""Admission: which rows of a batch a run sends, and the budget each one reserves.

One implementation for the realtime, batch and Ray drivers and the dry run,
so "rows to send" means the same everywhere. The stages, in order:

1. **select**: rows the journal already has (same prompt) are done; blank
   prompts are journaled ``skipped``; a ``--sample`` keeps only its rows; a
   driver may hold rows back (batch mode: rows waiting in a provider batch);
2. **count**: prompt tokens, only where a limit needs them (a token cap or a
   budget needs every row; the context window only rows too long to fit
   surely by their length); off the event loop, or on a Ray worker;
3. **fit**: rows whose prompt plus ``max_tokens`` exceeds the model's
   context window are journaled ``skipped``: nothing is sent for them;
4. **reserve**: before a request goes out, its worst case (the prompt plus a
   full ``max_tokens`` reply) is reserved against ``budget_usd``.

The dry run is admission without the writes: built without a journal, it
journals nothing and tracks nothing, and reports what it left out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.engine.plan import fits_without_counting
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.selection import BLANK_ERROR, RowSelector, Selection
from pipeline.store.journal import Journal, JournalRow, RowStatus

if TYPE_CHECKING:
    from pipeline.engine.budget import Budget
    from pipeline.engine.plan import Plan
    from pipeline.engine.progress import Tracker
    from pipeline.engine.tokens import TokenCounter

# Keys a driver holds back from sending now (batch mode: rows in a pending provider batch).
Hold = Callable[[list[str]], set[str]]


@dataclass(slots=True)  # one per row sent: slots, not frozen (a frozen __init__ costs more)
class Ticket:
    """A row admitted for sending, and what it has reserved and cost so far."""

    key: str
    prompt_hash: str
    tokens: int  # prompt tokens when counted (limits, budget), else 0
    body: bytes | None = None  # the request body, where the driver builds it up front
    worst: float = 0.0  # the budget reserved for it (its worst case), while ``reserved``
    reserved: bool = False
    tries: int = 0  # replies asked again because they did not fit the schema
    prior_cost: float = 0.0  # what those earlier replies cost
    prior_attempts: int = 0  # and the requests they took
    prior_costs: list[float] = field(default_factory=list)  # what each of their requests cost


@dataclass(slots=True)
class Admitted:
    """One input batch after admission: the rows to send and what was left out."""

    keys: list[str]
    hashes: list[str]  # every row's prompt hash ("" for rows outside a sample)
    todo: list[int] = field(default_factory=list)  # row indexes to send, in input order
    tokens: list[int] = field(default_factory=list)  # prompt tokens per row of ``todo`` (0: not counted)
    done: int = 0  # rows the journal already has under the same prompt
    blank: int = 0  # rows skipped for a blank prompt
    too_long: int = 0  # rows skipped for exceeding the context window
    held: int = 0  # rows held back by the driver (in a pending batch)
    selection: Selection | None = None  # the row selector's raw decision


def too_long_error(tokens: int, max_tokens: int, context_length: int) -> str:
    return (
        f"skipped: prompt of {tokens} tokens + max_tokens {max_tokens} exceeds the model's "
        f"context window of {context_length} tokens; nothing was sent"
    )


def rows_to_count(
    rendered: RenderedBatch, todo: Sequence[int], *, count_all: bool, context_length: int | None, max_tokens: int
) -> list[int]:
    """The rows whose prompt tokens a limit needs (the same rule on the driver and on a Ray worker)."""
    if count_all:
        return list(todo)
    return [i for i in todo if not fits_without_counting(rendered, i, context_length, max_tokens)]


def count_rows(counter: TokenCounter, rendered: RenderedBatch, rows: list[int]) -> list[int]:
    """Prompt tokens of ``rows`` (CPU-bound: callers on an event loop run it in a thread)."""
    systems = [rendered.systems[i] for i in rows] if rendered.systems is not None else [None] * len(rows)
    return counter.count_chat(systems, [rendered.users[i] for i in rows])


def count_keys(plan: Plan, keys: set[str]) -> dict[str, int]:
    """Prompt tokens of the rows with these keys, read again from the input (CPU-bound: off the loop).

    For answers that came back without usage (batch mode collects them long
    after the prompts were rendered): they are charged for their prompt too.
    """
    found: dict[str, int] = {}
    for _, batch_keys, rendered in plan.batches():
        wanted = [i for i, key in enumerate(batch_keys) if key in keys and key not in found]
        if wanted:
            counted = count_rows(plan.counter, rendered, wanted)
            found.update((batch_keys[i], t) for i, t in zip(wanted, counted, strict=True))
        if len(found) == len(keys):
            break
    return found


def spread(todo: list[int], rows: list[int], counted: list[int]) -> list[int]:
    """Counts of ``rows`` laid out over ``todo`` (0 where a row was not counted)."""
    if len(rows) == len(todo):
        return counted
    by_row = dict(zip(rows, counted, strict=True))
    return [by_row.get(i, 0) for i in todo]


class Admission:
    """Decides, batch by batch, which rows a run sends; journals the rows it skips.

    ``journal`` None: the dry run, which writes nothing. ``tracker`` None:
    nothing is counted in a progress bar. ``track_resumed`` False: the
    driver counts rows done before this run itself (batch mode reads the
    input several times). ``count_all``: every prompt is counted (a token cap
    or a budget needs it).
    """

    def __init__(
        self,
        plan: Plan,
        selector: RowSelector,
        *,
        count_all: bool,
        budget: Budget | None = None,
        journal: Journal | None = None,
        tracker: Tracker | None = None,
        hold: Hold | None = None,
        track_resumed: bool = True,
    ) -> None:
        self.plan = plan
        self.selector = selector
        self.count_all = count_all
        self.budget = budget
        self.journal = journal
        self.tracker = tracker
        self.hold = hold
        self.track_resumed = track_resumed
        self.context_length = plan.context_length
        self.max_tokens = plan.job.model.max_tokens

    # -- the stages ------------------------------------------------------------------------

    def select(self, keys: list[str], rendered: RenderedBatch, offset: int) -> Admitted:
        """Rows not done yet; blank prompts journaled as skipped; held rows left out."""
        selection = self.selector.select(keys, rendered, offset)
        admitted = Admitted(keys, selection.hashes, selection.todo, [], selection.done, len(selection.blank))
        admitted.selection = selection
        if self.tracker is not None and self.track_resumed:
            self.tracker.resumed(selection.done)
        if selection.blank:
            self._write_skipped([(keys[i], selection.hashes[i], BLANK_ERROR) for i in selection.blank])
        if self.hold is not None and admitted.todo:
            held = self.hold([keys[i] for i in admitted.todo])
            if held:
                kept = [i for i in admitted.todo if keys[i] not in held]
                admitted.held = len(admitted.todo) - len(kept)
                admitted.todo = kept
        return admitted

    def need(self, rendered: RenderedBatch, todo: list[int]) -> list[int]:
        """The rows of ``todo`` whose prompt tokens must be counted."""
        return rows_to_count(
            rendered, todo, count_all=self.count_all, context_length=self.context_length, max_tokens=self.max_tokens
        )

    def fit(self, admitted: Admitted, tokens: list[int]) -> Admitted:
        """Rows over the context window are left out (and journaled as skipped); ``tokens`` per ``todo`` row."""
        limit = self.context_length
        if limit is None:
            admitted.tokens = tokens
            return admitted
        max_tokens = self.max_tokens
        keep: list[int] = []
        kept: list[int] = []
        over: list[tuple[int, int]] = []
        for i, t in zip(admitted.todo, tokens, strict=True):
            if t and t + max_tokens > limit:
                over.append((i, t))
            else:
                keep.append(i)
                kept.append(t)
        if over:
            admitted.too_long = len(over)
            admitted.todo, admitted.tokens = keep, kept
            self._write_skipped(
                [(admitted.keys[i], admitted.hashes[i], too_long_error(t, max_tokens, limit)) for i, t in over]
            )
        else:
            admitted.tokens = tokens
        return admitted

    # -- the whole admission, on an event loop or off it -------------------------------------

    async def admit(self, keys: list[str], rendered: RenderedBatch, offset: int) -> Admitted:
        """Select, count (in a thread, only where needed) and fit one batch."""
        admitted = self.select(keys, rendered, offset)
        todo = admitted.todo
        rows = self.need(rendered, todo) if todo else []
        if not rows:
            return self.fit(admitted, [0] * len(todo))
        counted = await asyncio.to_thread(count_rows, self.plan.counter, rendered, rows)
        return self.fit(admitted, spread(todo, rows, counted))

    def admit_now(self, keys: list[str], rendered: RenderedBatch, offset: int) -> Admitted:
        """The same, counting in this thread (the dry run)."""
        admitted = self.select(keys, rendered, offset)
        todo = admitted.todo
        rows = self.need(rendered, todo) if todo else []
        counted = count_rows(self.plan.counter, rendered, rows) if rows else []
        return self.fit(admitted, spread(todo, rows, counted) if rows else [0] * len(todo))

    # -- the budget ------------------------------------------------------------------------

    def worst(self, tokens: int) -> float:
        """The most one request can cost: its prompt plus a full ``max_tokens`` reply (0 without a budget)."""
        if self.budget is None or self.budget.limit is None:
            return 0.0
        return self.plan.worst_cost(tokens) or 0.0

    def reserve(self, ticket: Ticket) -> bool:
        """Reserve a row's worst case; False when the budget cannot hold it (the run must stop)."""
        budget = self.budget
        if budget is None or budget.limit is None:
            ticket.reserved = True  # nothing held: releasing it settles nothing
            return True
        worst = self.plan.worst_cost(ticket.tokens) or 0.0
        if not budget.reserve(worst):
            return False
        ticket.worst, ticket.reserved = worst, True
        return True

    def reserve_batch(self, tokens: Sequence[int], factor: float = 1.0) -> float | None:
        """Reserve a provider batch's worst case at ``factor`` of the list price; None when it does not fit."""
        budget = self.budget
        if budget is None or budget.limit is None:
            return 0.0
        worst = sum(self.plan.worst_cost(t) or 0.0 for t in tokens) * factor
        return worst if budget.reserve(worst) else None

    # -- writes (none in a dry run) --------------------------------------------------------

    def _write_skipped(self, rows: list[tuple[str, str, str]]) -> None:
        """Journal rows nothing is sent for (key, prompt hash, why), in one commit."""
        if self.journal is None:
            return
        now = time.time()
        self.journal.write_now([JournalRow(key, h, RowStatus.SKIPPED, error=e, updated=now) for key, h, e in rows])
        if self.tracker is not None:
            self.tracker.skipped(len(rows))
