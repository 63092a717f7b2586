"""Credit limits a provider states in an error: which one, and what to do about it.

OpenRouter has three kinds (its limits page; the body is
``{"error": {"code", "message", "metadata": {"reason", "limit_source", ...}}}``):

- **in-flight budget** (402 ``in_flight_budget_exhausted``, with
  ``Retry-After``): the worst cases (prompt + ``max_tokens``) of the key's
  running requests fill a budget. Temporary: back off and send fewer at once.
- **weight** (402 ``weight_exceeds_budget``): one request's worst case alone is
  larger than that budget. Retrying never helps: lower ``max_tokens``.
- **budget** (403 with ``metadata.resets_at``: a guardrail, workspace or key
  budget is spent): it resets at that time.

The code strings are matched wherever they appear (``metadata.reason``, the
message, ``limit_source``), as the shapes are young and change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["CreditLimit", "LimitKind", "credit_limit"]

IN_FLIGHT_CODE = "in_flight_budget_exhausted"
WEIGHT_CODE = "weight_exceeds_budget"


class LimitKind(StrEnum):
    IN_FLIGHT = "in_flight"  # back-pressure: retry after Retry-After with fewer requests in flight
    WEIGHT = "weight"  # one request is too big for the in-flight budget: lower max_tokens
    BUDGET = "budget"  # a key, workspace or guardrail budget is spent until resets_at


@dataclass(frozen=True, slots=True)
class CreditLimit:
    kind: LimitKind
    resets_at: str | None = None
    """When a spent budget resets (as the provider wrote it), if it said."""
    source: str | None = None
    """The provider's ``limit_source``, e.g. ``openrouter_key_limit``."""

    def advice(self, max_tokens: int | None = None) -> str:
        """One line saying what happened and what to do (for a stop reason)."""
        if self.kind is LimitKind.WEIGHT:
            worst = "prompt + max_tokens" if max_tokens is None else f"prompt + max_tokens {max_tokens}"
            return (
                f"one request's worst case ({worst}) exceeds the key's in-flight budget at the provider "
                "(402 weight_exceeds_budget): lower [model] max_tokens (or shorten the prompt), or add "
                "credits, then rerun (rows done are not paid again)"
            )
        if self.kind is LimitKind.BUDGET:
            when = f"it resets at {self.resets_at}" if self.resets_at else "the provider gave no reset time"
            what = f" ({self.source})" if self.source else ""
            return f"the key's spending budget is used up{what}; {when}: rerun then, or raise the budget"
        return "the key's in-flight budget is full (402 in_flight_budget_exhausted): sending fewer requests at once"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def credit_limit(status: int, data: Any) -> CreditLimit | None:
    """The credit limit an error answer states, or None for any other error."""
    if status not in (402, 403) or not isinstance(data, dict):
        return None
    error = data.get("error")
    if not isinstance(error, dict):
        return None
    metadata = error.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    words = " ".join(
        (_text(metadata.get("reason")), _text(metadata.get("limit_source")), _text(error.get("message")))
    ).lower()
    source = _text(metadata.get("limit_source")) or None
    if status == 402 and IN_FLIGHT_CODE in words:
        return CreditLimit(LimitKind.IN_FLIGHT, source=source)
    if status == 402 and WEIGHT_CODE in words:
        return CreditLimit(LimitKind.WEIGHT, source=source)
    resets_at = metadata.get("resets_at")
    if status == 403 and (resets_at is not None or "budget" in words):
        return CreditLimit(LimitKind.BUDGET, resets_at=None if resets_at is None else str(resets_at), source=source)
    return None
