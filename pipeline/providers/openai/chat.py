"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp's C++ ``llama-server``, ...).

The default for a ``base_url`` no other provider claims. Structured output as
OpenAI's strict ``json_schema`` response format; ``usage`` carries tokens but
no cost, so cost is tokens x the model's price.
"""

from __future__ import annotations

from pipeline.providers.base import Provider


class OpenAI(Provider):
    name = "openai"
