"""Replies: one HTTP exchange with a chat server, classified the same way for every provider.

The realtime client and every batch adapter parse with :func:`parse_response`,
so the engine only sees :class:`Reply` objects whose ``kind`` says what to do
next (a provider's own rules are a :class:`~pipeline.providers.provider.Provider`
subclass, its request bodies a :class:`~pipeline.providers.dialect.Dialect`):

- ``ok``: a completion (journal it);
- ``retry``: transient (408, 409, 429, 5xx, timeouts, dropped connections,
  HTTP-200 bodies carrying an error): back off and try again;
- ``fatal``: the request itself is wrong (400, 404, 422, ...): the row ends;
- ``auth``: the key is rejected or out of credits (401, 402, 403 about the
  key): stop sending at once, the run is resumable.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pipeline.providers.credit import CreditLimit, LimitKind, credit_limit
from pipeline.providers.ratelimits import RateLimitInfo, rate_limit_info
from pipeline.providers.usage import parse_usage

_fast_loads: Callable[[bytes], Any] | None
try:  # a dependency where it has a wheel; json alone elsewhere
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - every supported platform has a wheel
    _fast_loads = None

if TYPE_CHECKING:
    pass


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
    cached_tokens: int | None = None  # prompt tokens read from the provider's prompt cache (part of prompt_tokens)
    cache_write_tokens: int | None = None  # prompt tokens written to it
    credit: CreditLimit | None = None  # a credit limit the error stated (in-flight budget, weight, spent budget)


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
    credit = credit_limit(status, data)
    if credit is not None:
        # The in-flight budget is back-pressure (retry after Retry-After, fewer at once); a request
        # too big for it, or a spent budget, stops the run like a refused key, with its own reason.
        kind = ReplyKind.RETRY if credit.kind is LimitKind.IN_FLIGHT else ReplyKind.AUTH
        return Reply(kind, status, f"HTTP {status}: {message}", retry_after, limits=limits, credit=credit)
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
    used = parse_usage(usage)
    if content and used.prompt_tokens == 0 and used.completion_tokens == 0:
        # An answer takes tokens: usage of zeros was never filled in (counted instead, like no usage).
        used = replace(used, prompt_tokens=None, completion_tokens=None)
    return Reply(
        ReplyKind.OK,
        200,
        content=content,
        finish_reason=finish,
        prompt_tokens=used.prompt_tokens,
        completion_tokens=used.completion_tokens,
        cost=used.cost,
        model=data.get("model"),
        provider=data.get("provider"),
        generation_id=data.get("id"),
        cached_tokens=used.cached_tokens,
        cache_write_tokens=used.cache_write_tokens,
    )


def _read_usage(reply: Reply, usage: Any) -> Reply:
    """Tokens and cost from a ``usage`` object, whatever else the reply carries."""
    used = parse_usage(usage)
    reply.prompt_tokens, reply.completion_tokens, reply.cost = used.prompt_tokens, used.completion_tokens, used.cost
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
    if _fast_loads is not None:
        try:
            # orjson: about a third of json's time per reply. What it refuses and json
            # takes (NaN, a BOM, UTF-16) falls through; it reads integers past 64 bits
            # as floats, which no token count or id field of a reply reaches.
            return _fast_loads(body)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            pass
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
