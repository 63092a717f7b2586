"""Classification metrics: pure functions over (gold, predicted) pairs.

Nothing here reads files or talks to servers, so every figure can be checked
by hand in a table-driven test. A row whose answer is missing (an HTTP error,
an invalid reply, a skipped row) is scored with the predicted value
:data:`ERROR`: it is always wrong, appears as its own column of the confusion
matrix, and is counted separately.

Conventions (the same as scikit-learn's with ``zero_division=0``): a label
never predicted has precision 0, a label never in the gold column has recall
0, and F1 is 0 when precision and recall are both 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The predicted value of a row that has no usable answer.
ERROR = "(error)"
# A structured answer whose compared property is null.
NULL = "(null)"


@dataclass(frozen=True)
class LabelScore:
    """Precision, recall and F1 of one label, and how many gold rows carry it."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Scores:
    """What the comparison of one set of answers with the gold column found.

    ``labels`` orders the per-label scores and the confusion matrix: the job's
    labels as written, then gold values outside them, then other predicted
    values. ``confusion[gold][predicted]`` counts rows, for every gold label
    and every predicted column (``labels`` plus :data:`ERROR` when any row
    had no answer).
    """

    rows: int
    correct: int
    errors: int
    labels: tuple[str, ...]
    per_label: Mapping[str, LabelScore]
    confusion: Mapping[str, Mapping[str, int]]

    @property
    def accuracy(self) -> float | None:
        """Correct rows over all rows; None when there were no rows."""
        return self.correct / self.rows if self.rows else None

    @property
    def macro_f1(self) -> float | None:
        """Unweighted mean F1 over labels that occur in the gold column."""
        present = [s.f1 for s in self.per_label.values() if s.support]
        return sum(present) / len(present) if present else None


def canonical(value: Any) -> str | None:
    """A gold or predicted value as comparable text; None for a missing value.

    Strings are stripped (CSV cells often carry stray spaces); numbers compare
    by value, so gold ``"5"`` from a CSV matches an integer 5 and ``5.0``;
    booleans are ``true``/``false`` as in JSON; lists and objects are compact
    JSON with sorted keys.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return text or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def order_labels(known: Sequence[str], gold: Iterable[str], predicted: Iterable[str]) -> tuple[str, ...]:
    """The job's labels as written, then new gold values, then new predicted values (each sorted)."""
    seen = set(known)
    extra_gold = sorted(set(gold) - seen)
    seen |= set(extra_gold)
    extra_predicted = sorted(set(predicted) - seen - {ERROR})
    return (*known, *extra_gold, *extra_predicted)


def score(pairs: Iterable[tuple[str, str]], known_labels: Sequence[str] = ()) -> Scores:
    """Score (gold, predicted) pairs; predicted is :data:`ERROR` for a row without an answer."""
    counts: Counter[tuple[str, str]] = Counter(pairs)
    return score_counts(counts, known_labels)


def score_counts(counts: Mapping[tuple[str, str], int], known_labels: Sequence[str] = ()) -> Scores:
    """Score a tally of (gold, predicted) pairs (for callers that count as they stream)."""
    labels = order_labels(known_labels, (g for g, _ in counts), (p for _, p in counts))
    errors = sum(n for (_, p), n in counts.items() if p == ERROR)
    columns = (*labels, ERROR) if errors else labels
    confusion = {g: {p: counts.get((g, p), 0) for p in columns} for g in labels}
    rows = sum(counts.values())
    correct = sum(confusion[label][label] for label in labels)
    per_label = {label: _label_score(label, confusion, labels) for label in labels}
    return Scores(rows, correct, errors, labels, per_label, confusion)


def _label_score(label: str, confusion: Mapping[str, Mapping[str, int]], labels: Sequence[str]) -> LabelScore:
    true_positive = confusion[label][label]
    support = sum(confusion[label].values())
    predicted = sum(confusion[g][label] for g in labels)
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return LabelScore(precision, recall, f1, support)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For (accuracy, cost) points: True where no other point is at least as accurate and
    at most as costly while strictly better in one of the two. Unknown figures are never
    on the front."""
    front = []
    for i, (acc, cost) in enumerate(points):
        if acc is None or cost is None:
            front.append(False)
            continue
        dominated = any(
            j != i and a is not None and c is not None and a >= acc and c <= cost and (a > acc or c < cost)
            for j, (a, c) in enumerate(points)
        )
        front.append(not dominated)
    return front
