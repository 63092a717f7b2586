"""Input datasets read as a stream of Arrow record batches.

Memory stays bounded however large the file: nothing here materialises the
whole dataset. Opening a source checks what is cheap to check before the first
request: every file of a Parquet folder has the same columns and compatible
types; a CSV or JSON Lines file is valid UTF-8 throughout and its column types
are consistent (this is the pass that counts its rows). Whatever is found later,
while streaming, is a :class:`~pipeline.errors.RecordError` naming the file and
row.

CSV columns are typed losslessly: a column becomes int64, float64, bool or
timestamp only when every value converts and converts back to exactly its text,
so ``007``, ``1.50``, ``+3`` or ``1e3`` keep a column text and whatever is in
the file reaches the prompt unchanged. ``[input] dtypes`` forces a type.

A text column of plain decimal numbers that only fail the round trip by their
spelling (``3.0``, ``1.50``, ``1e3``) still reaches the prompt as its text, but
is marked (field metadata ``OUTPUT_TYPE``) to be written to the output as
float64, the type pandas gives it: ``df.price.mean()`` works on the output.
Text that becomes a number only by changing it (``007``, ``+3``) stays text,
and so do the columns named in ``keep_text`` (the id column).
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import InputError, RecordError
from pipeline.io import fs
from pipeline.io.base import DataSource
from pipeline.io.fs import DataPath

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# What ``[input] dtypes`` may force a column to.
DTYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us"),
}
# The types a CSV column may become, most specific first: the first one every
# value of the column round-trips through wins.
_CSV_CANDIDATES: tuple[pa.DataType, ...] = (
    pa.int64(),
    pa.float64(),
    pa.bool_(),
    pa.timestamp("s"),
    pa.timestamp("ms"),
    pa.timestamp("us"),
    pa.timestamp("ns"),
)
T = TypeVar("T")
# Field metadata: the type the output gives a column that is text for the prompt.
OUTPUT_TYPE = b"pipeline.output_type"
# Plain decimal notation pandas reads as a float, without a sign or leading zeros to lose.
_DECIMAL = r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?$"
_NOT_INTEGER = r"[.eE]"
# What readers raise for a file they cannot read (bad bytes in a header are a UnicodeDecodeError).
_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError, UnicodeDecodeError)
_BLOCK = 4 << 20


@dataclass(frozen=True)
class Source:
    """A dataset on disk, with its format and column types, read in batches."""

    path: DataPath
    format: str
    schema: pa.Schema
    """The columns as :meth:`batches` yields them."""
    batch_size: int = 8192
    rows: int | None = None
    """The row count, when opening already learnt it."""
    read_schema: pa.Schema | None = None
    """The columns as the reader sees them, before ``casts`` (JSONL and Parquet)."""
    casts: Mapping[str, pa.DataType] = field(default_factory=dict)
    """Columns converted while reading: CSV types found losslessly, forced dtypes."""

    @classmethod
    def open(
        cls,
        path: DataPath,
        batch_size: int = 8192,
        dtypes: Mapping[str, str] | None = None,
        keep_text: Collection[str] = (),
    ) -> Source:
        """Open and check a dataset; every problem is a one-line InputError.

        ``keep_text``: CSV columns the output keeps as text even when they hold decimals (ids).
        """
        try:
            found, folder = fs.exists(path), fs.is_dir(path)
        except OSError as exc:  # object storage: credentials, endpoint, permissions
            raise InputError(f"[input] path: cannot reach {path}: {_one_line(exc)}") from None
        if not found:
            raise InputError(f"[input] path: file not found: {path}")
        fmt = "parquet" if folder else FORMATS.get(fs.suffix(path))
        if fmt is None:
            raise InputError(f"[input] path: {path}: use .parquet, .csv, .jsonl or a folder of Parquet files")
        forced = _forced_types(dtypes or {})
        try:
            if fmt == "parquet":
                return _open_parquet(path, batch_size, forced)
            if fmt == "csv":
                return _open_csv(path, batch_size, forced, frozenset(keep_text))
            return _open_jsonl(path, batch_size, forced)
        except _READ_ERRORS as exc:
            raise InputError(f"{path}: cannot read {fmt}: {_one_line(exc)}") from None

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield record batches in file order.

        A record that cannot be read or converted is a RecordError naming the
        file and the row (counted from 1 within that file) where reading stopped.
        """
        cursor = _Cursor(self.path)
        try:
            for batch in self._raw_batches(columns, cursor):
                if batch.num_rows:
                    cursor.row += batch.num_rows
                    yield batch
        except _READ_ERRORS as exc:
            problem = f"cannot read {self.format}: {_one_line(exc)}"
            raise RecordError(cursor.file, cursor.row + 1, problem) from None

    def _raw_batches(self, columns: list[str] | None, cursor: _Cursor) -> Iterator[pa.RecordBatch]:
        names = columns or self.schema.names
        if self.format == "parquet":
            yield from self._parquet_batches(names, cursor)
        elif self.format == "csv":
            yield from self._csv_batches(names)
        else:
            yield from self._jsonl_batches(names)

    def _convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Apply ``casts`` to the columns of ``batch`` that have one."""
        names = batch.schema.names
        if not any(name in self.casts for name in names):
            return batch
        # CSV columns are read as text: an empty cell is a missing value, not a parse error.
        convert = _cast_text if self.format == "csv" else _cast
        arrays = [
            convert(column, self.casts[name]) if name in self.casts else column
            for name, column in zip(names, batch.columns, strict=True)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([self.schema.field(n) for n in names]))

    def _parquet_batches(self, names: list[str], cursor: _Cursor) -> Iterator[pa.RecordBatch]:
        read_schema = self.read_schema or self.schema
        target = pa.schema([read_schema.field(n) for n in names])
        for file in _parquet_files(self.path):
            cursor.start(file)
            # Buffered, un-prebuffered reads decode a large row group page by page
            # instead of holding its whole column chunks in memory (410 MB -> 160 MB
            # for a 1,000,000-row, 260 MB file in one row group).
            parquet = pq.ParquetFile(fs.readable(file), pre_buffer=False, buffer_size=1 << 20)
            for batch in parquet.iter_batches(batch_size=self.batch_size, columns=names):
                # Files of a folder may order (or widen) their columns differently.
                yield self._convert(batch if batch.schema == target else batch.select(names).cast(target))

    def _csv_batches(self, names: list[str]) -> Iterator[pa.RecordBatch]:
        # Read as text, then convert with the very function that chose the types,
        # so what the first pass accepted is what is read.
        reader = _csv_reader(self.path, names)
        for batch in _rebatch(reader, self.batch_size):
            yield self._convert(batch)

    def _jsonl_batches(self, names: list[str]) -> Iterator[pa.RecordBatch]:
        # An explicit schema from the first pass: the reader would otherwise infer
        # types from its first block only and fail on a column that starts null.
        parse = pajson.ParseOptions(explicit_schema=self.read_schema or self.schema)
        reader = pajson.open_json(
            fs.readable(self.path), read_options=pajson.ReadOptions(block_size=_BLOCK), parse_options=parse
        )
        for batch in _rebatch(reader, self.batch_size):
            yield self._convert(batch.select(names))

    def count_rows(self) -> int:
        """Row count: known from opening, or from Parquet metadata."""
        if self.rows is not None:
            return self.rows
        return sum(batch.num_rows for batch in self.batches(self.columns[:1]))


@dataclass
class _Cursor:
    """Where streaming is: the file being read and the rows yielded from it."""

    file: DataPath
    row: int = 0

    def start(self, file: DataPath) -> None:
        self.file, self.row = file, 0


def _forced_types(dtypes: Mapping[str, str]) -> dict[str, pa.DataType]:
    forced = {}
    for column, name in dtypes.items():
        if name not in DTYPES:
            raise InputError(f"[input] dtypes: {column} = {name!r}: use one of {', '.join(DTYPES)}")
        forced[column] = DTYPES[name]
    return forced


def _check_names(path: DataPath, names: list[str], forced: Mapping[str, pa.DataType]) -> None:
    """Column names are unique, and every forced dtype names a column."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears twice; rename one of them")
        seen.add(name)
    for column in forced:
        if column not in seen:
            raise InputError(f"[input] dtypes: column {column!r} not in {path} (columns: {', '.join(names)})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _rebatch(reader: pa.RecordBatchReader, size: int) -> Iterator[pa.RecordBatch]:
    """CSV/JSON readers yield blocks of any size: slice them to ``size`` rows."""
    for block in reader:
        for start in range(0, block.num_rows, size):
            yield block.slice(start, size)


def _check_forced(
    path: DataPath, column: str, values: pa.Array, kind: pa.DataType, first_row: int, *, text: bool
) -> None:
    """Every value of ``column`` converts to its forced type, or name the first that does not."""
    convert = _cast_text if text else _cast
    try:
        convert(values, kind)
        return
    except _READ_ERRORS:
        pass
    for i, value in enumerate(values.to_pylist()):
        try:
            convert(pa.array([value], values.type), kind)
        except _READ_ERRORS:
            raise InputError(
                f"[input] dtypes: column {column!r} row {first_row + i} of {path}: {value!r} is not {kind}"
            ) from None


def _cast(values: pa.Array, kind: pa.DataType) -> pa.Array:
    return values.cast(kind)


# ---------------------------------------------------------------------- Parquet


def _parquet_files(path: DataPath) -> list[DataPath]:
    files = fs.parquet_files(path)
    if not files:
        raise InputError(f"[input] path: no .parquet files in folder {path}")
    return files


def _open_parquet(path: DataPath, batch_size: int, forced: dict[str, pa.DataType]) -> Source:
    files = _parquet_files(path)
    schema = _folder_schema(files)
    _check_names(path, schema.names, forced)
    rows = sum(pq.ParquetFile(fs.readable(f)).metadata.num_rows for f in files)
    if forced:
        _check_forced_parquet(files, forced, batch_size)
    final = _with_types(schema, forced)
    return Source(path, "parquet", final, batch_size, rows, schema, forced)


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
                _check_forced(file, name, batch.column(name), kind, row, text=False)
            row += batch.num_rows


def _with_types(schema: pa.Schema, types: Mapping[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(f.name, types[f.name]) if f.name in types else f for f in schema])


# -------------------------------------------------------------------------- CSV

_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def _csv_reader(path: DataPath, columns: list[str] | None = None) -> pa.RecordBatchReader:
    """Every column as text, empty cells as empty strings."""
    header = pacsv.open_csv(fs.readable(path), parse_options=_CSV_PARSE).schema.names
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in header},
        strings_can_be_null=False,
        include_columns=columns,
    )
    return pacsv.open_csv(
        fs.readable(path),
        read_options=pacsv.ReadOptions(block_size=_BLOCK),
        parse_options=_CSV_PARSE,
        convert_options=convert,
    )


def _open_csv(
    path: DataPath, batch_size: int, forced: dict[str, pa.DataType], keep_text: frozenset[str] = frozenset()
) -> Source:
    """One pass over the whole file: it counts the rows, checks the encoding and types the columns."""
    header = _csv_step(path, 0, lambda: pacsv.open_csv(fs.readable(path), parse_options=_CSV_PARSE).schema.names)
    _check_names(path, header, forced)
    typers = {name: _ColumnTyper(name, forced.get(name)) for name in header}
    rows = 0
    reader = _csv_step(path, 0, lambda: _csv_reader(path))  # reads the first block already
    while (block := _csv_step(path, rows, lambda: _next_or_none(reader))) is not None:
        for name, column in zip(block.schema.names, block.columns, strict=True):
            typers[name].observe(path, column, rows + 1)
        rows += block.num_rows
    if rows == 0:
        raise InputError(f"{path}: no data")
    types = {name: typer.result for name, typer in typers.items() if not pa.types.is_string(typer.result)}
    schema = pa.schema([_csv_field(name, typers[name], name in keep_text) for name in header])
    return Source(path, "csv", schema, batch_size, rows, None, types)


def _csv_field(name: str, typer: _ColumnTyper, keep_text: bool) -> pa.Field:
    """The column as read (its prompt text), marked float64 for the output when pandas would read it so."""
    if typer.decimal and not keep_text and pa.types.is_string(typer.result):
        return pa.field(name, pa.string(), metadata={OUTPUT_TYPE: b"float64"})
    return pa.field(name, typer.result)


def _csv_step(path: DataPath, rows: int, step: Callable[[], T]) -> T:
    """Run one read of the first pass; a reader error names the line (bad UTF-8) or the rows read."""
    try:
        return step()
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        _raise_if_not_utf8(path, exc)
        where = f" after row {rows}" if rows else ""
        raise InputError(f"{path}: cannot read csv{where}: {_one_line(exc)}") from None


def _next_or_none(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


class _ColumnTyper:
    """Narrows down the type of one CSV column, block by block."""

    def __init__(self, name: str, forced: pa.DataType | None) -> None:
        self.name = name
        self.forced = forced
        self.candidates = [] if forced is not None else list(_CSV_CANDIDATES)
        self.seen_value = False
        # Every value plain decimal notation, at least one not an integer (``3.0``, ``1.50``).
        self.all_decimal = forced is None
        self.fractional = False

    def observe(self, path: DataPath, column: pa.Array, first_row: int) -> None:
        if self.forced is not None:
            if not pa.types.is_string(self.forced):
                _check_forced(path, self.name, column, self.forced, first_row, text=True)
            return
        if not self.candidates:
            return
        values = column.filter(pc.not_equal(column, ""))
        if len(values) == 0:
            return
        self.seen_value = True
        self.candidates = [kind for kind in self.candidates if _round_trips(values, kind)]
        if self.all_decimal:
            self.all_decimal = bool(pc.all(pc.match_substring_regex(values, _DECIMAL)).as_py())
            self.fractional = self.fractional or bool(pc.any(pc.match_substring_regex(values, _NOT_INTEGER)).as_py())

    @property
    def decimal(self) -> bool:
        """Text the prompt must see as written, which pandas reads as float64."""
        return self.seen_value and self.all_decimal and self.fractional

    @property
    def result(self) -> pa.DataType:
        if self.forced is not None:
            return self.forced
        if self.seen_value and self.candidates:
            return self.candidates[0]
        return pa.string()


def _round_trips(values: pa.Array, kind: pa.DataType) -> bool:
    """True when every value converts to ``kind`` and back to exactly its text.

    The way back is the cast that renders the value into a prompt, so a typed
    column renders exactly what the file holds.
    """
    try:
        back = _cast(_cast(values, kind), pa.string())
    except _READ_ERRORS:
        return False
    return bool(pc.all(pc.equal(back, values)).as_py())


def _cast_text(column: pa.Array, kind: pa.DataType) -> pa.Array:
    """CSV text to ``kind``: an empty cell becomes null."""
    empty = pc.equal(column, "")
    return pc.if_else(empty, pa.scalar(None, pa.string()), column).cast(kind)


def _raise_if_not_utf8(path: DataPath, exc: Exception) -> None:
    """Turn a reader's bare "invalid UTF8" into the file's line and byte."""
    text = str(exc).lower()
    if not isinstance(exc, UnicodeDecodeError) and "utf8" not in text and "utf-8" not in text:
        return
    found = first_invalid_utf8(path)
    if found is None:
        return
    line, byte = found
    raise InputError(
        f"{path}: line {line}: byte 0x{byte:02x} is not valid UTF-8; save the file as UTF-8 and rerun"
    ) from None


def first_invalid_utf8(path: DataPath) -> tuple[int, int] | None:
    """(line number from 1, the offending byte) of the first invalid UTF-8 in a file, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with fs.open_binary(path) as handle:
        while chunk := handle.read(_BLOCK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return line + chunk.count(b"\n", 0, exc.start), chunk[exc.start]
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line, 0
    return None


# -------------------------------------------------------------------- JSON Lines


def _open_jsonl(path: DataPath, batch_size: int, forced: dict[str, pa.DataType]) -> Source:
    """One pass over the whole file, a block at a time: encoding, row count, one schema."""
    schema: pa.Schema | None = None
    rows = 0
    line = 1  # the first line of the current block
    with fs.open_binary(path) as handle:
        while chunk := handle.read(_BLOCK):
            chunk += handle.readline()  # end the block on a line boundary
            _check_utf8_block(path, chunk, line)
            if chunk.strip():
                try:
                    table = pajson.read_json(io.BytesIO(chunk))
                except pa.ArrowInvalid as exc:
                    raise _jsonl_error(path, exc, line, line + chunk.count(b"\n")) from None
                schema = _merge_block(path, schema, table, line)
                rows += table.num_rows
                for name, kind in forced.items():
                    if name in table.column_names:
                        values = table.column(name).combine_chunks()
                        _check_forced(path, name, values, kind, rows - table.num_rows + 1, text=False)
            line += chunk.count(b"\n")
    if schema is None:
        raise InputError(f"{path}: no data")
    _check_names(path, schema.names, forced)
    return Source(path, "jsonl", _with_types(schema, forced), batch_size, rows, schema, forced)


# The JSON reader's message when a field's type changes inside one block.
_TYPE_CHANGE = re.compile(r"Column\((?P<field>.*?)\) changed from (?P<old>\w+) to (?P<new>\w+) in row (?P<row>\d+)")


def _jsonl_error(path: DataPath, exc: pa.ArrowInvalid, first: int, last: int) -> InputError:
    """A JSON reader error as one line naming the file's line (the reader counts rows per block)."""
    found = _TYPE_CHANGE.search(str(exc))
    if found is None:
        return InputError(f"{path}: lines {first}-{last}: {_one_line(exc)}")
    name = found["field"].lstrip("/")
    return InputError(
        f"{path}: line {first + int(found['row'])} (or near it): field {name!r} changed from "
        f"{found['old']} to {found['new']}; give the field one type on every line"
    )


def _check_utf8_block(path: DataPath, chunk: bytes, line: int) -> None:
    """JSON Lines must be UTF-8 (the JSON reader does not check)."""
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line + chunk.count(b"\n", 0, exc.start)
        raise InputError(
            f"{path}: line {at}: byte 0x{chunk[exc.start]:02x} is not valid UTF-8; save the file as UTF-8 and rerun"
        ) from None


def _merge_block(path: DataPath, schema: pa.Schema | None, table: pa.Table, line: int) -> pa.Schema:
    """Unify a block's inferred types with the file's so far, naming the line where a type changes."""
    if schema is None:
        return table.schema
    try:
        return pa.unify_schemas([schema, table.schema], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    for block_field in table.schema:
        if block_field.name in schema.names and not _unifiable(schema.field(block_field.name).type, block_field.type):
            before = schema.field(block_field.name).type
            row = _first_non_null(table.column(block_field.name))
            raise InputError(
                f"{path}: line {line + row} (or near it): field {block_field.name!r} is {block_field.type} "
                f"here but {before} in earlier lines; give the field one type on every line"
            )
    raise InputError(f"{path}: from line {line}: field types differ from earlier lines")


def _unifiable(a: pa.DataType, b: pa.DataType) -> bool:
    try:
        pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def _first_non_null(column: pa.ChunkedArray) -> int:
    valid = pc.is_valid(column)
    index = pc.index(valid, True).as_py()
    return max(index, 0)


# --------------------------------------------------------------------- ids and keys


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
