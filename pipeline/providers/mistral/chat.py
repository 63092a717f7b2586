"""Mistral's own API: the seed is called ``random_seed``; usage has tokens but no cost."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.providers.mistral.batches import MistralBatches
from pipeline.providers.provider import Provider

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec


class Mistral(Provider):
    name = "mistral"
    prompt_cache_key = True

    def matches(self, base_url: str) -> bool:
        return "api.mistral.ai" in base_url

    def adapt_params(self, params: dict[str, Any]) -> dict[str, Any]:
        if "seed" in params:
            params["random_seed"] = params.pop("seed")
        return params

    def batches(self, spec: ModelSpec, model_name: str) -> MistralBatches:
        return MistralBatches(spec.base_url, spec.batch_url, model_name)
