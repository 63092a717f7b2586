"""Row selection: which rows of a batch still need a request.

One implementation for the run, the dry run and batch mode, so a dry run's
"rows to send" is what a run would send: rows already done in the journal are
left out, a ``--sample`` keeps only its rows, and blank prompts are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.engine.prompts import RenderedBatch
from pipeline.store.journal import DONE_STATUSES, RowStatus, Seen

_OK_ONLY = frozenset({RowStatus.OK})
BLANK_ERROR = "skipped: the rendered user prompt is empty (its columns are null or blank); nothing was sent"


@dataclass
class Selection:
    """The decision for one batch."""

    todo: list[int] = field(default_factory=list)  # row indexes to send
    blank: list[int] = field(default_factory=list)  # rows to journal as skipped
    hashes: list[str] = field(default_factory=list)  # every row's prompt hash ("" outside a sample)
    done: int = 0  # rows the journal already has, under the same prompt


class RowSelector:
    def __init__(
        self,
        seen: Callable[[list[str]], dict[str, Seen]] | None,
        *,
        retry_failed: bool = False,
        sample: set[int] | None = None,
    ) -> None:
        self.seen = seen  # None: no journal (or an empty one), nothing to look up
        self.retry_failed = retry_failed
        self.sample = sample

    def is_done(self, state: Seen) -> bool:
        return state.status in self._done

    @property
    def _done(self) -> frozenset[RowStatus]:
        # --retry-failed looks again at skipped rows too: a prompt over the context window
        # may fit now (a larger context_length); a blank one is skipped again, for free.
        return _OK_ONLY if self.retry_failed else DONE_STATUSES

    def select(self, keys: list[str], rendered: RenderedBatch, offset: int) -> Selection:
        seen = self.seen(keys) if self.seen is not None else {}
        out = Selection()
        # Once per row of every rerun: the lookups are hoisted out of the loop.
        done, sample, blank = self._done, self.sample, rendered.blank
        hashes, todo, blanks = out.hashes, out.todo, out.blank
        prompt_hash, state_of = rendered.prompt_hash, seen.get
        for i, key in enumerate(keys):
            if sample is not None and offset + i not in sample:
                hashes.append("")
                continue
            h = prompt_hash(i)
            hashes.append(h)
            state = state_of(key)
            if state is not None and state.prompt_hash == h and state.status in done:
                out.done += 1
            elif blank[i]:
                blanks.append(i)
            else:
                todo.append(i)
        return out


def pick_sample(size: int | None, total: int, seed: int) -> set[int] | None:
    """A seeded random set of row numbers, the same for the same seed and input size."""
    if not size:
        return None
    return set(random.Random(seed).sample(range(total), min(size, total)))
