"""What servers say about their rate limits: headers and OpenRouter's key endpoint.

OpenRouter sends ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` only on a
429 (``Reset`` in epoch milliseconds); OpenAI-style servers send
``x-ratelimit-limit-requests`` / ``-tokens`` and their ``remaining`` and
``reset`` (a duration such as ``6m0s``) on every response. Limits are read as
per minute, the unit both use. Anything unreadable is ignored: these are
hints for the adaptive limiter, never a reason to fail a request.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

# (OpenRouter's header, OpenAI's header)
_LIMIT_REQUESTS = ("x-ratelimit-limit", "x-ratelimit-limit-requests")
_REMAINING_REQUESTS = ("x-ratelimit-remaining", "x-ratelimit-remaining-requests")
_RESET_REQUESTS = ("x-ratelimit-reset", "x-ratelimit-reset-requests")
_LIMIT_TOKENS = "x-ratelimit-limit-tokens"
_REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Numbers this large are timestamps, not durations: epoch milliseconds, then seconds.
_EPOCH_MS = 1e12
_EPOCH_S = 1e9
KEY_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """A server's statement about its limits; every field is optional."""

    limit_requests: int | None = None  # requests per minute
    remaining_requests: int | None = None
    reset_s: float | None = None  # seconds until the request limit resets
    limit_tokens: int | None = None  # tokens per minute
    remaining_tokens: int | None = None

    @property
    def tokens_exhausted(self) -> bool:
        """The token limit, not the request limit, is what ran out."""
        return self.remaining_tokens == 0 and (self.remaining_requests is None or self.remaining_requests > 0)

    @property
    def retry_after_s(self) -> float | None:
        """When the server said nothing else: wait for the window to reset once nothing remains."""
        if self.remaining_requests == 0 and self.reset_s is not None:
            return self.reset_s
        return None


def rate_limit_info(headers: Any, status: int, now: float | None = None) -> RateLimitInfo | None:
    """The limits stated in ``headers`` (any case-insensitive mapping), or None if none are.

    OpenAI's suffixed headers are read on every answer; the bare
    ``X-RateLimit-*`` ones only on a 429, where OpenRouter sends them (elsewhere
    they may count per second or per hour, which we cannot tell).
    """
    # Five lookups in aiohttp's case-insensitive multidict (C code) are cheaper
    # than scanning the header names first (this runs on every answer).
    limit = headers.get(_LIMIT_REQUESTS[1])
    remaining = headers.get(_REMAINING_REQUESTS[1])
    reset = headers.get(_RESET_REQUESTS[1])
    if status == 429:
        limit = headers.get(_LIMIT_REQUESTS[0], limit)
        remaining = headers.get(_REMAINING_REQUESTS[0], remaining)
        reset = headers.get(_RESET_REQUESTS[0], reset)
    limit_tokens = headers.get(_LIMIT_TOKENS)
    remaining_tokens = headers.get(_REMAINING_TOKENS)
    if limit is None and remaining is None and reset is None and limit_tokens is None and remaining_tokens is None:
        return None
    return RateLimitInfo(
        limit_requests=_positive_int(limit),
        remaining_requests=_count(remaining),
        reset_s=parse_reset(reset, time.time() if now is None else now),
        limit_tokens=_positive_int(limit_tokens),
        remaining_tokens=_count(remaining_tokens),
    )


def parse_reset(value: str | None, now: float) -> float | None:
    """Seconds until a reset given as epoch ms, epoch seconds, seconds, or a duration (``6m0s``)."""
    if not value:
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        return sum(float(n) * _UNIT_S[u] for n, u in parts)
    if number != number or number < 0:  # NaN or negative
        return None
    if number >= _EPOCH_MS:
        return max(0.0, number / 1000 - now)
    if number >= _EPOCH_S:
        return max(0.0, number - now)
    return number


def key_rate_limit(data: Any) -> RateLimitInfo | None:
    """OpenRouter's ``GET /key`` ``data.rate_limit {requests, interval}`` as a per-minute limit.

    OpenRouter has deprecated the field and now answers ``requests: -1``: only a
    positive count with a readable interval counts.
    """
    try:
        limit = data["data"]["rate_limit"]
        requests = limit["requests"]
        interval = parse_reset(str(limit["interval"]), 0.0)
    except (KeyError, TypeError):
        return None
    if type(requests) is not int or requests <= 0 or not interval:
        return None
    return RateLimitInfo(limit_requests=max(1, round(requests * 60 / interval)))


async def fetch_key_limit(session: aiohttp.ClientSession, base_url: str) -> RateLimitInfo | None:
    """``GET {base_url}/key`` (OpenRouter), never failing: any problem means no information."""
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    try:
        async with session.get(f"{base_url}/key", timeout=aiohttp.ClientTimeout(total=KEY_TIMEOUT_S)) as resp:
            if resp.status != 200:
                return None
            return key_rate_limit(await resp.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(float(value.strip()))
    except (ValueError, OverflowError):
        return None
    return number if number >= 0 else None


def _positive_int(value: str | None) -> int | None:
    number = _count(value)
    return number if number else None
