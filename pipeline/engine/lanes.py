"""The same job priced in every lane the provider offers, side by side.

- ``realtime``: every prompt token at the input price (no cache);
- ``realtime with cache``: the shared prefix read from the prompt cache at the
  cached price (what a run with the warm-up is expected to cost);
- ``batch``: the provider's batch API (OpenRouter, OpenAI, Mistral): the
  catalog's batch prices where it lists them, else the list prices times
  ``[model] batch_discount``; no cache discount is assumed there;
- ``flex``: OpenAI's ``service_tier = "flex"`` prices, for models that have
  them (slower; a 429 "resource unavailable" is back-pressure).

The dry run lists them and names the cheapest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.price_catalog import TierPrices

__all__ = ["LaneCost", "LaneTokens", "cheapest", "price_lanes"]

_PER_MILLION = 1_000_000
BATCH_PROVIDERS = frozenset({"openrouter", "openai", "mistral"})


@dataclass(frozen=True, slots=True)
class LaneTokens:
    """The tokens a dry run expects the job to use."""

    input_tokens: int
    cached_tokens: int
    output_expected: int
    output_max: int


@dataclass(frozen=True, slots=True)
class LaneCost:
    lane: str
    cost_usd_expected: float | None
    cost_usd_max: float | None
    basis: str
    """Where its prices come from."""


def _cost(prices: TierPrices, tokens: LaneTokens, cached: int, output: int) -> float | None:
    if prices.input is None or prices.output is None:
        return None
    cached_price = prices.cache_read if prices.cache_read is not None else prices.input
    uncached = tokens.input_tokens - cached
    return round((uncached * prices.input + cached * cached_price + output * prices.output) / _PER_MILLION, 10)


def _lane(name: str, prices: TierPrices, tokens: LaneTokens, cached: int, basis: str) -> LaneCost:
    return LaneCost(
        name,
        _cost(prices, tokens, cached, tokens.output_expected),
        _cost(prices, tokens, cached, tokens.output_max),
        basis,
    )


def price_lanes(
    standard: TierPrices,
    tokens: LaneTokens,
    provider: str,
    *,
    batch: TierPrices | None = None,
    flex: TierPrices | None = None,
    batch_discount: float = 0.5,
) -> list[LaneCost]:
    """Each lane ``provider`` offers, priced for ``tokens``."""
    lanes = [_lane("realtime", standard, tokens, 0, "list prices, nothing cached")]
    if tokens.cached_tokens:
        lanes.append(_lane("realtime with cache", standard, tokens, tokens.cached_tokens, "list and cached prices"))
    if provider in BATCH_PROVIDERS:
        if batch is not None:
            lanes.append(_lane("batch", batch, tokens, 0, "the catalog's batch prices"))
        elif standard.input is not None and standard.output is not None:
            discounted = TierPrices(standard.input * batch_discount, standard.output * batch_discount)
            lanes.append(_lane("batch", discounted, tokens, 0, f"list prices x batch_discount {batch_discount:g}"))
    if flex is not None and provider == "openai":
        lanes.append(_lane("flex", flex, tokens, tokens.cached_tokens, 'service_tier = "flex" prices, with cache'))
    return lanes


def cheapest(lanes: list[LaneCost]) -> str | None:
    """The lane with the lowest expected cost (None when no lane has a price)."""
    priced = [lane for lane in lanes if lane.cost_usd_expected is not None]
    if not priced:
        return None
    return min(priced, key=lambda lane: lane.cost_usd_expected or 0.0).lane
