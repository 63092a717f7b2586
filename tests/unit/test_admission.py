"""Table-driven tests of admission: selection, counting, the context window, reservations, the dry run's no-writes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from pipeline.engine.admission import Admission, Ticket, rows_to_count, spread, too_long_error
from pipeline.engine.budget import Budget
from pipeline.engine.plan import Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.selection import BLANK_ERROR, RowSelector
from pipeline.store.journal import Journal, RowStatus, Seen


class CharCounter:
    """One token per character of the user prompt; remembers which rows it was asked to count."""

    name = "chars"
    exact = True

    def __init__(self) -> None:
        self.asked: list[str] = []

    def count_chat(self, systems: Sequence[str | None], users: Sequence[str]) -> list[int]:
        self.asked.extend(users)
        return [len(u) for u in users]


@dataclass
class FakeModel:
    max_tokens: int = 10


@dataclass
class FakeJob:
    model: FakeModel = field(default_factory=FakeModel)


@dataclass
class FakePlan:
    """What admission reads of a plan."""

    context_length: int | None = None
    job: FakeJob = field(default_factory=FakeJob)
    counter: CharCounter = field(default_factory=CharCounter)
    usd_per_token: float = 0.01

    def worst_cost(self, prompt_tokens: int) -> float:
        return (prompt_tokens + self.job.model.max_tokens) * self.usd_per_token


def make(
    plan: FakePlan,
    *,
    journal: Journal | None = None,
    tracker: Tracker | None = None,
    count_all: bool = False,
    seen: dict[str, Seen] | None = None,
    budget: Budget | None = None,
    **kwargs: Any,
) -> Admission:
    selector = RowSelector((lambda keys: seen) if seen is not None else None)
    return Admission(
        cast(Plan, plan), selector, count_all=count_all, journal=journal, tracker=tracker, budget=budget, **kwargs
    )


def batch(users: list[str]) -> tuple[list[str], RenderedBatch]:
    blank = [not u.strip() for u in users]
    return [f"k{i}" for i in range(len(users))], RenderedBatch(users, None, blank)


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    j = Journal.open(tmp_path / "j.sqlite", {"id": 1})
    yield j
    j.close()


@pytest.mark.parametrize(
    ("users", "context", "todo", "too_long", "blank"),
    [
        (["a" * 5, "b" * 50], None, [0, 1], 0, 0),  # no window known: nothing too long
        (["a" * 5, "b" * 50], 40, [0], 1, 0),  # 50 + 10 > 40
        (["a" * 30, "b" * 5], 40, [0, 1], 0, 0),  # 30 + 10 == 40 fits
        (["a" * 31, " ", "c"], 40, [2], 1, 1),  # one over the window, one blank
    ],
)
def test_admit_selects_counts_and_fits(
    journal: Journal, users: list[str], context: int | None, todo: list[int], too_long: int, blank: int
) -> None:
    plan = FakePlan(context_length=context)
    tracker = Tracker(len(users), quiet=True)
    keys, rendered = batch(users)
    admitted = asyncio.run(make(plan, journal=journal, tracker=tracker, count_all=True).admit(keys, rendered, 0))
    assert admitted.todo == todo and admitted.too_long == too_long and admitted.blank == blank
    assert admitted.tokens == [len(users[i]) for i in todo]
    skipped = journal.results(keys)
    assert {k for k, r in skipped.items() if r.status == RowStatus.SKIPPED} == {
        keys[i] for i in range(len(users)) if i not in todo
    }
    assert tracker.counters.skipped == too_long + blank
    for i in range(len(users)):
        row = skipped.get(keys[i])
        if row is not None and users[i].strip():
            assert row.error == too_long_error(len(users[i]), 10, cast(int, context))
        elif row is not None:
            assert row.error == BLANK_ERROR


@pytest.mark.parametrize(
    ("count_all", "context", "counted", "todo", "tokens"),
    [
        (True, None, ["short", "x" * 200], [0, 1], [5, 200]),  # a token cap or a budget: every prompt
        (False, None, [], [0, 1], [0, 0]),  # nothing needs tokens
        (False, 100, ["x" * 200], [0], [0]),  # only the prompt its length does not settle (then too long)
    ],
)
def test_only_rows_a_limit_needs_are_counted(
    count_all: bool, context: int | None, counted: list[str], todo: list[int], tokens: list[int]
) -> None:
    plan = FakePlan(context_length=context)
    keys, rendered = batch(["short", "x" * 200])
    admitted = make(plan, count_all=count_all).admit_now(keys, rendered, 0)
    assert plan.counter.asked == counted
    assert (admitted.todo, admitted.tokens) == (todo, tokens)


def test_rows_to_count_is_the_same_rule_everywhere() -> None:
    _, rendered = batch(["a", "b" * 500])
    assert rows_to_count(rendered, [0, 1], count_all=False, context_length=100, max_tokens=10) == [1]
    assert rows_to_count(rendered, [0, 1], count_all=True, context_length=100, max_tokens=10) == [0, 1]
    assert spread([0, 1, 2], [1], [7]) == [0, 7, 0]


def test_the_dry_run_writes_nothing(journal: Journal) -> None:
    """Built without a journal (the dry run), admission reports skips but journals none."""
    plan = FakePlan(context_length=20)
    keys, rendered = batch(["a" * 15, "  ", "b"])
    admitted = make(plan, count_all=True).admit_now(keys, rendered, 0)
    assert (admitted.todo, admitted.too_long, admitted.blank) == ([2], 1, 1)
    assert journal.results(keys) == {}


@pytest.mark.parametrize(
    ("status", "prompt_changed", "sent"),
    [(RowStatus.OK, False, False), (RowStatus.OK, True, True), (RowStatus.TRANSIENT, False, True)],
)
def test_done_rows_are_resumed_not_sent(status: RowStatus, prompt_changed: bool, sent: bool) -> None:
    keys, rendered = batch(["x"])
    seen = {"k0": Seen("other" if prompt_changed else rendered.prompt_hash(0), status, 0)}
    tracker = Tracker(1, quiet=True)
    admitted = make(FakePlan(), seen=seen, tracker=tracker).admit_now(keys, rendered, 0)
    assert (admitted.todo == [0]) is sent and tracker.counters.resumed == (0 if sent else 1)


def test_held_rows_are_left_out_and_resumed_can_be_left_to_the_driver() -> None:
    keys, rendered = batch(["a", "b", "c"])
    tracker = Tracker(3, quiet=True)
    admission = make(FakePlan(), tracker=tracker, hold=lambda ks: {"k1"} & set(ks), track_resumed=False)
    admitted = admission.admit_now(keys, rendered, 0)
    assert admitted.todo == [0, 2] and admitted.held == 1 and tracker.counters.resumed == 0


@pytest.mark.parametrize(
    ("limit", "spent", "tokens", "admitted", "worst"),
    [
        (None, 0.0, 1000, True, 0.0),  # no budget: nothing reserved
        (1.0, 0.0, 40, True, 0.5),  # (40 + 10) x 0.01
        (1.0, 0.6, 40, False, 0.0),  # 0.6 + 0.5 > 1.0
        (1.0, 0.5, 40, True, 0.5),  # exactly at the limit
    ],
)
def test_reserve_the_worst_case(limit: float | None, spent: float, tokens: int, admitted: bool, worst: float) -> None:
    budget = Budget(limit, spent)
    admission = make(FakePlan(), budget=budget)
    ticket = Ticket("k", "h", tokens)
    assert admission.reserve(ticket) is admitted
    assert ticket.reserved is admitted and ticket.worst == pytest.approx(worst)
    assert budget.reserved == pytest.approx(worst)


@pytest.mark.parametrize(
    ("limit", "tokens", "factor", "expected"),
    [(None, [1, 2], 0.5, 0.0), (10.0, [0, 10], 0.5, 0.15), (0.1, [0, 10], 1.0, None)],
)
def test_reserve_a_provider_batch(
    limit: float | None, tokens: list[int], factor: float, expected: float | None
) -> None:
    budget = Budget(limit, 0.0)
    got = make(FakePlan(), budget=budget).reserve_batch(tokens, factor)
    assert got == (None if expected is None else pytest.approx(expected))
    assert budget.reserved == pytest.approx(expected or 0.0)
