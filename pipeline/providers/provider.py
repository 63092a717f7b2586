"""The :class:`Provider` rules: what one kind of server wants, in one folder per provider.

A provider's own rules (how its URL looks, how it wants structured output,
parameters it names differently, whether it needs a key, a server to start,
its batch API, its price list) live in ``providers/<name>/``, as a subclass
registered in ``providers/__init__.py``. See docs/architecture.md, "Adding a
provider".
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.providers.ratelimits import RateLimitInfo

if TYPE_CHECKING:
    import aiohttp

    from pipeline.config.job import ModelSpec
    from pipeline.providers.batches import BatchAdapter
    from pipeline.providers.catalogue import ListedModel


class Provider:
    """One kind of server's rules. A new provider is one folder with a subclass, registered by name."""

    name: ClassVar[str] = "openai"
    needs_key: ClassVar[bool] = True
    free: ClassVar[bool] = False  # no price to pay (a model on this machine)
    rate_limited: ClassVar[bool] = True  # a limit for requests_per_minute = "auto" to learn
    prompt_cache_key: ClassVar[bool] = False  # routes requests sharing a prefix to one cache by this key

    async def stated_rate_limit(self, session: aiohttp.ClientSession, base_url: str) -> RateLimitInfo | None:
        """A rate limit the provider states outside replies (asked once per run, best effort)."""
        return None

    def matches(self, base_url: str) -> bool:
        """True when ``base_url`` is this provider's own (for guessing it when the job names none)."""
        return False

    def adapt_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``[model.params]`` under this provider's names."""
        return params

    def structured_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Fields to merge into the request body to ask for replies that fit ``schema``."""
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "strict": True, "schema": schema},
            }
        }

    def model_name(self, spec: ModelSpec) -> str:
        return spec.name

    def context_length(self, spec: ModelSpec) -> int | None:
        """The context window when the provider knows it (None: from the price table)."""
        return None

    @contextlib.asynccontextmanager
    async def server(self, spec: ModelSpec) -> AsyncIterator[str | None]:
        """A server this provider starts for the run (its base URL), or None to use ``base_url``."""
        yield None

    def batches(self, spec: ModelSpec, model_name: str) -> BatchAdapter | None:
        """This provider's batch API for ``[model] mode = "batch"``, or None when it has none."""
        return None

    async def catalogue(self, base_url: str, timeout_s: float) -> list[ListedModel] | None:
        """Every model this provider lists with usable prices (``pipeline prices --refresh``), or None
        when it publishes no price list. A listing that cannot be read is an
        :class:`~pipeline.errors.UnavailableError`.
        """
        return None
