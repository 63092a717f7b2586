"""OpenRouter's model listing (``GET /models``) as a price list: USD per token, as strings, per model."""

from __future__ import annotations

import math
from typing import Any

from pipeline.errors import PipelineError
from pipeline.providers.catalogue import ModelPrice, PriceList

_PER_MILLION = 1_000_000


def price_list(body: Any, url: str) -> PriceList:
    """OpenRouter's ``{"data": [{"id", "context_length", "pricing": {...}}]}`` as entries.

    Prices there are USD per token, as strings. Entries whose prices cannot be
    parsed or are negative are skipped: OpenRouter lists variable-price
    routers (such as ``openrouter/auto``) with ``"-1"``.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise PipelineError(f"could not refresh prices from {url}: no 'data' list in the response")
    entries: dict[str, ModelPrice] = {}
    for item in data:
        parsed = _parse_model(item)
        if parsed is not None:
            entries[parsed[0]] = parsed[1]
    if not entries:
        # Writing an empty cache would silently hide the built-in table's
        # figures behind a "refreshed" label; refuse instead.
        raise PipelineError(f"could not refresh prices from {url}: no model with usable prices")
    return PriceList(entries)


def _parse_model(item: Any) -> tuple[str, ModelPrice] | None:
    """One ``data[]`` item as ``(id, entry)``, or None when it is unusable."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        return None
    pricing = item.get("pricing")
    if not isinstance(pricing, dict):
        return None
    prompt = _per_million(pricing.get("prompt"))
    completion = _per_million(pricing.get("completion"))
    if prompt is None or completion is None:
        return None
    return item["id"], ModelPrice(prompt, completion, _context_length(item.get("context_length")))


def _per_million(per_token: Any) -> float | None:
    """ "0.0000001" (USD per token) -> 0.1 (USD per million), None if unusable."""
    if isinstance(per_token, bool) or not isinstance(per_token, str | int | float):
        return None
    try:
        value = float(per_token)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    # Round away float noise such as 0.1 * 1e6 / 1e6 -> 0.09999999999999999.
    return round(value * _PER_MILLION, 9)


def _context_length(value: object) -> int | None:
    """A positive integer context window, or None when missing or nonsense."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
