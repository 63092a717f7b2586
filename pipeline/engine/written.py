"""Whether the output file still holds what a write would put there now, so a rerun can leave it alone.

After writing the output, the run records in the journal's meta
(``Meta.OUTPUT_WRITTEN``) what that file was made from: the output's path,
size and modification time, every input file's size and modification time,
the job's settings, the journal's fingerprint (rows, last row id, the sum of
their write times, the money spent) and the rows and errors the file holds.
The next run compares the same figures before it writes: when every one is
equal, nothing the output is made of has changed since, and rewriting 20,000
rows (a fifth of a second) would produce the same file.

Anything else is rewritten as before: an output deleted, edited or moved
(``--output``), an input file touched, added or removed, a job setting
changed, a row journaled (by this run, or by one that crashed before writing),
``--fresh``, an ``s3://`` path or data in memory (their state is not cheap to
read, so they are always written).
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

# Bump when the writer puts something else in the file for the same journal and input.
OUTPUT_LAYOUT = 1


def unchanged_output(plan: Plan, journal: Journal) -> tuple[int, int] | None:
    """(Rows, rows with an error) of the output file when it is current; None when it must be written."""
    basis = _basis(plan, journal)
    stored = journal.get_meta(Meta.OUTPUT_WRITTEN)
    if basis is None or stored is None:
        return None
    try:
        record = json.loads(stored)
        written = {key: record[key] for key in basis}
        rows, errors = int(record["rows"]), int(record["errors"])
    except (ValueError, KeyError, TypeError):
        return None
    return (rows, errors) if written == basis else None


def record_output(plan: Plan, journal: Journal, rows: int, errors: int) -> None:
    """After a write: what it was made from (or nothing, for an output that is always written)."""
    basis = _basis(plan, journal)
    if basis is not None:
        journal.set_meta(Meta.OUTPUT_WRITTEN, json.dumps({**basis, "rows": rows, "errors": errors}))


def _basis(plan: Plan, journal: Journal) -> dict[str, Any] | None:
    output, source = plan.output_path, plan.source.path
    # Data in memory has a ``path`` that only names it in messages: it exists nowhere.
    if output is None or fs.is_uri(output) or fs.is_uri(source) or not Path(source).exists():
        return None
    files = [Path(path) for path in fs.parquet_files(source)]
    stats = [_stat(path) for path in (Path(output), *files)]
    if any(figures is None for figures in stats):
        return None
    return {
        "layout": OUTPUT_LAYOUT,
        "output": [str(Path(output).absolute()), stats[0]],
        "inputs": [[str(path.absolute()), figures] for path, figures in zip(files, stats[1:], strict=True)],
        "job": identity_hash(plan.job.model_dump(mode="json")),
        "key_scheme": str(plan.key_scheme),
        "journal": journal.fingerprint(),
    }


def _stat(path: Path) -> list[int] | None:
    """Size and modification time (a list, as it reads back from JSON)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]
