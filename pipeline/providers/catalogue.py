"""A provider's price list: what ``GET {base_url}/models`` says each model costs and can read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's list prices (USD per million tokens) and context window."""

    input_per_million: float
    output_per_million: float
    context_length: int | None


@dataclass(frozen=True, slots=True)
class PriceList:
    """Every model a provider lists with usable prices, by model id."""

    models: Mapping[str, ModelPrice]
