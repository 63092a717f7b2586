"""Reply checks: a model's reply decoded as strict JSON (or a bare label) and converted to column values."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from jsonschema.exceptions import ValidationError

from pipeline.structured.columns import Node
from pipeline.structured.schema import format_path

# How much of a bad label to quote back: a chatty model can answer a paragraph.
_MAX_QUOTED_CHARS = 40

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INT64_MAX = 2**63 - 1

# A Markdown code fence, any language tag (```json, ```JSON, plain ```).
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_QUOTES = "\"'`"
_QUOTES = "\"'`"

# finish_reason values meaning the reply was cut off. Mistral's own API says
# "model_length" when the context window, not max_tokens, ran out.
TRUNCATED = {
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


class BadReply(Exception):
    """A reply that does not fit the schema; the message becomes the row's error."""


def decode(text: str) -> Any:
    """``json.loads`` the reply, falling back to the first fenced code block in it."""
    try:
        return loads(text)
    except (ValueError, RecursionError) as exc:
        error: Exception = exc
    fenced = _FENCE.search(text)
    if fenced is not None:
        try:
            return loads(fenced.group(1))
        except (ValueError, RecursionError) as exc:
            error = exc
    if isinstance(error, json.JSONDecodeError):
        raise BadReply(f"not JSON ({error.msg} at char {error.pos})")
    if isinstance(error, RecursionError):
        raise BadReply("not JSON (nested too deeply)")
    raise BadReply(f"not JSON ({error})")


def loads(text: str) -> Any:
    """Strict JSON: Python's NaN / Infinity extensions are not JSON."""
    return json.loads(text, parse_constant=reject_constant)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def describe(error: ValidationError) -> str:
    """A jsonschema error as a short message that names the property."""
    path = format_path(error.absolute_path)
    if error.validator == "type" and path:
        expected = error.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        return f"'{path}' is not of type " + ", ".join(f"'{name}'" for name in names)
    return f"'{path}': {error.message}" if path else error.message


def convert(value: Any, node: Node, path: str) -> Any:
    """A validated JSON value → the Python value its Arrow column expects."""
    if value is None:
        return None
    if node.kind == "number":
        number = float(value)
        if not math.isfinite(number):
            raise BadReply(f"'{path}' is too large for a 64-bit float")
        return number
    if node.kind == "integer":
        integer = int(value)  # JSON Schema counts 2.0 as an integer
        if not _INT64_MIN <= integer <= _INT64_MAX:
            raise BadReply(f"'{path}' is out of range for a 64-bit integer")
        return integer
    if node.kind == "array":
        assert node.items is not None
        return [convert(item, node.items, f"{path}[{i}]") for i, item in enumerate(value)]
    if node.kind == "object":
        return {name: convert(value.get(name), sub, f"{path}.{name}") for name, sub in node.fields}
    return value


def unquote(text: str) -> str:
    """Strip whitespace and one pair of matching quotes around a bare label."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    return text


def quote(text: str) -> str:
    """Quote a piece of the reply for an error message, shortened and on one line."""
    text = " ".join(text.split())
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[: _MAX_QUOTED_CHARS - 1] + "…"
    return f"'{text}'"


def json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
