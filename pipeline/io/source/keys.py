"""The id column's checks and each row's key in the journal."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.io.base import DataSource


def check_id_column(source: DataSource, id_column: str) -> int:
    """Fail before sending if the id column is missing, of an unusable type, has nulls or duplicates.

    Only the id column is read; returns the number of rows.
    """
    if id_column not in source.columns:
        raise InputError(
            f"[input] id_column: column {id_column!r} not in {source.path} (columns: {', '.join(source.columns)})"
        )
    kind = source.schema.field(id_column).type
    if pa.types.is_nested(kind) or pa.types.is_null(kind) or not _castable_to_text(kind):
        raise InputError(f"[input] id_column: column {id_column!r} has type {kind}; ids must be text or numbers")
    chunks = [batch.column(0) for batch in source.batches([id_column])]
    ids = pa.chunked_array(chunks, type=kind) if chunks else pa.chunked_array([], pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        _check_utf8_ids(source, id_column, ids)
    if ids.null_count:
        raise InputError(f"[input] id_column: column {id_column!r} has {ids.null_count} null values")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        empty = pc.sum(pc.equal(ids, "")).as_py() or 0
        if empty:
            raise InputError(f"[input] id_column: column {id_column!r} has {empty} empty values")
    counts = pc.value_counts(ids)
    # max() first: comparing with a Python scalar makes pyarrow import pandas.
    if len(counts) and pc.max(counts.field("counts")).as_py() > 1:
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        example = repeated[0]["values"].as_py()
        raise InputError(
            f"[input] id_column: column {id_column!r} has {len(repeated)} duplicated values (e.g. {example!r})"
        )
    return len(ids)


def _castable_to_text(kind: pa.DataType) -> bool:
    """Journal keys are the ids as text: the type must have a cast to string."""
    try:
        pa.nulls(0, kind).cast(pa.string())  # pa.array([]) would import pandas (0.5 s)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False
    return True


def _check_utf8_ids(source: DataSource, id_column: str, ids: pa.ChunkedArray) -> None:
    """Binary ids become journal keys as text: they must be UTF-8."""
    try:
        ids.cast(pa.string())
        return
    except pa.ArrowInvalid:
        pass
    for row, value in enumerate(ids.to_pylist(), start=1):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(
                f"[input] id_column: column {id_column!r} row {row} of {source.path} holds bytes that are "
                "not UTF-8 text; ids must be text or numbers"
            ) from None


def row_keys(batch: pa.RecordBatch, id_column: str | None, offset: int) -> list[str]:
    """Each row's key in the journal: its id as text (an int64 7 is "7"), or its row number."""
    if id_column is None:
        return [str(i) for i in range(offset, offset + batch.num_rows)]
    return pc.cast(batch.column(id_column), pa.string()).to_pylist()
