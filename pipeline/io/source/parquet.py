"""Parquet input: a file or a folder of files with the same columns (types widened losslessly)."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io import fs
from pipeline.io.fs import DataPath
from pipeline.io.source.common import Opened, check_forced, check_names, with_types


def parquet_files(path: DataPath) -> list[DataPath]:
    files = fs.parquet_files(path)
    if not files:
        raise InputError(f"[input] path: no .parquet files in folder {path}")
    return files


def open_parquet(path: DataPath, batch_size: int, forced: dict[str, pa.DataType]) -> Opened:
    files = parquet_files(path)
    schema = _folder_schema(files)
    check_names(path, schema.names, forced)
    rows = sum(pq.ParquetFile(fs.readable(f)).metadata.num_rows for f in files)
    if forced:
        _check_forced_parquet(files, forced, batch_size)
    final = with_types(schema, forced)
    return Opened("parquet", final, rows, schema, forced)


def _folder_schema(files: list[DataPath]) -> pa.Schema:
    """One schema for every file of a folder: the same columns, types equal or widened losslessly."""
    first = pq.read_schema(fs.readable(files[0]))
    fields = {f.name: f for f in first}
    origin = dict.fromkeys(first.names, files[0])
    for file in files[1:]:
        other = pq.read_schema(fs.readable(file))
        if set(other.names) != set(first.names):
            raise InputError(
                f"[input] path: {file} has columns {', '.join(other.names)} but {files[0]} has "
                f"{', '.join(first.names)}: every Parquet file of the folder needs the same columns"
            )
        for theirs in other:
            ours = fields[theirs.name]
            common = lossless_common_type(ours.type, theirs.type)
            if common is None:
                raise InputError(
                    f"[input] path: column {theirs.name!r} is {ours.type} in {origin[theirs.name]} but "
                    f"{theirs.type} in {file}: every Parquet file of the folder needs the same column types"
                )
            if not common.equals(ours.type) or (theirs.nullable and not ours.nullable):
                fields[theirs.name] = pa.field(theirs.name, common, nullable=ours.nullable or theirs.nullable)
    return pa.schema([fields[name] for name in first.names])


_INT_BITS = {pa.int8(): 8, pa.int16(): 16, pa.int32(): 32, pa.int64(): 64}
_UINT_BITS = {pa.uint8(): 8, pa.uint16(): 16, pa.uint32(): 32, pa.uint64(): 64}
_SIGNED = {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}
_FLOAT_BITS = {pa.float16(): 16, pa.float32(): 32, pa.float64(): 64}
_FLOAT_EXACT_INT_BITS = {16: 11, 32: 24, 64: 53}  # mantissa: integers held exactly
_UNITS = ("s", "ms", "us", "ns")


def lossless_common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """A type both ``a`` and ``b`` cast to without losing a value, or None."""
    if a.equals(b):
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    for pair in ((a, b), (b, a)):
        common = _widen(*pair)
        if common is not None:
            return common
    return None


def _widen(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """``_widen(a, b)``: the common type when ``a`` is the narrower kind, else None."""
    ints = {**_INT_BITS, **_UINT_BITS}
    if a in ints and b in ints:
        a_signed, b_signed = a in _INT_BITS, b in _INT_BITS
        if a_signed == b_signed:
            return a if ints[a] >= ints[b] else b
        if a_signed:  # a signed, b unsigned: a signed type twice as wide as b holds both
            bits = max(ints[a], 2 * ints[b])
            return _SIGNED.get(bits)
        return None  # the mirrored pair is tried by the caller
    if a in ints and b in _FLOAT_BITS:
        bits = ints[a] if a in _INT_BITS else ints[a] + 1
        return b if bits <= _FLOAT_EXACT_INT_BITS[_FLOAT_BITS[b]] + 1 else None
    if a in _FLOAT_BITS and b in _FLOAT_BITS:
        return a if _FLOAT_BITS[a] >= _FLOAT_BITS[b] else b
    if pa.types.is_string(a) and pa.types.is_large_string(b):
        return b
    if pa.types.is_binary(a) and pa.types.is_large_binary(b):
        return b
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b) and a.tz == b.tz:
        finer = max(_UNITS.index(a.unit), _UNITS.index(b.unit))
        return pa.timestamp(_UNITS[finer], a.tz)
    return None


def _check_forced_parquet(files: list[DataPath], forced: Mapping[str, pa.DataType], batch_size: int) -> None:
    """Read only the forced columns and check each converts (Parquet metadata cannot tell)."""
    for file in files:
        row = 1
        for batch in pq.ParquetFile(fs.readable(file)).iter_batches(batch_size=batch_size, columns=list(forced)):
            for name, kind in forced.items():
                check_forced(file, name, batch.column(name), kind, row, text=False)
            row += batch.num_rows
