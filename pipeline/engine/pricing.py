"""Model prices and context windows, without network access at run time.

Where a model's figures come from, most trusted first:

1. the job file (``input_price`` / ``output_price``, each on its own);
2. a local model: free, and its context window is the server's ``n_ctx``;
3. the price cache written by :func:`refresh_prices` (``pipeline prices --refresh``);
4. the built-in table ``prices.json`` shipped with the package;
5. unknown: prices ``None``, so no cost can be computed.

The context length always comes from the cache or table, even when the job
file overrides the prices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

import aiohttp

from pipeline.errors import UnavailableError

__all__ = ["ModelInfo", "cache_path", "known_models", "model_info", "refresh_prices"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
CACHE_FILE = "prices.json"
_PER_MILLION = 1_000_000


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

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for the given tokens, or None when either price is unknown."""
        if self.input_per_million is None or self.output_per_million is None:
            return None
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / _PER_MILLION


@dataclass(frozen=True)
class _Entry:
    """One model's row in the cache or the built-in table."""

    input_per_million: float
    output_per_million: float
    context_length: int | None


# --------------------------------------------------------------------------
# Lookup.


def model_info(
    model: str,
    *,
    free: bool = False,
    input_price: float | None = None,
    output_price: float | None = None,
    cache_dir: Path | None = None,
) -> ModelInfo:
    """Prices and context window of ``model``, following the precedence above.

    ``input_price`` and ``output_price`` are the job file's overrides in USD
    per million tokens; each one replaces only its own price.
    """
    if free:
        entry: _Entry | None = _Entry(0.0, 0.0, None)
        base_source = "local model (free)"
    else:
        entry, base_source = _lookup(model, cache_dir)
    source = _describe_source(base_source, input_price is not None, output_price is not None)
    if input_price is None and entry is not None:
        input_price = entry.input_per_million
    if output_price is None and entry is not None:
        output_price = entry.output_per_million
    return ModelInfo(
        model=model,
        input_per_million=input_price,
        output_per_million=output_price,
        context_length=entry.context_length if entry else None,
        source=source,
    )


def _describe_source(base_source: str, input_overridden: bool, output_overridden: bool) -> str:
    """ "job file" when both prices come from it, both sources when it sets just one."""
    if input_overridden and output_overridden:
        return "job file"
    if input_overridden:
        return f"job file (input price), {base_source} (output price)"
    if output_overridden:
        return f"job file (output price), {base_source} (input price)"
    return base_source


def _lookup(model: str, cache_dir: Path | None) -> tuple[_Entry | None, str]:
    """The model's entry from the price cache, else the built-in table, else unknown."""
    cached = _read_cache(cache_path(cache_dir))
    if cached is not None:
        entries, source = cached
        entry = _find(entries, model)
        if entry is not None:
            return entry, source
    table = _builtin_table()
    entry = _find(table.entries, model, table.aliases)
    if entry is not None:
        return entry, f"built-in table ({table.as_of})"
    return None, "unknown"


def known_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every model with known prices, sorted by id: the cache's, then the built-in table's others."""
    found: dict[str, ModelInfo] = {}
    cached = _read_cache(cache_path(cache_dir))
    if cached is not None:
        entries, source = cached
        found.update({model: _info(model, entry, source) for model, entry in entries.items()})
    table = _builtin_table()
    source = f"built-in table ({table.as_of})"
    for model, entry in table.entries.items():
        found.setdefault(model, _info(model, entry, source))
    return [found[model] for model in sorted(found)]


def _info(model: str, entry: _Entry, source: str) -> ModelInfo:
    return ModelInfo(model, entry.input_per_million, entry.output_per_million, entry.context_length, source)


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
    return _Entry(float(input_price), float(output_price), _context_length(fields.get("context_length")))


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


def default_cache_dir() -> Path:
    """The cache folder: ``$PIPELINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline``."""
    if env_dir := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env_dir).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "pipeline"
    return Path.home() / ".cache" / "pipeline"


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
) -> tuple[Path, int]:
    """Download every model's prices from ``GET {base_url}/models`` into the cache.

    Returns the cache file and the number of models written. Network and
    HTTP failures raise :class:`UnavailableError` (exit 3); the old cache is then left
    untouched.
    """
    base = base_url.rstrip("/")
    url = f"{base}/models"
    body = await _fetch_json(url, timeout_s)
    entries = _parse_models(body, url)
    payload = {
        "source": base,
        "refreshed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": {
            model: {
                "input_per_million": entry.input_per_million,
                "output_per_million": entry.output_per_million,
                "context_length": entry.context_length,
            }
            for model, entry in sorted(entries.items())
        },
    }
    path = cache_path(cache_dir)
    await asyncio.to_thread(_write_atomically, path, json.dumps(payload, indent=1))
    return path, len(entries)


async def _fetch_json(url: str, timeout_s: float) -> Any:
    """GET ``url`` and decode its JSON body, turning every failure into an UnavailableError."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                snippet = (await response.text(errors="replace"))[:200]
                raise UnavailableError(
                    f"could not refresh prices from {url}: HTTP {response.status} {snippet}".rstrip()
                )
            # content_type=None: accept JSON even if served with another type.
            return await response.json(content_type=None)
    except TimeoutError as exc:
        raise UnavailableError(f"could not refresh prices from {url}: no answer within {timeout_s:g} s") from exc
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        raise UnavailableError(f"could not refresh prices from {url}: {reason}") from exc
    except ValueError as exc:  # the body is not JSON
        raise UnavailableError(f"could not refresh prices from {url}: invalid JSON: {exc}") from exc


def _parse_models(body: Any, url: str) -> dict[str, _Entry]:
    """OpenRouter's ``{"data": [{"id", "context_length", "pricing": {...}}]}`` as entries.

    Prices there are USD per token, as strings. Entries whose prices cannot be
    parsed or are negative are skipped: OpenRouter lists variable-price
    routers (such as ``openrouter/auto``) with ``"-1"``.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise UnavailableError(f"could not refresh prices from {url}: no 'data' list in the response")
    entries: dict[str, _Entry] = {}
    for item in data:
        parsed = _parse_model(item)
        if parsed is not None:
            entries[parsed[0]] = parsed[1]
    if not entries:
        # Writing an empty cache would silently hide the built-in table's
        # figures behind a "refreshed" label; refuse instead.
        raise UnavailableError(f"could not refresh prices from {url}: no model with usable prices")
    return entries


def _parse_model(item: Any) -> tuple[str, _Entry] | None:
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
    return item["id"], _Entry(prompt, completion, _context_length(item.get("context_length")))


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
