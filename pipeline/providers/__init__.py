"""Providers: one module each; the registry below is the only list of them.

To add a provider, write a module with a :class:`~pipeline.providers.base.Provider`
subclass and add an instance to ``_ALL``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pipeline.providers.base import Provider
from pipeline.providers.local import Local
from pipeline.providers.mistral import Mistral
from pipeline.providers.openai import OpenAI
from pipeline.providers.openrouter import OpenRouter

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec
    from pipeline.structured import StructuredSpec

_ALL: tuple[Provider, ...] = (OpenRouter(), Mistral(), OpenAI(), Local())
REGISTRY: dict[str, Provider] = {p.name: p for p in _ALL}
ALIASES = {"llamacpp": "local"}
NAMES = tuple(REGISTRY)


def get_provider(name: str) -> Provider:
    try:
        return REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(NAMES)})") from None


def guess_provider(base_url: str) -> Provider:
    """The provider whose URL this is; any other server speaks OpenAI's dialect."""
    return next((p for p in _ALL if p.matches(base_url)), REGISTRY["openai"])


def provider_for(spec: ModelSpec) -> Provider:
    return get_provider(spec.provider) if spec.provider else guess_provider(spec.base_url)


def request_fields(structured: StructuredSpec, name: str) -> dict[str, Any]:
    """The request-body fields that ask provider ``name`` for replies fitting ``structured`` (a fresh copy)."""
    return get_provider(name).structured_fields(copy.deepcopy(structured.schema))


__all__ = ["NAMES", "REGISTRY", "Provider", "get_provider", "guess_provider", "provider_for", "request_fields"]
