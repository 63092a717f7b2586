"""``pipeline.evaluate``: the evaluation from Python, on the same engine as ``pipeline eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.api import JobLike, _run_sync, load
from pipeline.errors import JobError
from pipeline.evaluation.evaluate import aevaluate_job
from pipeline.evaluation.results import EvalOptions, Evaluation


async def aevaluate(
    data: Any = None,
    job: JobLike | None = None,
    *,
    gold: str,
    sample: int | None = None,
    seed: int = 0,
    field: str | None = None,
    journal: str | Path | None = None,
    min_accuracy: float | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate in the running event loop; see :func:`evaluate`."""
    if job is None:
        raise JobError("job: pass a job file path, a dict shaped like the TOML file, or a pipeline.Job")
    options = EvalOptions(
        gold=gold,
        sample=sample,
        seed=seed,
        field=field,
        quiet=not progress,
        notebook=True,
        min_accuracy=min_accuracy,
    )
    return await aevaluate_job(load(job), options, data=data, journal=Path(journal) if journal is not None else None)


def evaluate(
    data: Any = None,
    job: JobLike | None = None,
    *,
    gold: str,
    sample: int | None = None,
    seed: int = 0,
    field: str | None = None,
    journal: str | Path | None = None,
    min_accuracy: float | None = None,
    progress: bool = True,
) -> Evaluation:
    """Answer the rows that have a gold label (all, or a seeded sample of ``sample``) and score them.

    ``data`` and ``job`` are as for :func:`pipeline.run`. ``gold`` names the
    column with the right answers; ``field`` the schema property to compare
    (default: ``label``, or the schema's only property). The answers are
    journaled like a run's, so a later :func:`pipeline.run` of the same job
    pays nothing for them; with ``[[variants]]`` every variant answers the
    same rows in its own journal. Returns an :class:`Evaluation`: accuracy,
    per-label scores, confusion matrix, costs, one entry per variant in
    ``results``, and the paths of the confusion-matrix PNG and the HTML report.
    """
    call = aevaluate(
        data,
        job,
        gold=gold,
        sample=sample,
        seed=seed,
        field=field,
        journal=journal,
        min_accuracy=min_accuracy,
        progress=progress,
    )
    result: Evaluation = _run_sync(call)
    return result
