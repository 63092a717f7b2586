"""OpenRouter (the default): ``usage.cost`` on every response, routing that must honour schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.providers.openrouter.batches import OpenRouterBatches
from pipeline.providers.openrouter.models import fetch_models
from pipeline.providers.provider import Provider
from pipeline.providers.ratelimits import RateLimitInfo, fetch_key_limit

if TYPE_CHECKING:
    import aiohttp

    from pipeline.config.job import ModelSpec
    from pipeline.providers.catalogue import ListedModel


class OpenRouter(Provider):
    name = "openrouter"

    def matches(self, base_url: str) -> bool:
        return "openrouter.ai" in base_url

    async def stated_rate_limit(self, session: aiohttp.ClientSession, base_url: str) -> RateLimitInfo | None:
        # GET /key's rate_limit: deprecated (it answers requests -1), used while positive.
        return await fetch_key_limit(session, base_url)

    def structured_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        # Route only to endpoints that honour the schema; merged into any
        # [model.params] provider object rather than replacing it.
        return {**super().structured_fields(schema), "provider": {"require_parameters": True}}

    def batches(self, spec: ModelSpec, model_name: str) -> OpenRouterBatches:
        return OpenRouterBatches(spec.batch_url or f"{spec.base_url}/batches", model_name)

    async def catalogue(self, base_url: str, timeout_s: float) -> list[ListedModel]:
        return await fetch_models(base_url, timeout_s)
