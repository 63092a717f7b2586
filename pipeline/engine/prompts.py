"""Prompt templates: ``{column}`` placeholders filled from each row.

Templates use Python's format syntax, so a literal brace is written ``{{``.
A row whose rendered user prompt is blank, or whose user-template columns are
all null or blank, is not sent (it would pay for a prompt about nothing).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline.errors import InputError, JobError


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text interleaved with column names."""

    text: str
    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str, key: str) -> Template:
        try:
            parsed = [
                (literal, field)
                for literal, field, spec, conv in string.Formatter().parse(text)
                if _plain_field(field, spec, conv, key)
            ]
        except ValueError as exc:
            raise JobError(f"[prompt] {key}: invalid template: {exc} (write a literal brace as {{{{ or }}}})") from None
        return cls(text, tuple((literal, field or None) for literal, field in parsed))

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(field for _, field in self.parts if field))

    def render(self, values: dict[str, list[str]], n: int) -> list[str]:
        """Render ``n`` rows; ``values`` maps each column to its texts."""
        if not self.columns:
            return [self.text.replace("{{", "{").replace("}}", "}")] * n
        # Column by column: one concatenation per row and part, not a generator per row.
        out = [""] * n
        for literal, field in self.parts:
            if field is None:
                out = [text + literal for text in out]
            else:
                out = [text + literal + value for text, value in zip(out, values[field], strict=True)]
        return out


def _plain_field(field: str | None, spec: str | None, conv: str | None, key: str) -> bool:
    if field is not None and (not field.strip() or spec or conv):
        raise JobError(f"[prompt] {key}: placeholder {{{field}}} must be a plain column name")
    return True


class PromptRenderer:
    """Renders the system and user messages for a batch of rows."""

    def __init__(self, user: str, system: str | None) -> None:
        self.user = Template.parse(user, "user")
        self.system = Template.parse(system, "system") if system is not None else None

    @property
    def columns(self) -> list[str]:
        cols = self.user.columns + (self.system.columns if self.system else [])
        return list(dict.fromkeys(cols))

    def check_columns(self, available: Sequence[str], source_name: str) -> None:
        for key, template in (("user", self.user), ("system", self.system)):
            for column in template.columns if template else []:
                if column not in available:
                    raise InputError(
                        f"[prompt] {key}: placeholder {{{column}}} names a column not in {source_name} "
                        f"(columns: {', '.join(available)})"
                    )

    def render(self, batch: pa.RecordBatch) -> RenderedBatch:
        values = {c: _texts(batch.column(c)) for c in self.columns}
        n = batch.num_rows
        users = self.user.render(values, n)
        systems = self.system.render(values, n) if self.system else None
        blank = _blank_rows(users, [values[c] for c in self.user.columns])
        return RenderedBatch(users, systems, blank)


@dataclass
class RenderedBatch:
    users: list[str]
    systems: list[str] | None
    blank: list[bool]

    def system(self, i: int) -> str | None:
        return self.systems[i] if self.systems is not None else None

    def prompt_hash(self, i: int) -> str:
        """Identifies what was asked of a row, to notice when its prompt changes."""
        system = self.systems[i] if self.systems is not None else ""
        data = f"{system}\x00{self.users[i]}".encode()
        return hashlib.blake2b(data, digest_size=8).hexdigest()


def _texts(column: pa.Array | pa.ChunkedArray) -> list[str]:
    """Column values as text; nulls become empty strings."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return ["" if v is None else str(v) for v in column.to_pylist()]
    return ["" if v is None else v for v in column.to_pylist()]


def _blank_rows(users: list[str], user_columns: list[list[str]]) -> list[bool]:
    """A row is blank if its user prompt is, or if every column the template uses is."""
    blank = [not u or u.isspace() for u in users]
    if user_columns:
        # isspace() tests without building a stripped copy of every value.
        columns_blank = [[not v or v.isspace() for v in col] for col in user_columns]
        blank = [b or all(flags) for b, *flags in zip(blank, *columns_blank, strict=True)]
    return blank


def require_text_columns(renderer: PromptRenderer, schema: pa.Schema) -> None:
    """Binary or nested columns cannot be put into a prompt meaningfully."""
    for column in renderer.columns:
        kind = schema.field(column).type
        if pa.types.is_binary(kind) or pa.types.is_nested(kind):
            raise InputError(f"[prompt]: column {column!r} has type {kind}, which cannot go into a prompt")
