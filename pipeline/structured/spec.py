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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from pipeline.errors import JobError
from pipeline.io.output import RESULT_COLUMNS
from pipeline.structured.columns import Node, compile_property
from pipeline.structured.replies import (
    TRUNCATED,
    BadReply,
    convert,
    decode,
    describe,
    json_type,
    quote,
    unquote,
)
from pipeline.structured.schema import (
    SCHEMA_FILE_KEY,
    SCHEMA_KEY,
    check_labels,
    check_top_level,
    format_path,
    json_copy,
    make_strict,
    one_line,
    read_schema_file,
)

__all__ = ["StructuredSpec"]


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
        fields: Sequence[tuple[str, Node]],
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
            source = f"{SCHEMA_FILE_KEY} ({json_schema_file})"
            return cls._from_schema(read_schema_file(json_schema_file), source, column_prefix)
        return cls._from_schema(json_schema, SCHEMA_KEY, column_prefix)

    @classmethod
    def _from_labels(cls, labels: Any, column_prefix: str) -> StructuredSpec:
        """Labels → an object with one ``label`` enum property."""
        check_labels(labels)
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
        node = Node("string", pa.string())
        return cls(schema=schema, fields=[("label", node)], column_prefix=column_prefix, labels=labels)

    @classmethod
    def _from_schema(cls, raw: Any, source: str, column_prefix: str) -> StructuredSpec:
        """A user schema → checked, strict copy plus the column tree."""
        schema = json_copy(raw, source)
        check_top_level(schema, source)
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = format_path(exc.absolute_path)
            detail = f"{where}: {exc.message}" if where else exc.message
            raise JobError(one_line(f"{source} is not a valid JSON schema: {detail}")) from None
        fields = [(name, compile_property(prop, name, source)) for name, prop in schema["properties"].items()]
        make_strict(schema, "", source)
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
        except BadReply as exc:
            return None, one_line(f"invalid reply: {exc}")

    def _parse(self, content: str | None, finish_reason: str | None) -> dict:
        if finish_reason in TRUNCATED:
            raise BadReply(TRUNCATED[finish_reason])
        if content is None or not content.strip():
            raise BadReply("empty content")
        text = content.strip()
        if self.labels is not None and not text.startswith(("{", "[", "```")):
            # Not an attempt at an object: take the whole reply as the label.
            return {self._names[0][1]: self._check_label(unquote(text))}
        value = decode(text)
        if self.labels is not None and not isinstance(value, dict | list):
            # A JSON scalar in a code fence, e.g. "positive" or 5 (star-rating labels).
            label = value if isinstance(value, str) else json.dumps(value)
            return {self._names[0][1]: self._check_label(label)}
        if not isinstance(value, dict):
            raise BadReply(f"expected a JSON object, got {json_type(value)}")
        if self.labels is not None and isinstance(value.get("label"), str):
            self._check_label(value["label"])
        self._validate(value)
        return {
            column: convert(value.get(name), node, name)
            for (name, column), (_, node) in zip(self._names, self._fields, strict=True)
        }

    def _check_label(self, label: str) -> str:
        """Return the label if it is one of the job's labels, else raise BadReply."""
        assert self.labels is not None
        if label not in self.labels:
            raise BadReply(f"label {quote(label)} is not one of {', '.join(self.labels)}")
        return label

    def _validate(self, value: dict) -> None:
        """Validate against the strict schema; the most relevant error wins."""
        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            raise BadReply(describe(error))

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
