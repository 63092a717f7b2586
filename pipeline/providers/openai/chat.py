"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp's C++ ``llama-server``, ...).

The default for a ``base_url`` no other provider claims. Structured output as
OpenAI's strict ``json_schema`` response format; ``usage`` carries tokens but
no cost, so cost is tokens x the model's price.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.providers.openai.batches import OpenAIBatches
from pipeline.providers.provider import Provider

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec


class OpenAI(Provider):
    name = "openai"
    prompt_cache_key = True

    def batches(self, spec: ModelSpec, model_name: str) -> OpenAIBatches:
        return OpenAIBatches(spec.base_url, spec.batch_url)
