"""The OpenAI provider: its chat dialect and batch API."""

from pipeline.providers.openai.chat import OpenAI

__all__ = ["OpenAI"]
