"""A reply's ``usage``: tokens, prompt-cache reads and writes, and the billed cost, whatever the dialect.

Providers report prompt caching in different places:

- OpenAI, OpenRouter, Mistral, xAI: ``prompt_tokens_details.cached_tokens``
  (OpenRouter also ``prompt_tokens_details.cache_write_tokens``);
- Anthropic-style usage: ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``;
- DeepSeek: ``prompt_cache_hit_tokens``.

Cached tokens are a part of ``prompt_tokens``, not extra (OpenAI and OpenRouter
count them in it). Anthropic's own ``input_tokens`` counts only the uncached
tokens: when a reply has ``input_tokens`` and no ``prompt_tokens``, the prompt
is the sum of the three. Costs may come as numbers or as numeric strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage", "parse_cost", "parse_usage"]


@dataclass(slots=True, frozen=True)
class Usage:
    """What one reply says it used and cost (None: not reported)."""

    prompt_tokens: int | None = None
    """All prompt tokens, cached ones included."""
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens read from the provider's prompt cache (billed at the cached price)."""
    cache_write_tokens: int | None = None
    """Prompt tokens written to the cache (billed at the cache-write price where there is one)."""
    cost: float | None = None
    """USD the provider billed (OpenRouter's ``usage.cost``)."""


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def parse_cost(value: Any) -> float | None:
    """A billed cost: a finite, non-negative number or numeric string, else None."""
    if type(value) in (int, float):
        cost = float(value)
    elif isinstance(value, str):
        try:
            cost = float(value)
        except ValueError:
            return None
    else:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def parse_usage(usage: Any) -> Usage:
    """The fields of a ``usage`` object; anything malformed counts as not reported."""
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = _count(details.get("cached_tokens"))
    if cached is None:
        cached = _count(usage.get("cache_read_input_tokens"))
    if cached is None:
        cached = _count(usage.get("prompt_cache_hit_tokens"))
    written = _count(details.get("cache_write_tokens"))
    if written is None:
        written = _count(usage.get("cache_creation_input_tokens"))
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None and _count(usage.get("input_tokens")) is not None:
        # Anthropic's shape: input_tokens is the uncached part only.
        prompt = usage["input_tokens"] + (cached or 0) + (written or 0)
        completion = _count(usage.get("output_tokens"))
    if prompt is not None and cached is not None:
        cached = min(cached, prompt)  # never more cached than sent
    return Usage(prompt, completion, cached, written, parse_cost(usage.get("cost")))
