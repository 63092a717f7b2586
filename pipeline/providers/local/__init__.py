"""The Local provider: its chat dialect and the local model server."""

from pipeline.providers.local.chat import Local

__all__ = ["Local"]
