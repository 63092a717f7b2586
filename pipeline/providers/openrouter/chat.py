"""OpenRouter (the default): ``usage.cost`` on every response, routing that must honour schemas."""

from __future__ import annotations

from typing import Any

import aiohttp

from pipeline.providers.base import Provider
from pipeline.providers.ratelimits import RateLimitInfo, fetch_key_limit


class OpenRouter(Provider):
    name = "openrouter"
    reports_cost = True

    def matches(self, base_url: str) -> bool:
        return "openrouter.ai" in base_url

    async def stated_rate_limit(self, session: aiohttp.ClientSession, base_url: str) -> RateLimitInfo | None:
        # GET /key's rate_limit: deprecated (it answers requests -1), used while positive.
        return await fetch_key_limit(session, base_url)

    def structured_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        # Route only to endpoints that honour the schema; merged into any
        # [model.params] provider object rather than replacing it.
        return {**super().structured_fields(schema), "provider": {"require_parameters": True}}
