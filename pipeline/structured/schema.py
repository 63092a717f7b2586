"""Job checks for ``[prompt] labels`` / ``json_schema`` / ``json_schema_file``, and the strict-mode rewrite.

Everything here raises :class:`JobError` before any request is sent; see
:mod:`pipeline.structured.spec` for what strict mode asks of a schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import JobError
from pipeline.structured.columns import single_type

# Longest error message recorded for a row: the error column is for humans
# scanning a table, the full reply is kept in the completion column anyway.
_MAX_ERROR_CHARS = 200
# How much of a bad label to quote back: a chatty model can answer a paragraph.
_MAX_QUOTED_CHARS = 40

LABELS_KEY = "`[prompt] labels`"
SCHEMA_KEY = "`[prompt] json_schema`"
SCHEMA_FILE_KEY = "`[prompt] json_schema_file`"


def check_labels(labels: Any) -> None:
    """Labels must be a non-empty list of distinct, non-blank, trimmed strings."""
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise JobError(f"{LABELS_KEY} must be a list of strings")
    if not labels:
        raise JobError(f"{LABELS_KEY} is empty: give at least one label")
    for label in labels:
        if not label.strip():
            raise JobError(f"{LABELS_KEY} contains an empty label")
        if label != label.strip():
            # A bare-label reply is stripped before matching, so it could never match.
            raise JobError(f"{LABELS_KEY}: label {label!r} has leading or trailing spaces")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise JobError(f"{LABELS_KEY}: label {label!r} appears twice")
        seen.add(label)


def read_schema_file(path: Path) -> Any:
    """Load a JSON schema file, naming the file in any error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise JobError(f"{SCHEMA_FILE_KEY}: cannot read {path}: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(
            f"{SCHEMA_FILE_KEY}: {path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None


def json_copy(raw: Any, source: str) -> Any:
    """Deep copy through JSON: never mutates the job's dict and rejects TOML dates."""
    try:
        return json.loads(json.dumps(raw, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise JobError(one_line(f"{source} must contain only JSON values: {exc}")) from None


def check_top_level(schema: Any, source: str) -> None:
    """The top level must be an object with at least one (non-empty-named) property."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise JobError(f'{source} must be a JSON schema with "type": "object" at the top level')
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise JobError(f'{source} must have "properties" (one output column per property)')
    if "" in properties:
        raise JobError(f"{source}: a property has an empty name (it would be a column name)")


def make_strict(node: dict[str, Any], path: str, source: str) -> None:
    """Rewrite a checked schema in place to meet strict mode (see :mod:`pipeline.structured.spec`)."""
    kind = single_type(node.get("type"), path)
    if kind == "array":
        make_strict(node["items"], f"{path}[]", source)
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
                make_nullable(sub)
    node["required"] = list(properties)
    for name, sub in properties.items():
        make_strict(sub, f"{path}.{name}" if path else name, source)


def make_nullable(prop: dict[str, Any]) -> None:
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


def format_path(parts: Iterable[Any]) -> str:
    """``["a", 0, "b"]`` → ``"a[0].b"``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def one_line(message: str) -> str:
    """Collapse whitespace (newlines included) and cap the length."""
    message = " ".join(message.split())
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 1] + "…"
    return message
