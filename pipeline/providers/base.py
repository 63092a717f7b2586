"""What every provider shares: the Provider rules, request bodies, reply parsing and error classes.

A provider's own rules (how its URL looks, how it wants structured output,
parameters it names differently, whether it needs a key or reports cost, a
server to start) live in one module each, as a :class:`Provider` subclass
registered in ``providers/__init__.py``. The engine only sees :class:`Reply`
objects whose ``kind`` says what to do next:

- ``ok``: a completion (journal it);
- ``retry``: transient (408, 409, 429, 5xx, timeouts, dropped connections,
  HTTP-200 bodies carrying an error): back off and try again;
- ``fatal``: the request itself is wrong (400, 404, 422, ...): the row ends;
- ``auth``: the key is rejected or out of credits (401, 402, 403 about the
  key): stop sending at once, the run is resumable.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from json.encoder import encode_basestring as _encode_string  # what json.dumps(ensure_ascii=False) uses
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from pipeline.providers.ratelimits import RateLimitInfo, rate_limit_info

if TYPE_CHECKING:
    from pipeline.config.job import ModelSpec


class ReplyKind(StrEnum):
    """What the engine does next with a reply."""

    OK = "ok"  # a completion: journal it
    RETRY = "retry"  # transient: back off and try again
    FATAL = "fatal"  # the request itself is wrong: the row ends
    AUTH = "auth"  # the key is rejected or out of credits: stop sending


RETRY_STATUSES = frozenset({408, 409, 425, 429})
AUTH_STATUSES = frozenset({401, 402})


@dataclass(slots=True)
class Reply:
    """One HTTP exchange, classified."""

    kind: ReplyKind
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    model: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    limits: RateLimitInfo | None = None  # what the server said about its rate limits, if anything


class Provider:
    """One kind of server's rules. A new provider is one module with a subclass, registered by name."""

    name: ClassVar[str] = "openai"
    reports_cost: ClassVar[bool] = False  # usage.cost on every response; else cost = tokens x price
    needs_key: ClassVar[bool] = True
    free: ClassVar[bool] = False  # no price to pay (a model on this machine)
    rate_limited: ClassVar[bool] = True  # a limit for requests_per_minute = "auto" to learn

    async def stated_rate_limit(self, session: aiohttp.ClientSession, base_url: str) -> RateLimitInfo | None:
        """A rate limit the provider states outside replies (asked once per run, best effort)."""
        return None

    def matches(self, base_url: str) -> bool:
        """True when ``base_url`` is this provider's own (for guessing it when the job names none)."""
        return False

    def adapt_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``[model.params]`` under this provider's names."""
        return params

    def structured_fields(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Fields to merge into the request body to ask for replies that fit ``schema``."""
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "strict": True, "schema": schema},
            }
        }

    def model_name(self, spec: ModelSpec) -> str:
        return spec.name

    def context_length(self, spec: ModelSpec) -> int | None:
        """The context window when the provider knows it (None: from the price table)."""
        return None

    @contextlib.asynccontextmanager
    async def server(self, spec: ModelSpec) -> AsyncIterator[str | None]:
        """A server this provider starts for the run (its base URL), or None to use ``base_url``."""
        yield None


class Dialect:
    """The request bodies of one run: the fixed part serialised once, only the messages vary."""

    def __init__(
        self, spec: ModelSpec, model_name: str, structured_fields: dict[str, Any], provider: Provider | None = None
    ) -> None:
        self.provider = provider or Provider()
        self.profile = self.provider.name
        self.url = f"{spec.base_url}/chat/completions"
        self._base = self._base_body(spec, model_name, structured_fields)
        # The fixed part of every body, serialised once: only the messages vary.
        fixed = json.dumps({**self._base, "messages": None}, ensure_ascii=False).encode()
        self._prefix, self._suffix = fixed.split(b'"messages": null', 1)
        self._prefix += b'"messages": '

    def _base_body(self, spec: ModelSpec, model_name: str, structured: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model_name, "max_tokens": spec.max_tokens}
        if spec.temperature is not None:
            body["temperature"] = spec.temperature
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

    def identity(self) -> dict[str, Any]:
        return {key: value for key, value in self._base.items() if key != "model"}


def _deep_merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge nested tables, e.g. the job's ``provider`` routing with ``require_parameters``."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


def parse_response(status: int, body: bytes, headers: Any) -> Reply:
    """Classify one HTTP response (status, raw body, headers)."""
    data = _json_or_none(body)
    limits = rate_limit_info(headers, status)
    if status == 200 and isinstance(data, dict):
        reply = _parse_success(data)
        reply.limits = limits
        return reply
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if retry_after is None and status == 429 and limits is not None:
        retry_after = limits.retry_after_s  # nothing remains until the window resets
    message = _error_message(data, body)
    if status == 200:
        return Reply(ReplyKind.RETRY, status, f"HTTP 200 with an unreadable body: {message}", limits=limits)
    kind = classify_status(status, message)
    reply = Reply(kind, status, f"HTTP {status}: {message}", retry_after, limits=limits)
    if isinstance(data, dict):
        _read_usage(reply, data.get("usage"))  # an error the server billed all the same
    return reply


def classify_status(status: int, message: str) -> ReplyKind:
    if status in RETRY_STATUSES or status >= 500:
        return ReplyKind.RETRY
    if status in AUTH_STATUSES or (status == 403 and _about_key(message)):
        return ReplyKind.AUTH
    return ReplyKind.FATAL


def _about_key(message: str) -> bool:
    text = message.lower()
    return any(word in text for word in ("key", "credit", "auth", "token", "limit exceeded"))


def _parse_success(data: dict[str, Any]) -> Reply:
    usage = data.get("usage")
    error = data.get("error")
    if isinstance(error, dict):
        # OpenRouter reports a provider failure after streaming started as a 200.
        reply = Reply(ReplyKind.RETRY, 200, f"provider error (HTTP 200): {_clip(str(error.get('message', error)))}")
        return _read_usage(reply, usage)
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return _unanswered(Reply(ReplyKind.RETRY, 200, "HTTP 200 without choices"), usage)
    if not isinstance(usage, dict):
        usage = {}
    if finish == "error":
        return _read_usage(Reply(ReplyKind.RETRY, 200, "provider error (HTTP 200, finish_reason error)"), usage)
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        # Nothing came back: a provider hiccup, not an answer (and not an empty string).
        reply = Reply(ReplyKind.RETRY, 200, "HTTP 200 with no content (message.content is null)", finish_reason=finish)
        return _unanswered(reply, usage)
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    cost: Any = usage.get("cost")
    return Reply(
        ReplyKind.OK,
        200,
        content=content,
        finish_reason=finish,
        # Checked inline (this runs once per row): ints for tokens, a number for cost.
        prompt_tokens=prompt_tokens if type(prompt_tokens) is int else None,
        completion_tokens=completion_tokens if type(completion_tokens) is int else None,
        cost=float(cost) if type(cost) in (int, float) else _cost(cost),
        model=data.get("model"),
        provider=data.get("provider"),
        generation_id=data.get("id"),
    )


def _read_usage(reply: Reply, usage: Any) -> Reply:
    """Tokens and cost from a ``usage`` object, whatever else the reply carries."""
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        reply.prompt_tokens = prompt if type(prompt) is int else None
        reply.completion_tokens = completion if type(completion) is int else None
        reply.cost = _cost(usage.get("cost"))
    return reply


def _unanswered(reply: Reply, usage: Any) -> Reply:
    """A 200 without an answer: transient when free, final when billed.

    A reasoning model that spends all of ``max_tokens`` thinking answers with no
    content and a cost: asking again would pay again for the same nothing, so
    the row ends (``--retry-failed`` asks again on purpose) and its cost counts.
    """
    _read_usage(reply, usage)
    billed = reply.cost is not None and reply.cost > 0
    if billed or (reply.cost is None and (reply.completion_tokens or 0) > 0):
        reply.kind = ReplyKind.FATAL
        spent = f"{reply.completion_tokens} completion tokens" if reply.completion_tokens else "tokens"
        reply.error = (
            f"{reply.error}; billed for {spent} without an answer (a reasoning model may have spent "
            "max_tokens thinking: raise [model] max_tokens); --retry-failed asks again"
        )
    return reply


def _cost(value: Any) -> float | None:
    """``usage.cost`` as a number: a JSON number, or a decimal string such as ``"0.002"``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` is either seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _json_or_none(body: bytes) -> Any:
    try:
        # Decoding first skips json's encoding detection on every answer (servers
        # send UTF-8); a BOM or UTF-16 still gets json's own handling of bytes.
        return json.loads(body.decode())
    except ValueError:  # UnicodeDecodeError included
        pass
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_message(data: Any, body: bytes) -> str:
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _clip(str(err["message"]))
        if isinstance(err, str):
            return _clip(err)
        if data.get("message") or data.get("detail"):
            return _clip(str(data.get("message") or data.get("detail")))
    text = body.decode("utf-8", "replace").strip()
    return _clip(text) if text else "(empty body)"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
