"""What a row is expected to use and cost: shared by the dry run, the ``--sample`` estimate and the canary.

The dry run expects each row's completion to be the mean of rows already
answered (for example by ``--sample N``), else half of ``max_tokens``; the
canary compares what its rows cost with that. :class:`TokenFigures` are the
completion-token percentiles both report, with a smaller ``max_tokens`` to
suggest when replies use far less than the job allows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.engine.plan import Plan

# The suggested max_tokens leaves room for twice the longest canary reply and at
# least HEADROOM_TOKENS more: a short structured reply ({"label": "positive"}, about
# 8 tokens) may come padded with spaces or newlines, and a cut reply is a lost row.
# It is offered only when it at least halves max_tokens.
HEADROOM_TOKENS = 24
SUGGESTION_FLOOR = 32


@dataclass(frozen=True, slots=True)
class TokenFigures:
    """Completion tokens of answered rows: p50, p95 and max (nearest rank), and a suggested max_tokens."""

    count: int
    p50: int | None
    p95: int | None
    max: int | None
    max_tokens: int
    suggested_max_tokens: int | None
    """Set when max_tokens is far above what replies use (a smaller one lowers the worst case budgets reserve)."""

    @classmethod
    def of(cls, tokens: Sequence[int], max_tokens: int, truncated: int = 0) -> TokenFigures:
        ordered = sorted(tokens)
        if not ordered:
            return cls(0, None, None, None, max_tokens, None)
        top = ordered[-1]
        return cls(
            len(ordered),
            _nearest_rank(ordered, 0.50),
            _nearest_rank(ordered, 0.95),
            top,
            max_tokens,
            suggest_max_tokens(top, max_tokens) if not truncated else None,
        )


def _nearest_rank(ordered: Sequence[int], q: float) -> int:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def suggest_max_tokens(longest: int, max_tokens: int) -> int | None:
    """A max_tokens with room for the longest reply seen, when the current one is at least twice that."""
    if longest <= 0:
        return None
    room = max(2 * longest, longest + HEADROOM_TOKENS, SUGGESTION_FLOOR)
    suggested = -(-room // 8) * 8  # a multiple of 8
    return suggested if 2 * suggested <= max_tokens else None


def expected_output_tokens(max_tokens: int, sample: Sequence[int]) -> float:
    """The dry run's expected completion tokens per row: the mean of answered rows, else half of max_tokens."""
    return min(statistics.fmean(sample), max_tokens) if sample else max_tokens / 2


def expected_row_cost(plan: Plan, prompt_tokens: float, output_tokens: float) -> float | None:
    """The dry run's expected cost of one row (the canary's yardstick), at the job's prices; None without prices."""
    cost = plan.info.cost(round(prompt_tokens), round(output_tokens))
    if cost is not None and plan.job.model.mode == "batch":
        cost *= plan.job.model.batch_discount
    return cost
