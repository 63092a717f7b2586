"""Evaluation metrics: hand-computed figures, table-driven."""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import pytest

from pipeline.evaluation.metrics import ERROR, LabelScore, canonical, pareto_front, score

LABELS = ("positive", "negative", "neutral")
P, N, U = LABELS

# 10 rows: 6 right, 2 without an answer. Worked by hand:
#   positive: TP 3, predicted 4 (3 + 1 from negative), support 4 -> P 3/4, R 3/4, F1 3/4
#   negative: TP 2, predicted 3 (1 from positive + 2), support 4 -> P 2/3, R 1/2, F1 4/7
#   neutral:  TP 1, predicted 1, support 2                      -> P 1, R 1/2, F1 2/3
MIXED = [(P, P)] * 3 + [(P, N)] + [(N, N)] * 2 + [(N, P), (N, ERROR), (U, ERROR), (U, U)]


def test_mixed_figures() -> None:
    s = score(MIXED, LABELS)
    assert (s.rows, s.correct, s.errors, s.accuracy) == (10, 6, 2, 0.6)
    assert s.labels == LABELS
    assert s.per_label[P] == LabelScore(0.75, 0.75, 0.75, 4)
    assert astuple(s.per_label[N]) == pytest.approx((2 / 3, 0.5, 4 / 7, 4))
    assert astuple(s.per_label[U]) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert s.confusion == {
        P: {P: 3, N: 1, U: 0, ERROR: 0},
        N: {P: 1, N: 2, U: 0, ERROR: 1},
        U: {P: 0, N: 0, U: 1, ERROR: 1},
    }
    assert s.macro_f1 == pytest.approx((0.75 + 4 / 7 + 2 / 3) / 3)


@pytest.mark.parametrize(
    ("pairs", "rows", "correct", "errors", "labels", "confusion"),
    [
        # No rows: nothing to divide by.
        ([], 0, 0, 0, LABELS, {P: {P: 0, N: 0, U: 0}, N: {P: 0, N: 0, U: 0}, U: {P: 0, N: 0, U: 0}}),
        # All right, no error column.
        ([(P, P), (N, N)], 2, 2, 0, LABELS, {P: {P: 1, N: 0, U: 0}, N: {P: 0, N: 1, U: 0}, U: {P: 0, N: 0, U: 0}}),
        # A gold value outside the job's labels is appended after them, then predicted extras.
        (
            [("mixed", P), (P, "meh")],
            2,
            0,
            0,
            (*LABELS, "mixed", "meh"),
            {
                P: {P: 0, N: 0, U: 0, "mixed": 0, "meh": 1},
                N: {P: 0, N: 0, U: 0, "mixed": 0, "meh": 0},
                U: {P: 0, N: 0, U: 0, "mixed": 0, "meh": 0},
                "mixed": {P: 1, N: 0, U: 0, "mixed": 0, "meh": 0},
                "meh": {P: 0, N: 0, U: 0, "mixed": 0, "meh": 0},
            },
        ),
        # Every row failed: accuracy 0, only the error column is filled.
        ([(P, ERROR), (P, ERROR)], 2, 0, 2, LABELS, {
            P: {P: 0, N: 0, U: 0, ERROR: 2}, N: {P: 0, N: 0, U: 0, ERROR: 0}, U: {P: 0, N: 0, U: 0, ERROR: 0},
        }),
    ],
)  # fmt: skip
def test_table(
    pairs: list[tuple[str, str]],
    rows: int,
    correct: int,
    errors: int,
    labels: tuple[str, ...],
    confusion: dict[str, dict[str, int]],
) -> None:
    s = score(pairs, LABELS)
    assert (s.rows, s.correct, s.errors, s.labels) == (rows, correct, errors, labels)
    assert s.confusion == confusion
    assert s.accuracy == (correct / rows if rows else None)


def test_unseen_label_scores_zero() -> None:
    s = score([(P, P)], LABELS)
    assert s.per_label[N] == LabelScore(0.0, 0.0, 0.0, 0)
    assert s.macro_f1 == 1.0  # labels absent from the gold column do not drag the mean down


def test_no_known_labels_sorts_values() -> None:
    s = score([("b", "a"), ("a", "a"), ("c", "z")])
    assert s.labels == ("a", "b", "c", "z")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("  positive ", "positive"),
        ("", None),
        ("   ", None),
        (5, "5"),
        (5.0, "5"),
        (2.5, "2.5"),
        (float("nan"), None),
        (True, "true"),
        (False, "false"),
        ([1, "a"], '[1,"a"]'),
        ({"b": 1, "a": 2}, '{"a":2,"b":1}'),
    ],
)
def test_canonical(value: Any, expected: str | None) -> None:
    assert canonical(value) == expected


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(0.9, 1.0), (0.8, 0.4)], [True, True]),  # a trade-off: both on the front
        ([(0.9, 1.0), (0.9, 0.4)], [False, True]),  # as accurate and cheaper wins
        ([(0.7, 1.0), (0.8, 0.4)], [False, True]),  # better and cheaper dominates
        ([(0.8, 0.4), (0.8, 0.4)], [True, True]),  # ties dominate neither
        ([(None, 0.1), (0.5, None), (0.5, 1.0)], [False, False, True]),  # unknown: never on the front
    ],
)
def test_pareto_front(points: list[tuple[float | None, float | None]], front: list[bool]) -> None:
    assert pareto_front(points) == front


def _variant(name: str, accuracy: float | None, per_1k: float | None) -> Any:
    from pathlib import Path

    from pipeline.evaluation.results import VariantEvaluation

    pairs = [] if accuracy is None else [(P, P)] * round(accuracy * 10) + [(P, N)] * (10 - round(accuracy * 10))
    return VariantEvaluation(name, "m", score(pairs, LABELS), {}, None, 0.0, per_1k, None, 0, Path("j"), Path("c"), ())


@pytest.mark.parametrize(
    ("figures", "min_accuracy", "expected"),
    [
        ([("big", 0.9, 0.10), ("small", 0.8, 0.04)], None, "big"),  # no threshold: the most accurate
        ([("big", 0.9, 0.10), ("small", 0.8, 0.04)], 0.75, "small"),  # good enough and cheaper
        ([("big", 0.9, 0.10), ("small", 0.8, 0.04)], 0.85, "big"),
        ([("big", 0.9, 0.10), ("small", 0.8, 0.04)], 0.95, None),  # none is good enough
        ([("a", 0.8, 0.10), ("b", 0.8, 0.04)], None, "b"),  # a tie goes to the cheaper
        ([("a", 0.8, None), ("b", 0.8, 0.04)], 0.5, "b"),  # an unknown cost sorts last
    ],
)
def test_recommend(figures: list[tuple[str, float, float | None]], min_accuracy: float | None, expected: str) -> None:
    from pipeline.evaluation.evaluate import recommend

    assert recommend([_variant(*f) for f in figures], min_accuracy) == expected
