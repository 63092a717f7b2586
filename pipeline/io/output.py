"""The output writer: input rows plus result columns, written atomically.

The output is assembled by streaming: one input batch at a time is joined
with its rows from the journal and appended as a row group, so memory stays
bounded for any number of rows. It is written to a temporary file beside the
target and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.journal import RESULT_FIELDS, Journal

# The documented result columns and their Arrow types. Types are fixed, so a
# column keeps its type even when every value is null.
RESULT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("completion", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("model", pa.string()),
    ("provider", pa.string()),
    ("generation_id", pa.string()),
    ("attempts", pa.int64()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),
]
NOT_RUN = "not_run: the run stopped before this row was sent; rerun the job to finish it"


def output_schema(input_schema: pa.Schema, structured: Any | None) -> pa.Schema:
    fields = list(input_schema)
    fields += [pa.field(name, kind) for name, kind in RESULT_COLUMNS]
    if structured is not None:
        fields += [pa.field(name, kind) for name, kind in structured.columns]
    return pa.schema(fields)


# Where each output column sits in a journal row tuple (derived from JournalRow, never hard-coded).
_POSITIONS = [RESULT_FIELDS.index(name) for name, _ in RESULT_COLUMNS]
_HASH, _PARSED = RESULT_FIELDS.index("prompt_hash"), RESULT_FIELDS.index("parsed")
# A row never journaled, or journaled for a prompt that has since changed.
_MISSING: tuple[Any, ...] = tuple(NOT_RUN if name == "error" else None for name in RESULT_FIELDS)


def result_arrays(
    keys: list[str], hashes: list[str] | None, journal: Journal, structured: Any | None
) -> list[pa.Array]:
    """The result columns for one batch, in the batch's row order.

    With ``hashes``, a journaled row whose prompt hash differs counts as not run.
    """
    found = journal.result_tuples(keys)
    rows = []
    for i, key in enumerate(keys):
        row = found.get(key)
        if row is None or (hashes is not None and row[_HASH] != hashes[i]):
            row = _MISSING
        rows.append(row)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(RESULT_FIELDS)
    arrays = [pa.array(columns[j], type=kind) for j, (_, kind) in zip(_POSITIONS, RESULT_COLUMNS, strict=True)]
    if structured is not None:
        arrays += structured.to_arrays([json.loads(p) if p else None for p in columns[_PARSED]])
    return arrays


def write_output(
    path: Path,
    schema: pa.Schema,
    batches: Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]],
    journal: Journal,
    structured: Any | None,
) -> tuple[int, int]:
    """Stream (input batch, keys, prompt hashes) into ``path`` atomically.

    Returns the number of rows written and how many of them carry an error.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The run lock is held, so a temporary file left here is from a killed run.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = errors = 0
    error_index = schema.get_field_index("error")  # unique: inputs may not use result names
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch, keys, hashes in batches:
                arrays = list(batch.columns) + result_arrays(keys, hashes, journal, structured)
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                rows += batch.num_rows
                errors += len(arrays[error_index]) - arrays[error_index].null_count
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return rows, errors


def write_table(
    schema: pa.Schema,
    batches: Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]],
    journal: Journal,
    structured: Any | None,
) -> tuple[pa.Table, int]:
    """The same rows as :func:`write_output`, assembled in memory (the Python API without an output file)."""
    out: list[pa.RecordBatch] = []
    errors = 0
    error_index = schema.get_field_index("error")
    for batch, keys, hashes in batches:
        arrays = list(batch.columns) + result_arrays(keys, hashes, journal, structured)
        out.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
        errors += len(arrays[error_index]) - arrays[error_index].null_count
    return pa.Table.from_batches(out, schema=schema), errors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
