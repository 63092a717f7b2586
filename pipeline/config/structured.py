"""Structured outputs: labels or a JSON schema → request fields, reply parsing, typed columns.

A job can ask the model for one of a fixed set of labels (``[prompt] labels``)
or for an object described by a JSON schema (``[prompt] json_schema`` inline,
or ``[prompt] json_schema_file``). :class:`StructuredSpec` turns either into

* the ``response_format`` (and routing) fields merged into every request,
* a parser that turns a reply into values keyed by output column,
* typed Arrow arrays, one per top-level property, for the output file.

Everything that can be wrong with the job's settings is found in
:meth:`StructuredSpec.from_job`, before any request is sent; everything that
can be wrong with a reply is a one-line ``invalid reply: ...`` message that the
runner records for that row.

Strict mode
-----------
OpenAI-style strict mode (also used through OpenRouter and by Mistral) only
accepts schemas where every object has ``additionalProperties: false`` and
lists every property in ``required``. The schema we send is rewritten to meet
that, so users can write the short natural form:

* ``additionalProperties`` missing → set to ``false``. Set to anything else →
  :class:`JobError` (extra keys would have no column and strict mode rejects it).
* ``required`` missing → every property becomes required, types unchanged.
* ``required`` present but listing only some properties → the unlisted ones are
  made nullable (``"type": [T, "null"]``, with ``null`` added to any ``enum``)
  and then required. This is the translation OpenAI documents for optional
  fields: the model writes ``null`` instead of leaving the key out, and the
  column holds a null.

Replies are validated against this rewritten schema, the one the model saw.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from pipeline.errors import JobError
from pipeline.io.output import RESULT_COLUMNS

__all__ = ["StructuredSpec"]

# Longest error message recorded for a row: the error column is for humans
# scanning a table, the full reply is kept in the completion column anyway.
_MAX_ERROR_CHARS = 200
# How much of a bad label to quote back: a chatty model can answer a paragraph.
_MAX_QUOTED_CHARS = 40

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_SUPPORTED_TYPES = (*_SCALAR_TYPES, "array", "object")
# Keywords that make a value's type depend on the data: a column needs one type.
_COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "if", "$ref", "$dynamicRef")

# A Markdown code fence, any language tag (```json, ```JSON, plain ```).
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_QUOTES = "\"'`"

# finish_reason values meaning the reply was cut off. Mistral's own API says
# "model_length" when the context window, not max_tokens, ran out.
_TRUNCATED = {
    "length": "truncated at max_tokens",
    "model_length": "truncated at the model's context length",
}

_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


_LABELS_KEY = "`[prompt] labels`"
_SCHEMA_KEY = "`[prompt] json_schema`"
_SCHEMA_FILE_KEY = "`[prompt] json_schema_file`"


class _BadReply(Exception):
    """A reply that does not fit the schema; the message becomes the row's error."""


@dataclass(frozen=True)
class _Node:
    """One value's shape: its JSON type, Arrow type and children (for conversion)."""

    kind: str
    arrow: pa.DataType
    items: _Node | None = None
    fields: tuple[tuple[str, _Node], ...] = ()


class StructuredSpec:
    """What the job asks the model to return: labels or a JSON schema.

    Attributes:
        schema: the JSON schema sent to the provider (strict form, see the
            module docstring). Treat as read-only.
        columns: output columns as ``(name, Arrow type)``, names already
            prefixed with ``column_prefix``, in schema property order.

    Labels mode: the schema is an object with a single ``label`` string whose
    ``enum`` is the labels, so the output has one column ``label`` (prefixed).
    As a convenience for servers without structured output, :meth:`parse` also
    accepts a reply that is just the label: surrounding whitespace and one pair
    of matching quotes (``"``, ``'`` or a backtick) are stripped, and the rest
    must equal a label exactly (case-sensitive: ``Positive`` is not
    ``positive``). A reply that starts like JSON (``{``, ``[`` or a code
    fence) is always parsed as JSON, so a truncated object is reported as
    "not JSON" rather than as a strange label.
    """

    # The pipeline's own result columns, which a structured column may not shadow.
    RESERVED: ClassVar[list[str]] = [name for name, _ in RESULT_COLUMNS]

    def __init__(
        self,
        *,
        schema: dict[str, Any],
        fields: Sequence[tuple[str, _Node]],
        column_prefix: str,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Build from an already checked strict schema; use :meth:`from_job` instead."""
        self.schema = schema
        self.column_prefix = column_prefix
        self.labels: tuple[str, ...] | None = tuple(labels) if labels is not None else None
        self._fields = tuple(fields)
        self._names = tuple((name, column_prefix + name) for name, _ in self._fields)
        self.columns: list[tuple[str, pa.DataType]] = [
            (column_prefix + name, node.arrow) for name, node in self._fields
        ]
        # Built once: parse() runs for every row and compiling a validator is
        # far more expensive than using one.
        self._validator = Draft202012Validator(schema)

    # ------------------------------------------------------------------ build

    @classmethod
    def from_job(
        cls,
        *,
        labels: list[str] | None,
        json_schema: dict | None,
        json_schema_file: Path | None,
        column_prefix: str = "",
    ) -> StructuredSpec | None:
        """Build the spec from the job's ``[prompt]`` settings.

        Returns None when the job asks for plain text (no labels, no schema).
        Raises :class:`JobError` naming the key (and file or property) when:
        more than one of labels / json_schema / json_schema_file is set; labels
        are empty, blank, duplicated or not strings; the schema file cannot be
        read or is not JSON; the schema is not an object with properties, is
        not a valid JSON schema, or uses a type that has no column type.
        ``json_schema_file`` is opened as given (relative to the working
        directory).
        """
        chosen = [
            key
            for key, value in (
                ("labels", labels),
                ("json_schema", json_schema),
                ("json_schema_file", json_schema_file),
            )
            if value is not None
        ]
        if not chosen:
            return None
        if len(chosen) > 1:
            raise JobError(
                "`[prompt]` sets " + " and ".join(chosen) + "; set only one of labels, json_schema, json_schema_file"
            )
        if not isinstance(column_prefix, str):
            raise JobError("`[prompt] column_prefix` must be a string")
        if labels is not None:
            return cls._from_labels(labels, column_prefix)
        if json_schema_file is not None:
            source = f"{_SCHEMA_FILE_KEY} ({json_schema_file})"
            return cls._from_schema(_read_schema_file(json_schema_file), source, column_prefix)
        return cls._from_schema(json_schema, _SCHEMA_KEY, column_prefix)

    @classmethod
    def _from_labels(cls, labels: Any, column_prefix: str) -> StructuredSpec:
        """Labels → an object with one ``label`` enum property."""
        _check_labels(labels)
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
        node = _Node("string", pa.string())
        return cls(schema=schema, fields=[("label", node)], column_prefix=column_prefix, labels=labels)

    @classmethod
    def _from_schema(cls, raw: Any, source: str, column_prefix: str) -> StructuredSpec:
        """A user schema → checked, strict copy plus the column tree."""
        schema = _json_copy(raw, source)
        _check_top_level(schema, source)
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = _format_path(exc.absolute_path)
            detail = f"{where}: {exc.message}" if where else exc.message
            raise JobError(_one_line(f"{source} is not a valid JSON schema: {detail}")) from None
        fields = [(name, _compile(prop, name, source)) for name, prop in schema["properties"].items()]
        _make_strict(schema, "", source)
        return cls(schema=schema, fields=fields, column_prefix=column_prefix)

    # ---------------------------------------------------------------- request

    # ------------------------------------------------------------------ parse

    def parse(self, content: str | None, finish_reason: str | None) -> tuple[dict | None, str | None]:
        """Turn one reply into ``({column: value}, None)`` or ``(None, "invalid reply: ...")``.

        Values are converted to the column types: a whole JSON number for a
        ``number`` property becomes a float, ``2.0`` for an ``integer`` one
        becomes ``2``. A JSON object wrapped in a Markdown code fence (possibly
        after some prose) is accepted. The error is one line of at most 200
        characters.
        """
        try:
            return self._parse(content, finish_reason), None
        except _BadReply as exc:
            return None, _one_line(f"invalid reply: {exc}")

    def _parse(self, content: str | None, finish_reason: str | None) -> dict:
        if finish_reason in _TRUNCATED:
            raise _BadReply(_TRUNCATED[finish_reason])
        if content is None or not content.strip():
            raise _BadReply("empty content")
        text = content.strip()
        if self.labels is not None and not text.startswith(("{", "[", "```")):
            # Not an attempt at an object: take the whole reply as the label.
            return {self._names[0][1]: self._check_label(_unquote(text))}
        value = _decode(text)
        if self.labels is not None and not isinstance(value, dict | list):
            # A JSON scalar in a code fence, e.g. "positive" or 5 (star-rating labels).
            label = value if isinstance(value, str) else json.dumps(value)
            return {self._names[0][1]: self._check_label(label)}
        if not isinstance(value, dict):
            raise _BadReply(f"expected a JSON object, got {_json_type(value)}")
        if self.labels is not None and isinstance(value.get("label"), str):
            self._check_label(value["label"])
        self._validate(value)
        return {
            column: _convert(value.get(name), node, name)
            for (name, column), (_, node) in zip(self._names, self._fields, strict=True)
        }

    def _check_label(self, label: str) -> str:
        """Return the label if it is one of the job's labels, else raise _BadReply."""
        assert self.labels is not None
        if label not in self.labels:
            raise _BadReply(f"label {_quote(label)} is not one of {', '.join(self.labels)}")
        return label

    def _validate(self, value: dict) -> None:
        """Validate against the strict schema; the most relevant error wins."""
        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            raise _BadReply(_describe(error))

    # ----------------------------------------------------------------- output

    def to_arrays(self, parsed: list[dict | None]) -> list[pa.Array]:
        """One typed array per column (same order as :attr:`columns`); nulls where None.

        The type is always given explicitly, so a column whose rows all failed
        is still e.g. ``int64`` rather than Arrow's ``null`` type, and files
        from different runs have the same schema.
        """
        return [
            pa.array([row.get(name) if row is not None else None for row in parsed], type=arrow)
            for name, arrow in self.columns
        ]

    def identity(self) -> dict:
        """JSON-serialisable description for the job identity hash (schema + prefix).

        Uses the strict schema actually sent, so two spellings that send the
        same schema share an identity, and the file's content, not its path,
        matters for ``json_schema_file``.
        """
        return {
            "mode": "labels" if self.labels is not None else "json_schema",
            "schema": copy.deepcopy(self.schema),
            "column_prefix": self.column_prefix,
        }

    def check_clashes(self, input_columns: list[str]) -> None:
        """Raise JobError if an output column would overwrite an input or pipeline column."""
        inputs = set(input_columns)
        for name, _ in self.columns:
            if name in self.RESERVED:
                whose = "the pipeline's own column"
            elif name in inputs:
                whose = "an input column"
            else:
                continue
            raise JobError(
                f"output column '{name}' has the same name as {whose} '{name}'; "
                'set `[prompt] column_prefix` (e.g. "llm_") to rename the output columns'
            )


# ---------------------------------------------------------------- job checks


def _check_labels(labels: Any) -> None:
    """Labels must be a non-empty list of distinct, non-blank, trimmed strings."""
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise JobError(f"{_LABELS_KEY} must be a list of strings")
    if not labels:
        raise JobError(f"{_LABELS_KEY} is empty: give at least one label")
    for label in labels:
        if not label.strip():
            raise JobError(f"{_LABELS_KEY} contains an empty label")
        if label != label.strip():
            # A bare-label reply is stripped before matching, so it could never match.
            raise JobError(f"{_LABELS_KEY}: label {label!r} has leading or trailing spaces")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise JobError(f"{_LABELS_KEY}: label {label!r} appears twice")
        seen.add(label)


def _read_schema_file(path: Path) -> Any:
    """Load a JSON schema file, naming the file in any error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise JobError(f"{_SCHEMA_FILE_KEY}: cannot read {path}: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(
            f"{_SCHEMA_FILE_KEY}: {path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None


def _json_copy(raw: Any, source: str) -> Any:
    """Deep copy through JSON: never mutates the job's dict and rejects TOML dates."""
    try:
        return json.loads(json.dumps(raw, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise JobError(_one_line(f"{source} must contain only JSON values: {exc}")) from None


def _check_top_level(schema: Any, source: str) -> None:
    """The top level must be an object with at least one (non-empty-named) property."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise JobError(f'{source} must be a JSON schema with "type": "object" at the top level')
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise JobError(f'{source} must have "properties" (one output column per property)')
    if "" in properties:
        raise JobError(f"{source}: a property has an empty name (it would be a column name)")


def _compile(prop: Any, path: str, source: str) -> _Node:
    """One property's schema → its column type tree; JobError naming the property path."""
    where = f"{source}: property '{path}'"
    if not isinstance(prop, dict):
        raise JobError(f"{where} must be a schema object")
    combinator = next((key for key in _COMBINATORS if key in prop), None)
    if combinator is not None:
        raise JobError(
            f'{where} uses "{combinator}", which has no single column type; give one "type" '
            '(for a nullable value: "type": ["string", "null"])'
        )
    kind = _single_type(prop.get("type"), where)
    if kind in _SCALAR_TYPES:
        return _Node(kind, _SCALAR_TYPES[kind])
    if kind == "array":
        if not isinstance(prop.get("items"), dict):
            raise JobError(f'{where} is an array without an "items" schema')
        items = _compile(prop["items"], f"{path}[]", source)
        return _Node(kind, pa.list_(items.arrow), items=items)
    properties = prop.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise JobError(f'{where} is an object without "properties"')
    fields = tuple((name, _compile(sub, f"{path}.{name}", source)) for name, sub in properties.items())
    struct = pa.struct([pa.field(name, node.arrow) for name, node in fields])
    return _Node(kind, struct, fields=fields)


def _single_type(declared: Any, where: str) -> str:
    """``"T"`` or ``["T", "null"]`` → ``"T"``; anything else → JobError."""
    if declared is None:
        raise JobError(f'{where} has no "type"')
    names = [declared] if isinstance(declared, str) else declared
    non_null = [name for name in names if name != "null"]
    if len(non_null) != 1:
        raise JobError(f'{where} must have exactly one "type" besides "null", got {json.dumps(declared)}')
    if non_null[0] not in _SUPPORTED_TYPES:
        raise JobError(f'{where} has type "{non_null[0]}"; supported: {", ".join(_SUPPORTED_TYPES)}')
    return non_null[0]


def _make_strict(node: dict[str, Any], path: str, source: str) -> None:
    """Rewrite a checked schema in place to meet strict mode (see the module docstring)."""
    kind = _single_type(node.get("type"), path)
    if kind == "array":
        _make_strict(node["items"], f"{path}[]", source)
        return
    if kind != "object":
        return
    where = f"{source}: " + (f"property '{path}'" if path else "the top-level object")
    properties: dict[str, Any] = node["properties"]
    if node.get("additionalProperties", False) is not False:
        raise JobError(f'{where} must not allow "additionalProperties" (strict mode)')
    node["additionalProperties"] = False
    if "required" in node:
        unknown = [name for name in node["required"] if name not in properties]
        if unknown:
            raise JobError(f"{where} requires unknown property '{unknown[0]}'")
        for name, sub in properties.items():
            if name not in node["required"]:
                _make_nullable(sub)
    node["required"] = list(properties)
    for name, sub in properties.items():
        _make_strict(sub, f"{path}.{name}" if path else name, source)


def _make_nullable(prop: dict[str, Any]) -> None:
    """Let an optional property be null, the strict-mode spelling of "may be absent"."""
    declared = prop["type"]
    names = [declared] if isinstance(declared, str) else list(declared)
    if "null" not in names:
        prop["type"] = [*names, "null"]
    if isinstance(prop.get("enum"), list) and None not in prop["enum"]:
        prop["enum"] = [*prop["enum"], None]
    if "const" in prop:
        # const cannot also allow null; an enum of the value and null can.
        prop["enum"] = [prop.pop("const"), None]


# -------------------------------------------------------------- reply checks


def _decode(text: str) -> Any:
    """``json.loads`` the reply, falling back to the first fenced code block in it."""
    try:
        return _loads(text)
    except (ValueError, RecursionError) as exc:
        error: Exception = exc
    fenced = _FENCE.search(text)
    if fenced is not None:
        try:
            return _loads(fenced.group(1))
        except (ValueError, RecursionError) as exc:
            error = exc
    if isinstance(error, json.JSONDecodeError):
        raise _BadReply(f"not JSON ({error.msg} at char {error.pos})")
    if isinstance(error, RecursionError):
        raise _BadReply("not JSON (nested too deeply)")
    raise _BadReply(f"not JSON ({error})")


def _loads(text: str) -> Any:
    """Strict JSON: Python's NaN / Infinity extensions are not JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _describe(error: ValidationError) -> str:
    """A jsonschema error as a short message that names the property."""
    path = _format_path(error.absolute_path)
    if error.validator == "type" and path:
        expected = error.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        return f"'{path}' is not of type " + ", ".join(f"'{name}'" for name in names)
    return f"'{path}': {error.message}" if path else error.message


def _convert(value: Any, node: _Node, path: str) -> Any:
    """A validated JSON value → the Python value its Arrow column expects."""
    if value is None:
        return None
    if node.kind == "number":
        number = float(value)
        if not math.isfinite(number):
            raise _BadReply(f"'{path}' is too large for a 64-bit float")
        return number
    if node.kind == "integer":
        integer = int(value)  # JSON Schema counts 2.0 as an integer
        if not _INT64_MIN <= integer <= _INT64_MAX:
            raise _BadReply(f"'{path}' is out of range for a 64-bit integer")
        return integer
    if node.kind == "array":
        assert node.items is not None
        return [_convert(item, node.items, f"{path}[{i}]") for i, item in enumerate(value)]
    if node.kind == "object":
        return {name: _convert(value.get(name), sub, f"{path}.{name}") for name, sub in node.fields}
    return value


# ------------------------------------------------------------------- helpers


def _format_path(parts: Iterable[Any]) -> str:
    """``["a", 0, "b"]`` → ``"a[0].b"``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unquote(text: str) -> str:
    """Strip whitespace and one pair of matching quotes around a bare label."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    return text


def _quote(text: str) -> str:
    """Quote a piece of the reply for an error message, shortened and on one line."""
    text = " ".join(text.split())
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[: _MAX_QUOTED_CHARS - 1] + "…"
    return f"'{text}'"


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _one_line(message: str) -> str:
    """Collapse whitespace (newlines included) and cap the length."""
    message = " ".join(message.split())
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 1] + "…"
    return message
