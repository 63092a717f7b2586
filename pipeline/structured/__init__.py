"""Structured outputs: labels or a JSON schema turned into request fields, reply parsing and typed columns."""

from pipeline.structured.spec import StructuredSpec

__all__ = ["StructuredSpec"]
