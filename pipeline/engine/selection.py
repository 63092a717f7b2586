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
from pipeline.store.journal import RowStatus, Seen

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
        if state.status == RowStatus.OK:
            return True
        # --retry-failed looks again at skipped rows too: a prompt over the context window
        # may fit now (a larger context_length); a blank one is skipped again, for free.
        return state.status in (RowStatus.FAILED, RowStatus.INVALID, RowStatus.SKIPPED) and not self.retry_failed

    def select(self, keys: list[str], rendered: RenderedBatch, offset: int) -> Selection:
        seen = self.seen(keys) if self.seen is not None else {}
        out = Selection()
        for i, key in enumerate(keys):
            if self.sample is not None and offset + i not in self.sample:
                out.hashes.append("")
                continue
            h = rendered.prompt_hash(i)
            out.hashes.append(h)
            state = seen.get(key)
            if state is not None and state.prompt_hash == h and self.is_done(state):
                out.done += 1
            elif rendered.blank[i]:
                out.blank.append(i)
            else:
                out.todo.append(i)
        return out


def pick_sample(size: int | None, total: int, seed: int) -> set[int] | None:
    """A seeded random set of row numbers, the same for the same seed and input size."""
    if not size:
        return None
    return set(random.Random(seed).sample(range(total), min(size, total)))
