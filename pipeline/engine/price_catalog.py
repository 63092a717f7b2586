"""Prices from pydantic's ``genai-prices`` snapshot: every model it knows, offline.

``genai-prices`` ships a dated database of input, output, cache-read and
cache-write prices, with variants for service tiers (OpenAI's ``flex``) and
batch processing. The pipeline reads the snapshot inside the installed
package only: it never starts the package's updater, so nothing is
downloaded at run time. Loading the snapshot takes about a tenth of a second,
so it is imported only when a price is looked up, and a lookup whose answer
cannot change with the clock is kept on disk (``catalog-<version>.json`` in
the cache folder, one file per installed genai-prices version): a rerun of
the same job does not import the package at all. Prices that hold at some
hours only (off-peak), or start on a later date, are looked up every time.

A model is looked up at the run's provider first (``openrouter``, ``openai``,
``mistral``), then by the model id alone (the package finds a provider whose
models match it), then among OpenRouter's models, whose ``vendor/model`` ids
cover most models any OpenAI-compatible server serves under that name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["CatalogPrices", "TierPrices", "catalog_model_ids", "catalog_prices", "catalog_version", "default_cache_dir"]

log = logging.getLogger(__name__)

# The pipeline's provider names -> genai-prices provider ids.
_PROVIDER_IDS = {"openrouter": "openrouter", "openai": "openai", "mistral": "mistral"}
FLEX = {"service_tier": "flex"}
BATCH = {"processing": "batch"}


@dataclass(frozen=True, slots=True)
class TierPrices:
    """USD per million tokens in one lane (None: the catalog has no such price)."""

    input: float | None
    output: float | None
    cache_read: float | None = None
    cache_write: float | None = None


@dataclass(frozen=True, slots=True)
class CatalogPrices:
    """One model's prices in the catalog."""

    model_id: str
    provider_id: str
    standard: TierPrices
    context_window: int | None
    flex: TierPrices | None = None
    """OpenAI's ``service_tier = "flex"`` prices, when the model has them."""
    batch: TierPrices | None = None
    """Batch API prices, when the catalog lists them."""


def default_cache_dir() -> Path:
    """The cache folder: ``$PIPELINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline``."""
    if env_dir := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env_dir).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "pipeline"
    return Path.home() / ".cache" / "pipeline"


def catalog_version() -> str:
    """``genai-prices 0.2.5`` (or "genai-prices (not installed)")."""
    version = _installed_version()
    return "genai-prices (not installed)" if version is None else f"genai-prices {version}"


def catalog_prices(model: str, provider: str) -> CatalogPrices | None:
    """The catalog's prices of ``model`` as served by ``provider``, or None when it has none."""
    return _cached_lookup(model.strip().lower(), provider)


@lru_cache(maxsize=1)
def _installed_version() -> str | None:
    """genai-prices' version from its metadata (the package itself is not imported), or None.

    The ``genai_prices-X.Y.Z.dist-info`` folder beside the package names it: finding
    that folder is a directory listing, where ``importlib.metadata`` scans every
    entry of ``sys.path`` (0.01 s of a rerun). Any other layout asks it.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("genai_prices")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin is not None:
        found = sorted(Path(spec.origin).parent.parent.glob("genai_prices-*.dist-info"))
        if len(found) == 1:
            return found[0].name.removeprefix("genai_prices-").removesuffix(".dist-info")
    try:
        from importlib.metadata import version

        return version("genai-prices")
    except Exception:  # installed without metadata
        return None


def catalog_model_ids(provider: str) -> list[str]:
    """The ids of the models the catalog lists for ``provider`` (empty when it has none)."""
    snapshot = _snapshot()
    own = _PROVIDER_IDS.get(provider)
    if snapshot is None or own is None:
        return []
    found = next((p for p in snapshot.providers if p.id == own), None)
    return [model.id for model in found.models] if found is not None else []


@lru_cache(maxsize=4096)
def _cached_lookup(model: str, provider: str) -> CatalogPrices | None:
    version = _installed_version()
    if version is None:
        return None
    stored = _DiskCache(version)
    found, hit = stored.get(model, provider)
    if hit:
        return found
    snapshot = _snapshot()
    if snapshot is None:
        return None
    found, timeless = _lookup(snapshot, model, provider)
    if timeless:
        stored.put(model, provider, found)
    return found


def _lookup(snapshot: Any, model: str, provider: str) -> tuple[CatalogPrices | None, bool]:
    """The prices, and whether they hold at any time (no start date, no time of day: safe to keep)."""
    now = datetime.now(UTC)
    timeless = True
    for provider_id in _candidates(provider):
        try:
            found_provider, info = snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            continue
        timeless = timeless and _timeless(info, now)
        standard = _tier(info.get_prices(now))
        if standard.input is None or standard.output is None:
            continue
        own = any(candidate is info for candidate in found_provider.models)
        found = CatalogPrices(
            model_id=info.id,
            provider_id=found_provider.id,
            standard=standard,
            context_window=info.context_window,
            flex=_variant(info, now, FLEX) if own else None,
            batch=_variant(info, now, BATCH) if own else None,
        )
        return found, timeless
    return None, timeless


def _timeless(info: Any, now: datetime) -> bool:
    """True when the model's prices can no longer change with the clock (until another version).

    A price that started on a past date stays; one that starts later, or holds
    at some hours only (off-peak prices), is looked up again at every run.
    """
    constraints = [p.constraint for p in info.prices] if isinstance(info.prices, list) else []
    constraints += [variant.constraint for variant in info.price_variants or ()]
    return all(_settled(constraint, now) for constraint in constraints)


def _settled(constraint: Any, now: datetime) -> bool:
    if constraint is None:
        return True
    start = getattr(constraint, "start_date", None)
    return start is not None and not hasattr(constraint, "start_time") and start <= now.date()


class _DiskCache:
    """Lookups kept in ``catalog-<version>.json`` in the cache folder; any trouble reads as a miss.

    The file is rewritten whole (through a temporary file and a rename) when a
    lookup is added: two processes adding at once may lose one entry, never
    corrupt the file, and a lost entry is only looked up again.
    """

    def __init__(self, version: str) -> None:
        self.path = default_cache_dir() / f"catalog-{version}.json"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, model: str, provider: str) -> tuple[CatalogPrices | None, bool]:
        """(The stored answer, whether there was one: None is an answer too, "not in the catalog")."""
        key = f"{provider}\t{model}"
        entries = self._read()
        if key not in entries:
            return None, False
        try:
            return _from_json(entries[key]), True
        except (KeyError, TypeError, ValueError):
            return None, False

    def put(self, model: str, provider: str, found: CatalogPrices | None) -> None:
        entries = self._read()
        entries[f"{provider}\t{model}"] = None if found is None else asdict(found)
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".catalog-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(entries, out)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache folder: look it up again next time
            log.debug("cannot keep catalog prices in %s: %s", self.path, exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _from_json(raw: dict[str, Any] | None) -> CatalogPrices | None:
    if raw is None:
        return None

    def tier(value: dict[str, Any] | None) -> TierPrices | None:
        return None if value is None else TierPrices(**value)

    standard = tier(raw["standard"])
    if standard is None:
        raise ValueError("no standard prices")
    return CatalogPrices(
        model_id=str(raw["model_id"]),
        provider_id=str(raw["provider_id"]),
        standard=standard,
        context_window=raw["context_window"],
        flex=tier(raw.get("flex")),
        batch=tier(raw.get("batch")),
    )


def _candidates(provider: str) -> list[str | None]:
    own = _PROVIDER_IDS.get(provider)
    candidates: list[str | None] = [own] if own else []
    candidates.append(None)  # any provider whose models match the id
    if own != "openrouter":
        candidates.append("openrouter")
    return candidates


def _snapshot() -> Any:
    """The snapshot bundled with the installed package (never an auto-updated one)."""
    try:
        from genai_prices import data_snapshot
    except ImportError:
        log.debug("genai-prices is not installed: no catalog prices")
        return None
    return data_snapshot._bundled_snapshot()


def _variant(info: Any, now: datetime, when: dict[str, str]) -> TierPrices | None:
    """Prices of a variant (flex, batch) the model really has, not the standard ones returned for a miss."""
    for variant in info.price_variants or ():
        if variant.when != when:
            continue
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        return _tier(info.get_prices(now, when))
    return None


def _tier(price: Any) -> TierPrices:
    return TierPrices(
        input=_per_million(getattr(price, "input_mtok", None)),
        output=_per_million(getattr(price, "output_mtok", None)),
        cache_read=_per_million(getattr(price, "cache_read_mtok", None)),
        cache_write=_per_million(getattr(price, "cache_write_mtok", None)),
    )


def _per_million(value: Any) -> float | None:
    """A price per million tokens; tiered prices give their base (the price below the first tier)."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    if isinstance(base, Decimal | int | float):
        return float(base)
    return None
