"""JSON Lines input: one pass, a block at a time, checks the encoding and unifies the field types."""

from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from pipeline.errors import InputError
from pipeline.io import fs
from pipeline.io.fs import DataPath
from pipeline.io.source.common import BLOCK, Opened, check_forced, check_names, one_line, with_types


def open_jsonl(path: DataPath, batch_size: int, forced: dict[str, pa.DataType]) -> Opened:
    """One pass over the whole file, a block at a time: encoding, row count, one schema."""
    schema: pa.Schema | None = None
    rows = 0
    line = 1  # the first line of the current block
    with fs.open_binary(path) as handle:
        while chunk := handle.read(BLOCK):
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
                        check_forced(path, name, values, kind, rows - table.num_rows + 1, text=False)
            line += chunk.count(b"\n")
    if schema is None:
        raise InputError(f"{path}: no data")
    check_names(path, schema.names, forced)
    return Opened("jsonl", with_types(schema, forced), rows, schema, forced)


# The JSON reader's message when a field's type changes inside one block.
_TYPE_CHANGE = re.compile(r"Column\((?P<field>.*?)\) changed from (?P<old>\w+) to (?P<new>\w+) in row (?P<row>\d+)")


def _jsonl_error(path: DataPath, exc: pa.ArrowInvalid, first: int, last: int) -> InputError:
    """A JSON reader error as one line naming the file's line (the reader counts rows per block)."""
    found = _TYPE_CHANGE.search(str(exc))
    if found is None:
        return InputError(f"{path}: lines {first}-{last}: {one_line(exc)}")
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
