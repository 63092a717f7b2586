"""The provider registry's contract: every registered provider keeps the rules the engine relies on.

Walks the registry, so a provider added with one registry line is checked
without a test of its own here.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from pathlib import Path

import pytest

import pipeline.providers as providers
from pipeline.config.job import ModelSpec
from pipeline.errors import JobError
from pipeline.providers import NAMES, REGISTRY, batch_providers, get_provider, guess_provider
from pipeline.providers.batches import BatchAdapter, BatchRequest
from pipeline.providers.provider import Provider

ALL = [pytest.param(p, id=name) for name, p in REGISTRY.items()]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}


def test_the_registry_lists_each_provider_once_under_its_own_name() -> None:
    assert {"openrouter", "mistral", "openai", "local"} <= set(NAMES) and len(set(NAMES)) == len(NAMES)
    assert all(name == p.name and isinstance(p, Provider) for name, p in REGISTRY.items())


@pytest.mark.parametrize("provider", ALL)
def test_each_provider_lives_in_its_own_folder(provider: Provider) -> None:
    module = type(provider).__module__
    assert module == f"pipeline.providers.{provider.name}.chat"
    folder = Path(inspect.getfile(type(provider))).parent
    assert folder.name == provider.name
    assert getattr(importlib.import_module(f"pipeline.providers.{provider.name}"), type(provider).__name__)


@pytest.mark.parametrize("provider", ALL)
def test_structured_fields_are_json_and_carry_the_schema(provider: Provider) -> None:
    fields = provider.structured_fields(json.loads(json.dumps(SCHEMA)))
    assert json.loads(json.dumps(fields)) == fields
    assert "response_format" in fields
    assert SCHEMA in _values(fields["response_format"])


@pytest.mark.parametrize("provider", ALL)
def test_adapt_params_keeps_what_it_does_not_rename(provider: Provider) -> None:
    params = provider.adapt_params({"top_p": 0.5, "seed": 3})
    assert params["top_p"] == 0.5
    assert 3 in params.values()  # a seed may be renamed (Mistral's random_seed), never dropped


@pytest.mark.parametrize("provider", ALL)
def test_a_batch_api_is_a_complete_adapter_or_none(provider: Provider) -> None:
    spec = ModelSpec(provider=provider.name, base_url="https://example.test/v1")
    adapter = provider.batches(spec, "m/x")
    if provider.name not in batch_providers():
        assert adapter is None
        return
    assert adapter is not None
    assert adapter.name == provider.name
    assert adapter.max_requests > 0 and adapter.max_bytes > 0
    for method in ("request_size", "submit", "poll", "results"):
        assert callable(getattr(adapter, method)), method
    assert adapter.request_size(BatchRequest("row-1", b'{"messages": []}')) > 0
    missing = [name for name in _protocol_members(BatchAdapter) if not hasattr(adapter, name)]
    assert not missing, missing


def test_the_providers_with_a_batch_api() -> None:
    assert {"openrouter", "mistral", "openai"} <= set(batch_providers()) and "local" not in batch_providers()


@pytest.mark.parametrize("provider", ALL)
def test_a_provider_that_claims_a_url_is_guessed_from_it(provider: Provider) -> None:
    own = {"openrouter": "https://openrouter.ai/api/v1", "mistral": "https://api.mistral.ai/v1"}
    if provider.name in own:
        assert guess_provider(own[provider.name]) is provider
    assert not provider.matches("http://127.0.0.1:8080/v1")


def test_an_unknown_provider_is_a_job_error_naming_the_known_ones() -> None:
    with pytest.raises(JobError, match=r"unknown provider 'bedrock' \(known: openrouter, mistral, openai, local"):
        providers.provider_for(ModelSpec(provider="bedrock"))


def _values(value: object) -> list[object]:
    """Every dict and value nested in ``value``."""
    found: list[object] = [value]
    if isinstance(value, dict):
        for item in value.values():
            found += _values(item)
    return found


def _protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol declares."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return sorted(names)


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"message": {"content": "ok \\u00e9"}, "finish_reason": "stop"}], "usage": {"cost": 1e-7}}',
        b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {"cost": NaN}}',
        b'\xef\xbb\xbf{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}',
    ],
    ids=["plain", "nan", "bom"],
)
def test_reply_bodies_parse_as_json_does_whichever_parser_reads_them(body: bytes) -> None:
    """The fast parser (orjson) and its fallback (json) read every body alike: what orjson
    refuses (NaN, a byte-order mark) still parses."""
    import json

    from pipeline.providers.base import _json_or_none

    expected = json.loads(body.decode("utf-8-sig"))
    assert repr(_json_or_none(body)) == repr(expected)


@pytest.mark.parametrize("provider", ALL)
async def test_a_price_list_is_read_by_its_provider_or_declined(provider: Provider) -> None:
    if type(provider).catalogue is Provider.catalogue:  # no listing: declined without a request
        assert await provider.catalogue("http://127.0.0.1:9/v1", 1) is None
    else:  # OpenRouter's listing: read from a loopback server in tests/integration/test_pricing.py
        assert provider.name == "openrouter"


def test_refreshing_prices_from_a_provider_without_a_list_is_a_clean_error(tmp_path: Path) -> None:
    from pipeline.engine.pricing import refresh_prices
    from pipeline.errors import UnavailableError

    refresh = refresh_prices("http://127.0.0.1:9/v1", cache_dir=tmp_path, provider=get_provider("mistral"))
    with pytest.raises(UnavailableError, match="publishes no price list"):
        asyncio.run(refresh)
    assert list(tmp_path.iterdir()) == []  # the cache is not touched
