"""Mistral's own API: the seed is called ``random_seed``; usage has tokens but no cost."""

from __future__ import annotations

from typing import Any

from pipeline.providers.base import Provider


class Mistral(Provider):
    name = "mistral"

    def matches(self, base_url: str) -> bool:
        return "api.mistral.ai" in base_url

    def adapt_params(self, params: dict[str, Any]) -> dict[str, Any]:
        if "seed" in params:
            params["random_seed"] = params.pop("seed")
        return params
