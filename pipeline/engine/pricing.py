"""Model prices and context windows, without network access at run time.

Each figure (input, output, cached input, cache write) comes from the most
trusted source that has it:

1. the job file (``input_price_per_million``, ``output_price_per_million``,
   ``cached_input_price_per_million``, ``cache_write_price_per_million``);
2. a local model: free, and its context window is the server's ``n_ctx``;
3. the price cache written by :func:`refresh_prices` (``pipeline prices --refresh``:
   OpenRouter's ``GET /models``, cache prices included);
4. the snapshot of pydantic's ``genai-prices`` installed with the package
   (``engine/price_catalog.py``): every model it knows, with cache prices and
   service tiers such as OpenAI's ``flex``;
5. the built-in table ``prices.json`` shipped with the package;
6. unknown: ``None``. A dry run names the missing price and the key that sets it.

With ``[model] service_tier = "flex"``, the catalog's flex prices replace the
list prices of sources 3 to 5 (the job file still wins). The context length
comes from the job, the cache, the catalog or the table, in that order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

from pipeline.config.job import DEFAULT_BASE_URL
from pipeline.engine.price_catalog import (
    CatalogPrices,
    TierPrices,
    catalog_model_ids,
    catalog_prices,
    catalog_version,
    default_cache_dir,
)
from pipeline.errors import UnavailableError
from pipeline.providers.catalogue import ListedModel
from pipeline.providers.openrouter import OpenRouter
from pipeline.providers.provider import Provider

__all__ = ["ModelInfo", "PriceFigure", "cache_path", "known_models", "model_info", "refresh_prices"]

log = logging.getLogger(__name__)

CACHE_FILE = "prices.json"
_PER_MILLION = 1_000_000
JOB_FILE = "job file"

# Each priced figure, the job key that sets it, and its words in reports.
PRICE_KEYS = {
    "input": "input_price_per_million",
    "output": "output_price_per_million",
    "cached_input": "cached_input_price_per_million",
    "cache_write": "cache_write_price_per_million",
}


@dataclass(frozen=True, slots=True)
class PriceFigure:
    """One price (USD per million tokens) and where it comes from."""

    name: str
    """``input``, ``output``, ``cached_input`` or ``cache_write``."""
    value: float | None
    source: str

    @property
    def key(self) -> str:
        """The ``[model]`` key that sets it."""
        return PRICE_KEYS[self.name]


@dataclass(frozen=True)
class ModelInfo:
    """What a model costs and how much it can read."""

    model: str
    input_per_million: float | None
    """USD per million prompt tokens; None when unknown."""
    output_per_million: float | None
    """USD per million completion tokens; None when unknown."""
    context_length: int | None
    source: str
    """Where the prices come from, for reports: "job file", "built-in table (2026-11)", ..."""
    cached_input_per_million: float | None = None
    """USD per million prompt tokens read from the provider's cache; None when unknown."""
    cache_write_per_million: float | None = None
    """USD per million prompt tokens written to the cache; None when unknown (then: the input price)."""
    figures: tuple[PriceFigure, ...] = field(default=(), compare=False)
    """Each price with its own source."""
    flex: TierPrices | None = field(default=None, compare=False)
    """The catalog's ``service_tier = "flex"`` prices, when the model has them (the dry run's lanes)."""
    batch: TierPrices | None = field(default=None, compare=False)
    """The catalog's batch-API prices, when it lists them."""

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: int = 0, cache_write: int = 0) -> float | None:
        """USD for the given tokens, or None when the input or output price is unknown.

        ``cached`` and ``cache_write`` are parts of ``prompt_tokens``. A cached or
        write price that is unknown counts those tokens at the input price, the
        most they can cost.
        """
        if self.input_per_million is None or self.output_per_million is None:
            return None
        cached_price = self.cached_price
        write_price = self.cache_write_per_million
        if write_price is None:
            write_price = self.input_per_million
        uncached = prompt_tokens - cached - cache_write
        return (
            uncached * self.input_per_million
            + cached * cached_price
            + cache_write * write_price
            + completion_tokens * self.output_per_million
        ) / _PER_MILLION

    @property
    def cached_price(self) -> float:
        """The cached input price, or the input price when it is unknown (0 when both are)."""
        if self.cached_input_per_million is not None:
            return self.cached_input_per_million
        return self.input_per_million or 0.0

    def missing(self) -> list[PriceFigure]:
        """Prices nobody knows (the dry run names the key that sets each one)."""
        return [f for f in self.figures if f.value is None]

    def tier(self) -> TierPrices:
        """The prices as one lane's (the dry run's realtime lanes)."""
        return TierPrices(
            self.input_per_million, self.output_per_million, self.cached_input_per_million, self.cache_write_per_million
        )


@dataclass(frozen=True)
class _Entry:
    """One model's row in the cache or the built-in table."""

    input_per_million: float
    output_per_million: float
    context_length: int | None
    cached_input_per_million: float | None = None
    cache_write_per_million: float | None = None


# --------------------------------------------------------------------------
# Lookup.


@dataclass(frozen=True, slots=True)
class _Source:
    """One source's figures for a model (None: it has no such price)."""

    name: str
    prices: TierPrices
    context_length: int | None = None


def model_info(
    model: str,
    *,
    free: bool = False,
    input_price: float | None = None,
    output_price: float | None = None,
    cached_input_price: float | None = None,
    cache_write_price: float | None = None,
    provider: str = "openrouter",
    service_tier: str | None = None,
    cache_dir: Path | None = None,
) -> ModelInfo:
    """Prices and context window of ``model`` at ``provider``, following the precedence above.

    The price arguments are the job file's keys in USD per million tokens;
    each one replaces only its own price.
    """
    job = _Source(JOB_FILE, TierPrices(input_price, output_price, cached_input_price, cache_write_price))
    catalog = None if free else catalog_prices(model, provider)
    if free:
        sources = [job, _Source("local model (free)", TierPrices(0.0, 0.0))]
    else:
        cached = _read_cache(cache_path(cache_dir))
        sources = [job, *_stored_sources(model, cached, catalog, service_tier)]
    return _merged(model, sources, catalog)


def _merged(model: str, sources: list[_Source], catalog: CatalogPrices | None) -> ModelInfo:
    """Each figure from the first source that has it."""
    figures = tuple(_figure(name, sources) for name in PRICE_KEYS)
    context = next((s.context_length for s in sources if s.context_length), None)
    values = {f.name: f.value for f in figures}
    return ModelInfo(
        model=model,
        input_per_million=values["input"],
        output_per_million=values["output"],
        context_length=context,
        source=_describe(figures),
        cached_input_per_million=values["cached_input"],
        cache_write_per_million=values["cache_write"],
        figures=figures,
        flex=catalog.flex if catalog else None,
        batch=catalog.batch if catalog else None,
    )


def _stored_sources(
    model: str,
    cached: tuple[dict[str, _Entry], str] | None,
    catalog: CatalogPrices | None,
    service_tier: str | None,
) -> list[_Source]:
    """The price cache, the genai-prices catalog and the built-in table's figures for ``model``."""
    sources: list[_Source] = []
    if service_tier == "flex" and catalog is not None and catalog.flex is not None:
        # Flex prices replace every list price; the list figures stay behind them for what flex lacks.
        name = f"{catalog_version()} ({catalog.provider_id}, flex)"
        sources.append(_Source(name, catalog.flex, catalog.context_window))
    if cached is not None:
        entries, source = cached
        entry = _find(entries, model)
        if entry is not None:
            sources.append(_entry_source(source, entry))
    if catalog is not None:
        name = f"{catalog_version()} ({catalog.provider_id})"
        sources.append(_Source(name, catalog.standard, catalog.context_window))
    table = _builtin_table()
    entry = _find(table.entries, model, table.aliases)
    if entry is not None:
        sources.append(_entry_source(f"built-in table ({table.as_of})", entry))
    return sources


def _entry_source(name: str, entry: _Entry) -> _Source:
    prices = TierPrices(
        entry.input_per_million, entry.output_per_million, entry.cached_input_per_million, entry.cache_write_per_million
    )
    return _Source(name, prices, entry.context_length)


_TIER_FIELDS = {"input": "input", "output": "output", "cached_input": "cache_read", "cache_write": "cache_write"}


def _figure(name: str, sources: list[_Source]) -> PriceFigure:
    for source in sources:
        value = getattr(source.prices, _TIER_FIELDS[name])
        if value is not None:
            return PriceFigure(name, value, source.name)
    return PriceFigure(name, None, "unknown")


def _describe(figures: tuple[PriceFigure, ...]) -> str:
    """The input and output prices' source ("job file first" when they differ), then other figures' own."""
    by_name = {f.name: f for f in figures}
    sources = {by_name["input"].source, by_name["output"].source}
    if len(sources) == 1:
        text = sources.pop()
    else:
        pair = sorted((by_name["input"], by_name["output"]), key=lambda f: f.source != JOB_FILE)
        text = ", ".join(f"{f.source} ({f.name} price)" for f in pair)
    main = {by_name["input"].source, by_name["output"].source}
    extra = [
        f"{f.name.replace('_', ' ')} price: {f.source}"
        for f in figures
        if f.name not in ("input", "output") and f.value is not None and f.source not in main
    ]
    return "; ".join([text, *extra])


def known_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every OpenRouter model with known prices, sorted by id, each figure from its own source.

    The models of the price cache, of the genai-prices catalog (its OpenRouter
    ids) and of the built-in table; ``pipeline prices MODEL`` looks up any
    other model the catalog knows.
    """
    cached = _read_cache(cache_path(cache_dir))
    table = _builtin_table()
    ids = set(table.entries) | set(catalog_model_ids("openrouter"))
    if cached is not None:
        ids |= set(cached[0])
    infos = []
    for model in sorted(ids):
        catalog = catalog_prices(model, "openrouter")
        infos.append(_merged(model, _stored_sources(model, cached, catalog, None), catalog))
    return [info for info in infos if info.input_per_million is not None]


def _info(model: str, entry: _Entry, source: str) -> ModelInfo:
    return ModelInfo(
        model,
        entry.input_per_million,
        entry.output_per_million,
        entry.context_length,
        source,
        entry.cached_input_per_million,
        entry.cache_write_per_million,
    )


def _find(entries: dict[str, _Entry], model: str, aliases: dict[str, str] | None = None) -> _Entry | None:
    """Exact id first, then case-insensitively (OpenRouter ids are lower case)."""
    key = model.strip()
    if aliases:
        key = aliases.get(key.lower(), key)
    entry = entries.get(key)
    if entry is None:
        entry = entries.get(key.lower())
    return entry


# --------------------------------------------------------------------------
# The built-in table.


@dataclass(frozen=True)
class _Table:
    as_of: str
    entries: dict[str, _Entry]
    aliases: dict[str, str]


@lru_cache(maxsize=1)
def _builtin_table() -> _Table:
    """Load ``prices.json`` from the package (it ships as package data)."""
    text = resources.files("pipeline").joinpath(CACHE_FILE).read_text("utf-8")
    raw = json.loads(text)
    entries = {model: _parse_entry(fields) for model, fields in raw["models"].items()}
    return _Table(
        as_of=str(raw["as_of"]),
        entries={model: entry for model, entry in entries.items() if entry is not None},
        aliases={alias.lower(): target for alias, target in raw.get("aliases", {}).items()},
    )


def _parse_entry(fields: Any) -> _Entry | None:
    """An entry from the cache or table, or None when its fields are unusable."""
    if not isinstance(fields, dict):
        return None
    input_price, output_price = fields.get("input_per_million"), fields.get("output_per_million")
    if not (_valid_price(input_price) and _valid_price(output_price)):
        return None
    cached, written = fields.get("cached_input_per_million"), fields.get("cache_write_per_million")
    return _Entry(
        float(input_price),
        float(output_price),
        _context_length(fields.get("context_length")),
        float(cached) if _valid_price(cached) else None,
        float(written) if _valid_price(written) else None,
    )


def _context_length(value: object) -> int | None:
    """A positive integer context window, or None when missing or nonsense."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _valid_price(value: object) -> TypeGuard[float]:
    """A finite, non-negative number (JSON booleans are not prices)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# --------------------------------------------------------------------------
# The price cache.


def cache_path(cache_dir: Path | None = None) -> Path:
    """Where the price cache lives.

    ``cache_dir`` if given, else ``$PIPELINE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline``; the file is
    ``prices.json``. Empty variables count as unset, as the XDG spec says.
    """
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return folder / CACHE_FILE


def _read_cache(path: Path) -> tuple[dict[str, _Entry], str] | None:
    """The cache's entries and source description, or None if it is missing or corrupt.

    A corrupt cache (a half-written file from an old version, a hand edit)
    must never stop a run: it is ignored with a warning and the built-in
    table answers instead. Single bad entries are dropped the same way.
    """
    try:
        raw = json.loads(path.read_text("utf-8"))
        models = raw["models"]
        refreshed = str(raw["refreshed_at"])[:10]
        url = str(raw["source"])
        if not isinstance(models, dict):
            raise TypeError("'models' is not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable price cache %s: %s", path, exc)
        return None
    entries = {model: _parse_entry(fields) for model, fields in models.items()}
    valid = {model: entry for model, entry in entries.items() if entry is not None}
    return valid, f"price cache (refreshed {refreshed} from {url})"


# --------------------------------------------------------------------------
# Refreshing the cache from OpenRouter.


async def refresh_prices(
    base_url: str = DEFAULT_BASE_URL,
    *,
    timeout_s: float = 30,
    cache_dir: Path | None = None,
    provider: Provider | None = None,
) -> tuple[Path, int]:
    """Download every model's prices from ``provider``'s listing (OpenRouter's ``GET {base_url}/models``
    by default: :meth:`Provider.catalogue`) into the cache.

    Cache read and write prices are kept where the listing has them. Returns
    the cache file and the number of models written. Network and HTTP
    failures raise :class:`UnavailableError` (exit 3); the old cache is then left untouched.
    """
    base = base_url.rstrip("/")
    models = await (provider or OpenRouter()).catalogue(base, timeout_s)
    if models is None:
        raise UnavailableError(f"could not refresh prices from {base}: the provider publishes no price list")
    payload = {
        "source": base,
        "refreshed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": {model.id: _cache_fields(model) for model in sorted(models, key=lambda m: m.id)},
    }
    path = cache_path(cache_dir)
    await asyncio.to_thread(_write_atomically, path, json.dumps(payload, indent=1))
    return path, len(payload["models"])


def _cache_fields(model: ListedModel) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "input_per_million": model.input_per_million,
        "output_per_million": model.output_per_million,
        "context_length": model.context_length,
    }
    if model.cached_input_per_million is not None:
        fields["cached_input_per_million"] = model.cached_input_per_million
    if model.cache_write_per_million is not None:
        fields["cache_write_per_million"] = model.cache_write_per_million
    return fields


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old file or the new, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UnavailableError(f"could not write the price cache {path}: {exc}") from exc
