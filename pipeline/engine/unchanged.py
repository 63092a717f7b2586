"""What a rerun may skip because nothing it depends on has changed: the output write, the input's pass.

The journal's meta remembers two facts, each with the figures it was true for:

- ``Meta.OUTPUT_WRITTEN``: the output file was written from this input, job
  and journal (the output's size and modification time, every input file's,
  the job's settings, the journal's fingerprint), with so many rows and rows
  with an error. When every figure is still equal, a write would produce the
  same file: the run leaves it alone (rewriting 20,000 rows costs 0.2 s).
- ``Meta.SETTLED``: every input row was found done in the journal under its
  current prompt (the settled driver's pass), for this input, job and journal.
  When every figure is still equal, the same pass would find the same: a
  rerun of a finished job does not read the input again.

The journal's fingerprint (:meth:`Journal.fingerprint`) changes with every
row journaled, so anything else rewrites and rereads as before: an output
deleted, edited or moved (``--output``), an input file touched, added or
removed, a job setting changed, a row journaled (by this run, or by one that
crashed before writing), ``--fresh`` (a new journal), ``--retry-failed``
(remembered with the fact), an ``s3://`` path or data in memory (their state
is not cheap to read: always written, always read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.job import identity_hash
from pipeline.io import fs
from pipeline.store.meta import Meta

if TYPE_CHECKING:
    from pipeline.engine.plan import Plan
    from pipeline.store.journal import Journal

# Bump when the same journal and input would give another output file or another pass.
LAYOUT = 1


def unchanged_output(plan: Plan, journal: Journal) -> tuple[int, int] | None:
    """(Rows, rows with an error) of the output file when it is current; None when it must be written."""
    record = _matching(journal, Meta.OUTPUT_WRITTEN, _output_basis(plan, journal))
    return None if record is None else (int(record["rows"]), int(record["errors"]))


def record_output(plan: Plan, journal: Journal, rows: int, errors: int) -> None:
    """After a write: what it was made from (nothing for an output that is always written)."""
    if not plan.input_changed():  # an input edited since the run opened it: the write may mix both
        _record(journal, Meta.OUTPUT_WRITTEN, _output_basis(plan, journal), rows=rows, errors=errors)


def settled_before(plan: Plan, journal: Journal, retry_failed: bool) -> int | None:
    """The rows the last settled pass found done, when its figures still hold; else None (read the input)."""
    record = _matching(journal, Meta.SETTLED, _input_basis(plan, journal, retry_failed))
    return None if record is None else int(record["done"])


def record_settled(plan: Plan, journal: Journal, retry_failed: bool, done: int) -> None:
    """After a pass that found every row done: what it read."""
    if not plan.input_changed():  # an input edited during the pass: it may have read both
        _record(journal, Meta.SETTLED, _input_basis(plan, journal, retry_failed), done=done)


def _matching(journal: Journal, key: Meta, basis: dict[str, Any] | None) -> dict[str, Any] | None:
    stored = journal.get_meta(key)
    if basis is None or stored is None:
        return None
    try:
        record = json.loads(stored)
        if not isinstance(record, dict) or {name: record[name] for name in basis} != basis:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return record


def _record(journal: Journal, key: Meta, basis: dict[str, Any] | None, **facts: int) -> None:
    if basis is not None:
        journal.set_meta(key, json.dumps({**basis, **facts}))


def _output_basis(plan: Plan, journal: Journal) -> dict[str, Any] | None:
    output = plan.output_path
    basis = _input_basis(plan, journal, None)
    if basis is None or output is None or fs.is_uri(output):
        return None
    figures = _stat(Path(output))
    return None if figures is None else {**basis, "output": [str(Path(output).absolute()), figures]}


def _input_basis(plan: Plan, journal: Journal, retry_failed: bool | None) -> dict[str, Any] | None:
    source = plan.source.path
    # Data in memory has a ``path`` that only names it in messages: it exists nowhere.
    if fs.is_uri(source) or not Path(source).exists():
        return None
    files = [Path(path) for path in fs.parquet_files(source)]
    inputs = [[str(path.absolute()), _stat(path)] for path in files]
    if any(figures is None for _, figures in inputs):
        return None
    return {
        "layout": LAYOUT,
        "inputs": inputs,
        "job": identity_hash(plan.job.model_dump(mode="json")),
        "key_scheme": str(plan.key_scheme),
        "retry_failed": retry_failed,
        "journal": journal.fingerprint(),
    }


def _stat(path: Path) -> list[int] | None:
    """Size and modification time (a list, as it reads back from JSON)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]
