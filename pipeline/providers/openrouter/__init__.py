"""The OpenRouter provider: its chat dialect and batch API."""

from pipeline.providers.openrouter.chat import OpenRouter

__all__ = ["OpenRouter"]
