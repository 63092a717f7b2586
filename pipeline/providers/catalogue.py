"""A provider's price list: what its model listing says each model costs and can read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ListedModel:
    """One model of the listing, prices in USD per million tokens."""

    id: str
    input_per_million: float
    output_per_million: float
    context_length: int | None
    cached_input_per_million: float | None = None
    cache_write_per_million: float | None = None
