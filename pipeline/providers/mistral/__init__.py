"""The Mistral provider: its chat dialect and batch API."""

from pipeline.providers.mistral.chat import Mistral

__all__ = ["Mistral"]
