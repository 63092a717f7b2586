"""The request bodies of one run: the fixed part serialised once, only the messages vary."""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _encode_string  # what json.dumps(ensure_ascii=False) uses
from typing import TYPE_CHECKING, Any

from pipeline.providers.provider import Provider

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec


class Dialect:
    """The request bodies of one run: the fixed part serialised once, only the messages vary."""

    def __init__(
        self,
        spec: ModelSpec,
        model_name: str,
        structured_fields: dict[str, Any],
        provider: Provider | None = None,
        cache_key: str | None = None,
    ) -> None:
        self.provider = provider or Provider()
        self.url = f"{spec.base_url}/chat/completions"
        self._base = self._base_body(spec, model_name, structured_fields)
        if cache_key is not None and self.provider.prompt_cache_key and "prompt_cache_key" not in self._base:
            # One key for the whole job (never per row): requests sharing a prefix meet the same cache.
            self._base["prompt_cache_key"] = cache_key
        # The fixed part of every body, serialised once: only the messages vary.
        fixed = json.dumps({**self._base, "messages": None}, ensure_ascii=False).encode()
        self._prefix, self._suffix = fixed.split(b'"messages": null', 1)
        self._prefix += b'"messages": '

    def _base_body(self, spec: ModelSpec, model_name: str, structured: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model_name, "max_tokens": spec.max_tokens}
        if spec.temperature is not None:
            body["temperature"] = spec.temperature
        if spec.service_tier is not None:
            body["service_tier"] = spec.service_tier
        params = self.provider.adapt_params(dict(spec.params))
        _deep_merge(body, structured)
        _deep_merge(body, params)  # the job's own params win
        return body

    def body(self, messages: list[dict[str, str]]) -> bytes:
        return self._prefix + json.dumps(messages, ensure_ascii=False).encode() + self._suffix

    def chat_body(self, system: str | None, user: str) -> bytes:
        """``body`` of a system (or no system) and a user message, byte for byte.

        Built around the C string encoder that ``json.dumps(ensure_ascii=False)``
        uses, instead of a JSON encoder per row: a few microseconds a request.
        """
        user_part = '{"role": "user", "content": ' + _encode_string(user) + "}]"
        if system is None:
            messages = "[" + user_part
        else:
            messages = '[{"role": "system", "content": ' + _encode_string(system) + "}, " + user_part
        return self._prefix + messages.encode() + self._suffix

    def messages_start(self, body: bytes, size: int = 1024) -> bytes:
        """The first ``size`` bytes of a body's messages (what a provider's prompt cache matches first)."""
        start = len(self._prefix)
        return body[start : start + size]

    def identity(self) -> dict[str, Any]:
        return {key: value for key, value in self._base.items() if key not in ("model", "prompt_cache_key")}


def _deep_merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge nested tables, e.g. the job's ``provider`` routing with ``require_parameters``."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value
