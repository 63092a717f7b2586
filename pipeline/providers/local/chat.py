"""``[model] provider = "local"``: a model on this machine, served by llama-cpp-python (see :mod:`.server`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pipeline.providers.local.server import local_server
from pipeline.providers.provider import Provider

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec


class Local(Provider):
    """A model on this machine: llama-cpp-python's server, started for the run and stopped after it."""

    name = "local"
    needs_key = False
    free = True
    rate_limited = False  # one request at a time, no limit: "auto" means no cap

    def structured_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        # llama-cpp-python's server rejects OpenAI's json_schema form with a 500.
        return {"response_format": {"type": "json_object", "schema": schema}}

    def model_name(self, spec: ModelSpec) -> str:
        if "name" in spec.model_fields_set:
            return spec.name
        return "local/smollm2-135m-instruct" if spec.path is None else f"local/{spec.path.stem}"

    def context_length(self, spec: ModelSpec) -> int | None:
        return spec.n_ctx

    @contextlib.asynccontextmanager
    async def server(self, spec: ModelSpec) -> AsyncIterator[str | None]:
        async with local_server(spec.path, n_ctx=spec.n_ctx) as base_url:
            yield base_url
