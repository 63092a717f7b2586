"""A structured property's column: its JSON type, its Arrow type, and the tree for nested values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.errors import JobError

SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
SUPPORTED_TYPES = (*SCALAR_TYPES, "array", "object")
# Keywords that make a value's type depend on the data: a column needs one type.
COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "if", "$ref", "$dynamicRef")
SUPPORTED_TYPES = (*SCALAR_TYPES, "array", "object")
# Keywords that make a value's type depend on the data: a column needs one type.
COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "if", "$ref", "$dynamicRef")
# Keywords that make a value's type depend on the data: a column needs one type.
COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "if", "$ref", "$dynamicRef")


@dataclass(frozen=True)
class Node:
    """One value's shape: its JSON type, Arrow type and children (for conversion)."""

    kind: str
    arrow: pa.DataType
    items: Node | None = None
    fields: tuple[tuple[str, Node], ...] = ()


def compile_property(prop: Any, path: str, source: str) -> Node:
    """One property's schema → its column type tree; JobError naming the property path."""
    where = f"{source}: property '{path}'"
    if not isinstance(prop, dict):
        raise JobError(f"{where} must be a schema object")
    combinator = next((key for key in COMBINATORS if key in prop), None)
    if combinator is not None:
        raise JobError(
            f'{where} uses "{combinator}", which has no single column type; give one "type" '
            '(for a nullable value: "type": ["string", "null"])'
        )
    kind = single_type(prop.get("type"), where)
    if kind in SCALAR_TYPES:
        return Node(kind, SCALAR_TYPES[kind])
    if kind == "array":
        if not isinstance(prop.get("items"), dict):
            raise JobError(f'{where} is an array without an "items" schema')
        items = compile_property(prop["items"], f"{path}[]", source)
        return Node(kind, pa.list_(items.arrow), items=items)
    properties = prop.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise JobError(f'{where} is an object without "properties"')
    fields = tuple((name, compile_property(sub, f"{path}.{name}", source)) for name, sub in properties.items())
    struct = pa.struct([pa.field(name, node.arrow) for name, node in fields])
    return Node(kind, struct, fields=fields)


def single_type(declared: Any, where: str) -> str:
    """``"T"`` or ``["T", "null"]`` → ``"T"``; anything else → JobError."""
    if declared is None:
        raise JobError(f'{where} has no "type"')
    names = [declared] if isinstance(declared, str) else declared
    non_null = [name for name in names if name != "null"]
    if len(non_null) != 1:
        raise JobError(f'{where} must have exactly one "type" besides "null", got {json.dumps(declared)}')
    if non_null[0] not in SUPPORTED_TYPES:
        raise JobError(f'{where} has type "{non_null[0]}"; supported: {", ".join(SUPPORTED_TYPES)}')
    return non_null[0]
