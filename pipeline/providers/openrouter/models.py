"""OpenRouter's model listing (``GET /models``): every model's prices and context window.

Prices there are USD per token, as strings (``"0.0000001"``), under
``pricing.prompt``, ``pricing.completion`` and, where a model has them,
``pricing.input_cache_read`` and ``pricing.input_cache_write``. Entries whose
prices cannot be parsed or are negative are skipped: OpenRouter lists
variable-price routers (such as ``openrouter/auto``) with ``"-1"``.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.errors import UnavailableError
from pipeline.providers.catalogue import ListedModel

__all__ = ["ListedModel", "fetch_models"]

_PER_MILLION = 1_000_000


async def fetch_models(base_url: str, timeout_s: float = 30) -> list[ListedModel]:
    """``GET {base_url}/models``, parsed; every failure is an :class:`UnavailableError` (exit 3)."""
    url = f"{base_url.rstrip('/')}/models"
    return parse_models(await _fetch_json(url, timeout_s), url)


async def _fetch_json(url: str, timeout_s: float) -> Any:
    """GET ``url`` and decode its JSON body, turning every failure into an UnavailableError."""
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                snippet = (await response.text(errors="replace"))[:200]
                message = f"could not refresh prices from {url}: HTTP {response.status} {snippet}"
                raise UnavailableError(message.rstrip())
            # content_type=None: accept JSON even if served with another type.
            return await response.json(content_type=None)
    except TimeoutError as exc:
        raise UnavailableError(f"could not refresh prices from {url}: no answer within {timeout_s:g} s") from exc
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        raise UnavailableError(f"could not refresh prices from {url}: {reason}") from exc
    except ValueError as exc:  # the body is not JSON
        raise UnavailableError(f"could not refresh prices from {url}: invalid JSON: {exc}") from exc


def parse_models(body: Any, url: str) -> list[ListedModel]:
    """``{"data": [{"id", "context_length", "pricing": {...}}]}`` as models with usable prices."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise UnavailableError(f"could not refresh prices from {url}: no 'data' list in the response")
    models = [model for model in map(_parse_model, data) if model is not None]
    if not models:
        # Writing an empty cache would silently hide the other price sources
        # behind a "refreshed" label; refuse instead.
        raise UnavailableError(f"could not refresh prices from {url}: no model with usable prices")
    return models


def _parse_model(item: Any) -> ListedModel | None:
    """One ``data[]`` item, or None when it is unusable."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        return None
    pricing = item.get("pricing")
    if not isinstance(pricing, dict):
        return None
    prompt = _per_million(pricing.get("prompt"))
    completion = _per_million(pricing.get("completion"))
    if prompt is None or completion is None:
        return None
    context = item.get("context_length")
    return ListedModel(
        item["id"],
        prompt,
        completion,
        context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None,
        _per_million(pricing.get("input_cache_read")),
        _per_million(pricing.get("input_cache_write")),
    )


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
