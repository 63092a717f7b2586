"""Tests for pipeline.pricing, with a real aiohttp server standing in for OpenRouter."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline.engine import pricing
from pipeline.engine.pricing import ModelInfo, cache_path, model_info, refresh_prices
from pipeline.errors import PipelineError

MINISTRAL = "mistralai/ministral-8b"

# A trimmed copy of OpenRouter's GET /api/v1/models answer: prices are USD
# per token, as strings; "-1" marks variable-price routers.
OPENROUTER_MODELS: dict[str, Any] = {
    "data": [
        {
            "id": MINISTRAL,
            "name": "Mistral: Ministral 8B",
            "context_length": 131072,
            "pricing": {"prompt": "0.0000002", "completion": "0.0000003", "request": "0"},
            "top_provider": {"max_completion_tokens": None},
        },
        {
            "id": "openai/gpt-4o-mini",
            "context_length": 128000,
            "pricing": {
                "prompt": "0.00000015",
                "completion": "0.0000006",
                "input_cache_read": "0.000000075",
                "input_cache_write": "0.0000001875",
            },
        },
        {
            "id": "meta-llama/llama-3.2-1b-instruct:free",
            "context_length": 131072,
            "pricing": {"prompt": "0", "completion": "0"},
        },
        {"id": "openrouter/auto", "context_length": 2000000, "pricing": {"prompt": "-1", "completion": "-1"}},
        {"id": "broken/unparsable", "context_length": 4096, "pricing": {"prompt": "n/a", "completion": "0.000001"}},
        {"id": "broken/no-pricing", "context_length": 4096},
        {"id": "odd/no-context", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
        "not an object",
    ]
}


@dataclass
class FakeOpenRouter:
    """What the loopback server answers; tests change it between requests."""

    base_url: str = ""
    status: int = 200
    body: str = json.dumps(OPENROUTER_MODELS)
    hold: bool = False
    """When set, requests hang until the fixture tears down (for timeouts)."""
    released: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
async def openrouter() -> AsyncIterator[FakeOpenRouter]:
    """A real HTTP server on 127.0.0.1 serving ``/api/v1/models``."""
    fake = FakeOpenRouter()

    async def models(request: web.Request) -> web.Response:
        fake.requests.append(request.path)
        if fake.hold:
            await fake.released.wait()
        return web.Response(status=fake.status, text=fake.body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"http://{host}:{port}/api/v1"
    try:
        yield fake
    finally:
        fake.released.set()  # let a held request finish so cleanup does not wait for it
        await runner.cleanup()


@pytest.fixture(autouse=True)
def _no_ambient_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read or write the real user cache, whatever a test forgets to pass."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "ambient-cache"))


@pytest.fixture(autouse=True)
def _no_catalog(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache and table tests see no genai-prices catalog (tests named ..._catalog_... do)."""
    if "catalog" not in request.node.name:
        monkeypatch.setattr(pricing, "catalog_prices", lambda model, provider: None)


# --------------------------------------------------------------------------
# Built-in table, cost arithmetic, unknown models.


def test_builtin_ministral_8b(tmp_path: Path) -> None:
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert info == ModelInfo(MINISTRAL, 0.10, 0.10, 131072, "built-in table (2026-11)")


def test_cost_of_a_million_tokens_each_way(tmp_path: Path) -> None:
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert info.cost(1_000_000, 1_000_000) == pytest.approx(0.20)
    assert info.cost(0, 0) == 0
    assert info.cost(250, 50) == pytest.approx(300 * 0.10 / 1_000_000)


def test_cost_uses_each_price_for_its_own_tokens() -> None:
    info = ModelInfo("m", 1.0, 4.0, None, "job file")
    assert info.cost(2_000_000, 500_000) == pytest.approx(2.0 + 2.0)


def test_builtin_table_has_as_of_and_aliases(tmp_path: Path) -> None:
    raw = json.loads((Path(pricing.__file__).parent.parent / "prices.json").read_text())
    assert re.fullmatch(r"\d{4}-\d{2}", raw["as_of"])
    assert model_info("ministral-8b-2410", cache_dir=tmp_path).input_per_million == 0.10
    assert model_info("MistralAI/Ministral-3B", cache_dir=tmp_path).output_per_million == 0.04


def test_unknown_model(tmp_path: Path) -> None:
    info = model_info("nobody/never-heard-of-it", cache_dir=tmp_path)
    assert info == ModelInfo("nobody/never-heard-of-it", None, None, None, "unknown")
    assert info.cost(1000, 1000) is None


# --------------------------------------------------------------------------
# Precedence: job file > local > cache > table > unknown.


def test_job_prices_override_but_context_stays(tmp_path: Path) -> None:
    info = model_info(MINISTRAL, input_price=1.5, output_price=2.5, cache_dir=tmp_path)
    assert (info.input_per_million, info.output_per_million) == (1.5, 2.5)
    assert info.context_length == 131072
    assert info.source == "job file"


def test_each_job_price_overrides_independently(tmp_path: Path) -> None:
    only_input = model_info(MINISTRAL, input_price=1.0, cache_dir=tmp_path)
    assert (only_input.input_per_million, only_input.output_per_million) == (1.0, 0.10)
    assert only_input.source == "job file (input price), built-in table (2026-11) (output price)"
    only_output = model_info(MINISTRAL, output_price=0.0, cache_dir=tmp_path)
    assert (only_output.input_per_million, only_output.output_per_million) == (0.10, 0.0)
    assert only_output.source.startswith("job file (output price)")


def test_job_price_for_an_unknown_model_leaves_the_other_unknown(tmp_path: Path) -> None:
    info = model_info("nobody/x", input_price=1.0, cache_dir=tmp_path)
    assert (info.input_per_million, info.output_per_million) == (1.0, None)
    assert info.cost(1, 1) is None


def test_local_model_is_free_without_context(tmp_path: Path) -> None:
    info = model_info(MINISTRAL, free=True, cache_dir=tmp_path)
    assert info == ModelInfo(MINISTRAL, 0.0, 0.0, None, "local model (free)")
    assert info.cost(10**6, 10**6) == 0


def test_job_prices_beat_local(tmp_path: Path) -> None:
    info = model_info("local/smollm2", free=True, input_price=0.5, output_price=0.5, cache_dir=tmp_path)
    assert (info.input_per_million, info.output_per_million, info.source) == (0.5, 0.5, "job file")


async def test_refreshed_cache_beats_table(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert (info.input_per_million, info.output_per_million) == (0.2, 0.3)
    assert info.context_length == 131072
    assert re.fullmatch(
        rf"price cache \(refreshed \d{{4}}-\d\d-\d\d from {re.escape(openrouter.base_url)}\)",
        info.source,
    )
    # A model the cache lacks still comes from the table.
    assert model_info("mistralai/ministral-3b", cache_dir=tmp_path).source.startswith("built-in")
    # Job prices still win over the cache, and the cache's context is kept.
    overridden = model_info(MINISTRAL, input_price=9.0, output_price=9.0, cache_dir=tmp_path)
    assert (overridden.input_per_million, overridden.context_length) == (9.0, 131072)


# --------------------------------------------------------------------------
# A corrupt cache never breaks a lookup.


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "\xff\xfe garbage",
        "[]",
        "42",
        '{"models": {}}',
        '{"source": "x", "refreshed_at": "2026-01-01", "models": []}',
        '{"source": "x", "refreshed_at": "2026-01-01", "models": "nope"}',
    ],
)
def test_corrupt_cache_falls_back_to_table(tmp_path: Path, content: str) -> None:
    cache_path(tmp_path).write_text(content, encoding="utf-8")
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert (info.input_per_million, info.source) == (0.10, "built-in table (2026-11)")


def test_bad_cache_entry_falls_back_to_table(tmp_path: Path) -> None:
    bad_entries: dict[str, Any] = {
        MINISTRAL: {"input_per_million": -1, "output_per_million": 0.1, "context_length": 5},
        "mistralai/ministral-3b": {"input_per_million": "cheap", "output_per_million": 0.1},
        "x/no-dict": 7,
        "x/good": {"input_per_million": 1, "output_per_million": 2, "context_length": "big"},
    }
    cache_path(tmp_path).write_text(
        json.dumps(
            {"source": "http://example.invalid", "refreshed_at": "2026-11-20T00:00:00+00:00", "models": bad_entries}
        )
    )
    assert model_info(MINISTRAL, cache_dir=tmp_path).source == "built-in table (2026-11)"
    assert model_info("mistralai/ministral-3b", cache_dir=tmp_path).input_per_million == 0.04
    good = model_info("x/good", cache_dir=tmp_path)
    assert (good.input_per_million, good.output_per_million, good.context_length) == (1.0, 2.0, None)


def test_unreadable_cache_directory_is_ignored(tmp_path: Path) -> None:
    cache_path(tmp_path).mkdir(parents=True)  # a directory where the file should be
    assert model_info(MINISTRAL, cache_dir=tmp_path).source == "built-in table (2026-11)"


# --------------------------------------------------------------------------
# Where the cache lives.


def test_cache_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_path(tmp_path / "explicit") == tmp_path / "explicit" / "prices.json"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "env" / "prices.json"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "")  # empty counts as unset
    assert cache_path() == tmp_path / "xdg" / "pipeline" / "prices.json"
    monkeypatch.delenv("PIPELINE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "pipeline" / "prices.json"


# --------------------------------------------------------------------------
# refresh_prices against the loopback server.


async def test_refresh_parses_openrouter_listing(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    path, count = await refresh_prices(openrouter.base_url + "/", cache_dir=tmp_path / "new")
    assert openrouter.requests == ["/api/v1/models"]
    assert path == tmp_path / "new" / "prices.json"
    assert count == 4  # the router at "-1" and the two broken entries are skipped
    cached = json.loads(path.read_text())
    assert cached["source"] == openrouter.base_url
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", cached["refreshed_at"])
    assert cached["models"] == {
        MINISTRAL: {"input_per_million": 0.2, "output_per_million": 0.3, "context_length": 131072},
        "openai/gpt-4o-mini": {
            "input_per_million": 0.15,
            "output_per_million": 0.6,
            "context_length": 128000,
            "cached_input_per_million": 0.075,
            "cache_write_per_million": 0.1875,
        },
        "meta-llama/llama-3.2-1b-instruct:free": {
            "input_per_million": 0.0,
            "output_per_million": 0.0,
            "context_length": 131072,
        },
        "odd/no-context": {
            "input_per_million": 1.0,
            "output_per_million": 2.0,
            "context_length": None,
        },
    }
    # Written atomically: no temporary file is left next to the cache.
    assert sorted(p.name for p in path.parent.iterdir()) == ["prices.json"]
    free = model_info("meta-llama/llama-3.2-1b-instruct:free", cache_dir=tmp_path / "new")
    assert free.cost(10**6, 10**6) == 0


async def test_refresh_replaces_previous_cache(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    openrouter.body = json.dumps(
        {
            "data": [
                {"id": MINISTRAL, "context_length": 65536, "pricing": {"prompt": "0.000001", "completion": "0.000001"}},
            ]
        }
    )
    _, count = await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    assert count == 1
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert (info.input_per_million, info.context_length) == (1.0, 65536)
    assert model_info("openai/gpt-4o-mini", cache_dir=tmp_path).source == "unknown"


async def test_refresh_default_cache_dir_from_env(
    openrouter: FakeOpenRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "from-env"))
    path, _ = await refresh_prices(openrouter.base_url)
    assert path == tmp_path / "from-env" / "prices.json"
    assert model_info(MINISTRAL).input_per_million == 0.2


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, '{"error": {"code": 500, "message": "boom"}}', "HTTP 500"),
        (401, '{"error": {"code": 401, "message": "no"}}', "HTTP 401"),
        (200, "<html>not json</html>", "invalid JSON"),
        (200, '{"models": []}', "no 'data' list"),
        (
            200,
            '{"data": [{"id": "r", "pricing": {"prompt": "-1", "completion": "-1"}}]}',
            "no model with usable prices",
        ),
    ],
)
async def test_refresh_failures_keep_old_cache(
    openrouter: FakeOpenRouter, tmp_path: Path, status: int, body: str, reason: str
) -> None:
    await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    before = cache_path(tmp_path).read_bytes()
    openrouter.status, openrouter.body = status, body
    with pytest.raises(PipelineError) as caught:
        await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"could not refresh prices from {openrouter.base_url}/models: ")
    assert reason in message
    assert cache_path(tmp_path).read_bytes() == before


async def test_refresh_timeout(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    openrouter.hold = True
    with pytest.raises(PipelineError, match=r"no answer within 0\.2 s") as caught:
        await refresh_prices(openrouter.base_url, timeout_s=0.2, cache_dir=tmp_path)
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert not cache_path(tmp_path).exists()


async def test_refresh_connection_refused(tmp_path: Path) -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/v1"
    with pytest.raises(PipelineError, match=re.escape(f"could not refresh prices from {url}/models")) as caught:
        await refresh_prices(url, timeout_s=5, cache_dir=tmp_path)
    assert caught.value.__cause__ is not None
    assert not cache_path(tmp_path).exists()


async def test_refresh_unwritable_cache_dir(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(PipelineError, match="could not write the price cache"):
        await refresh_prices(openrouter.base_url, cache_dir=blocker)


# --------------------------------------------------------------------------
# The genai-prices catalog: every model it knows, offline, with cache prices and tiers.


def test_catalog_prices_models_the_table_lacks(tmp_path: Path) -> None:
    info = model_info("openai/gpt-4o-mini", cache_dir=tmp_path)
    assert (info.input_per_million, info.output_per_million, info.cached_input_per_million) == (0.15, 0.6, 0.075)
    assert info.source.startswith("genai-prices") and info.context_length == 128000
    claude = model_info("anthropic/claude-sonnet-4.5", cache_dir=tmp_path)
    assert (claude.input_per_million, claude.cached_input_per_million, claude.cache_write_per_million) == (
        3.0,
        0.3,
        3.75,
    )
    assert claude.cost(1_000_000, 0, cached=900_000) == pytest.approx(0.1 * 3.0 + 0.9 * 0.3)


def test_catalog_beats_table_and_the_table_keeps_the_context(tmp_path: Path) -> None:
    info = model_info(MINISTRAL, cache_dir=tmp_path)
    assert (info.input_per_million, info.context_length) == (0.10, 131072)
    assert info.source.startswith("genai-prices")
    assert [f.key for f in info.missing()] == ["cached_input_price_per_million", "cache_write_price_per_million"]


def test_catalog_job_cache_prices_beat_the_catalog(tmp_path: Path) -> None:
    info = model_info("openai/gpt-4o-mini", cached_input_price=0.01, cache_dir=tmp_path)
    assert info.cached_input_per_million == 0.01 and info.input_per_million == 0.15
    assert "cached input price: job file" in info.source


def test_catalog_flex_tier_prices(tmp_path: Path) -> None:
    standard = model_info("gpt-5-mini", provider="openai", cache_dir=tmp_path)
    flex = model_info("gpt-5-mini", provider="openai", service_tier="flex", cache_dir=tmp_path)
    assert flex.input_per_million == pytest.approx(standard.input_per_million / 2)
    assert "flex" in flex.source and standard.flex is not None


def test_catalog_refreshed_cache_beats_the_catalog(tmp_path: Path) -> None:
    path = cache_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"input_per_million": 0.2, "output_per_million": 0.7, "cached_input_per_million": 0.02}
    path.write_text(json.dumps({"source": "x", "refreshed_at": "2026-12-01", "models": {"openai/gpt-4o-mini": entry}}))
    info = model_info("openai/gpt-4o-mini", cache_dir=tmp_path)
    assert (info.input_per_million, info.cached_input_per_million) == (0.2, 0.02)
    assert info.source.startswith("price cache") and info.context_length == 128000


def test_cost_prices_cached_and_written_tokens() -> None:
    info = ModelInfo("m", 1.0, 2.0, None, "job file", cached_input_per_million=0.1, cache_write_per_million=1.25)
    assert info.cost(1_000_000, 0, cached=600_000, cache_write=200_000) == pytest.approx(0.2 + 0.06 + 0.25)
    unknown = ModelInfo("m", 1.0, 2.0, None, "job file")
    assert unknown.cost(1_000_000, 0, cached=600_000) == pytest.approx(1.0)  # never less than it may cost


async def test_refresh_keeps_cache_read_and_write_prices(openrouter: FakeOpenRouter, tmp_path: Path) -> None:
    await refresh_prices(openrouter.base_url, cache_dir=tmp_path)
    info = model_info("openai/gpt-4o-mini", cache_dir=tmp_path)
    assert (info.cached_input_per_million, info.cache_write_per_million) == (0.075, 0.1875)
    assert info.source.startswith("price cache")
    assert model_info(MINISTRAL, cache_dir=tmp_path).cached_input_per_million is None
