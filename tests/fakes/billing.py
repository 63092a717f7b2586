"""How the fake server bills like a 2026 provider: prompt caching and an in-flight budget.

Two small, thread-safe parts the fake server consults on every chat request:

- :class:`PrefixCache`: a request whose leading tokens match a request that
  already FINISHED is billed at a lower price for the matched part (the
  cache is written when a request finishes, so requests sent together before
  the first one finishes all miss). Matching works on token boundaries with a
  minimum cacheable length and a granularity, as providers document them
  (OpenAI: at least 1,024 tokens, in 128-token steps).
- :class:`InFlightBudget`: OpenRouter's in-flight spending budget. Each
  running request holds its worst case (prompt + ``max_tokens``, at the
  price); a request that would pass the budget is refused with 402
  ``in_flight_budget_exhausted`` (and ``Retry-After``), one whose worst case
  alone exceeds it with 402 ``weight_exceeds_budget``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

IN_FLIGHT_MESSAGE = (
    "This request would exceed your available credits given your current in-flight requests. "
    "Retry after in-flight requests settle, or add credits."
)
WEIGHT_MESSAGE = (
    "This request's estimated cost is larger than your in-flight spending budget. "
    "Lower max_tokens or the prompt size, or add credits."
)


def in_flight_body() -> dict[str, Any]:
    """OpenRouter's 402 body for a full in-flight budget (its limits page)."""
    return {
        "error": {
            "code": 402,
            "message": IN_FLIGHT_MESSAGE,
            "metadata": {
                "reason": "in_flight_budget_exhausted",
                "limit_source": "openrouter_in_flight_budget",
                "remedy_hint": "Retry after your in-flight requests settle (see the Retry-After header).",
            },
        }
    }


def weight_body() -> dict[str, Any]:
    """OpenRouter's 402 body for a request whose worst case alone passes the budget."""
    return {
        "error": {
            "code": 402,
            "message": WEIGHT_MESSAGE,
            "metadata": {
                "reason": "weight_exceeds_budget",
                "limit_source": "openrouter_credits",
                "remedy_hint": "Lower max_tokens or the prompt size, or add credits.",
            },
        }
    }


def budget_403_body(resets_at: str, limit_usd: float = 10.0, spend_usd: float = 10.0) -> dict[str, Any]:
    """OpenRouter's 403 for a spent key, workspace or guardrail budget (it carries ``resets_at``)."""
    return {
        "error": {
            "code": 403,
            "message": "Budget limit exceeded",
            "metadata": {
                "limit_source": "openrouter_key_limit",
                "scope": "key",
                "limit_usd": limit_usd,
                "spend_usd": spend_usd,
                "resets_at": resets_at,
            },
        }
    }


def word_tokens(messages: Sequence[Any]) -> list[str]:
    """The "words" tokenizer's tokens: a role marker, a start, the words, an end, per message.

    As many as ``count_prompt_tokens(messages, "words")`` (words + 3 per message).
    """
    tokens: list[str] = []
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        tokens += [f"<{message.get('role')}>", "<s>", *text.split(), "</s>"]
    return tokens


class PrefixCache:
    """Prefixes of finished requests, matched at ``step``-token boundaries from ``min_tokens`` on."""

    def __init__(self, min_tokens: int = 0, step: int = 1) -> None:
        self.min_tokens = min_tokens
        self.step = max(1, step)
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def _boundaries(self, tokens: Sequence[Any]) -> list[tuple[int, bytes]]:
        """(length, digest of the first ``length`` tokens) at every cacheable boundary."""
        out = []
        digest = hashlib.blake2b(digest_size=12)
        for i, token in enumerate(tokens, 1):
            digest.update(repr(token).encode())
            digest.update(b"\x00")
            if i % self.step == 0 and i >= max(self.min_tokens, 1):
                out.append((i, digest.copy().digest()))
        return out

    def cached(self, tokens: Sequence[Any]) -> int:
        """Leading tokens of a new request that a finished request has cached."""
        best = 0
        with self._lock:
            for length, key in self._boundaries(tokens):
                if key not in self._seen:
                    break
                best = length
        return best

    def finished(self, tokens: Sequence[Any]) -> None:
        """A request finished: its prefixes are cached from now on."""
        keys = [key for _, key in self._boundaries(tokens)]
        with self._lock:
            self._seen.update(keys)


class Refusal(StrEnum):
    IN_FLIGHT = "in_flight_budget_exhausted"
    WEIGHT = "weight_exceeds_budget"


@dataclass
class InFlightBudget:
    """Worst cases of the requests running now, held against ``budget_usd``."""

    budget_usd: float
    held_usd: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def hold(self, worst_usd: float) -> Refusal | None:
        """Hold ``worst_usd`` for a request, or say why it is refused."""
        with self._lock:
            if worst_usd > self.budget_usd:
                return Refusal.WEIGHT
            # A little slack for float sums of the same figures held and released.
            if self.held_usd + worst_usd > self.budget_usd * (1 + 1e-9):
                return Refusal.IN_FLIGHT
            self.held_usd += worst_usd
            return None

    def release(self, worst_usd: float) -> None:
        with self._lock:
            self.held_usd = max(0.0, self.held_usd - worst_usd)
