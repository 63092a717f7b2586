"""Providers: one folder each; the registry below is the only list of them.

To add a provider, write a folder with a :class:`~pipeline.providers.provider.Provider`
subclass (``chat.py``, and ``batches.py`` when it has a batch API) and add an
instance to ``_ALL``; docs/architecture.md shows a worked example.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pipeline.errors import JobError
from pipeline.providers.local import Local
from pipeline.providers.mistral import Mistral
from pipeline.providers.openai import OpenAI
from pipeline.providers.openrouter import OpenRouter
from pipeline.providers.provider import Provider

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec
    from pipeline.structured import StructuredSpec

_ALL: tuple[Provider, ...] = (OpenRouter(), Mistral(), OpenAI(), Local())
REGISTRY: dict[str, Provider] = {p.name: p for p in _ALL}
NAMES = tuple(REGISTRY)


def get_provider(name: str) -> Provider:
    """The registered provider ``name``; a JobError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise JobError(f"[model] provider: unknown provider {name!r} (known: {', '.join(NAMES)})") from None


def guess_provider(base_url: str) -> Provider:
    """The provider whose URL this is; any other server speaks OpenAI's dialect."""
    return next((p for p in _ALL if p.matches(base_url)), REGISTRY["openai"])


def provider_for(spec: ModelSpec) -> Provider:
    return get_provider(spec.provider) if spec.provider else guess_provider(spec.base_url)


def batch_providers() -> list[str]:
    """The providers with a batch API, by name."""
    return [p.name for p in _ALL if _has_batches(p)]


def _has_batches(provider: Provider) -> bool:
    return type(provider).batches is not Provider.batches


def request_fields(structured: StructuredSpec, name: str) -> dict[str, Any]:
    """The request-body fields that ask provider ``name`` for replies fitting ``structured`` (a fresh copy)."""
    return get_provider(name).structured_fields(copy.deepcopy(structured.schema))


__all__ = [
    "NAMES",
    "REGISTRY",
    "Provider",
    "batch_providers",
    "get_provider",
    "guess_provider",
    "provider_for",
    "request_fields",
]
