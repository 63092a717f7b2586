"""The recorder: turns a reply into the journal row and the cost it stands for.

One implementation for every front end (the realtime runner, batch mode, Ray
workers' results on the driver), so a reply means the same thing whichever
path it took: its status, its parsed structured fields, and its cost.

The budget fails closed. A reply without ``usage`` (some OpenAI-compatible
servers) is charged from counted tokens at the job's prices: the prompt as
counted before sending, the completion counted from its text. The row's
``cost_usd`` is that estimate and the row is marked ``cost_estimated``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.engine.tokens import count_text
from pipeline.providers.base import Reply, ReplyKind
from pipeline.store.journal import JournalRow, RowStatus

if TYPE_CHECKING:
    from pipeline.engine.pricing import ModelInfo
    from pipeline.engine.tokens import TokenCounter
    from pipeline.structured import StructuredSpec


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a microsecond more, on every reply
class Charge:
    """What one reply cost, and whether the figure was estimated from tokens."""

    usd: float
    estimated: bool = False
    # Tokens counted by us when the server reported none (None: the server's count stands).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Recorder:
    def __init__(
        self,
        info: ModelInfo,
        structured: StructuredSpec | None,
        counter: Callable[[], TokenCounter],
        batch_discount: float = 1.0,
        max_tokens: int | None = None,
    ) -> None:
        self.info = info
        self.structured = structured
        self.counter = counter  # called only when a reply lacks usage: loading a tokenizer takes seconds
        self.discount = batch_discount
        # The provider stops a reply at max_tokens, so no reply is billed for more; our
        # tokenizer may count its text longer (another model's tokenizer), and the budget
        # reserved max_tokens for it: a counted completion is capped there.
        self.max_tokens = max_tokens

    def charge(self, reply: Reply, billed: float, prompt_tokens: int, body: bytes | None = None) -> Charge:
        """The cost of a reply: what the server billed, else tokens x price (counted when missing).

        ``billed`` is the sum of ``usage.cost`` the server reported over all
        attempts; ``prompt_tokens`` the prompt as counted before sending (0 if
        not counted; the request ``body`` is then counted now).
        """
        if reply.cost is not None:
            return Charge(billed)
        if reply.kind != ReplyKind.OK:
            if reply.prompt_tokens or reply.completion_tokens:
                # No answer, but the server counted tokens it bills (a reasoning model that
                # spent max_tokens thinking, on a server that reports no cost): charge them.
                priced = self.info.cost(reply.prompt_tokens or 0, reply.completion_tokens or 0)
                return Charge(billed + (priced or 0.0) * self.discount)
            # No completion came back: providers bill nothing for errors we can see.
            return Charge(billed)
        server_counted = reply.prompt_tokens is not None and reply.completion_tokens is not None
        p = reply.prompt_tokens if reply.prompt_tokens is not None else self._prompt_tokens(prompt_tokens, body)
        c = reply.completion_tokens if reply.completion_tokens is not None else self._completion_tokens(reply.content)
        priced = self.info.cost(p, c, reply.cached_tokens or 0, reply.cache_write_tokens or 0)
        if server_counted:
            return Charge(billed + (priced or 0.0) * self.discount)
        return Charge(billed + (priced or 0.0) * self.discount, True, p, c)

    def _completion_tokens(self, text: str | None) -> int:
        counted = count_text(text or "")
        return counted if self.max_tokens is None else min(counted, self.max_tokens)

    def _prompt_tokens(self, counted: int, body: bytes | None) -> int:
        if counted or body is None:
            return counted
        messages = json.loads(body)["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        user = next(m["content"] for m in messages if m["role"] == "user")
        return self.counter().count_chat([system], [user])[0]

    def cache_saving(self, cached_tokens: int) -> float:
        """What reading ``cached_tokens`` from the cache saved against the input price."""
        info = self.info
        if info.input_per_million is None:
            return 0.0
        return cached_tokens * (info.input_per_million - info.cached_price) / 1_000_000 * self.discount

    def status(self, reply: Reply) -> tuple[RowStatus, str | None, dict[str, Any] | None]:
        if reply.kind == ReplyKind.OK:
            if self.structured is None:
                return RowStatus.OK, None, None
            parsed, error = self.structured.parse(reply.content, reply.finish_reason)
            return (RowStatus.OK, None, parsed) if error is None else (RowStatus.INVALID, error, None)
        if reply.kind == ReplyKind.FATAL:
            return RowStatus.FAILED, reply.error, None
        return RowStatus.TRANSIENT, reply.error, None

    def record(
        self,
        key: str,
        prompt_hash: str,
        reply: Reply,
        *,
        attempts: int,
        latency_s: float,
        charge: Charge,
        prior_cost: float = 0.0,
        prior_attempts: int = 0,
        tries: int = 0,
        attempt_costs: Sequence[float] = (),
        prior_costs: Sequence[float] = (),
    ) -> JournalRow:
        """The journal row for a reply; cost and attempts include earlier tries of this row.

        ``attempt_costs`` are what each attempt of this reply was billed (the
        client's list), ``prior_costs`` those of earlier tries of the row: the
        row keeps them all, with this reply's priced cost on its last attempt.
        """
        status, error, parsed = self.status(reply)
        total = prior_cost + charge.usd
        costs = every_attempt(prior_costs, attempt_costs, charge.usd)
        # Null, not a misleading 0, when nothing is known to have been billed.
        known = reply.kind == ReplyKind.OK and (reply.cost is not None or self.info.input_per_million is not None)
        return JournalRow(
            key=key,
            prompt_hash=prompt_hash,
            status=status,
            completion=reply.content,
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens if reply.prompt_tokens is not None else charge.prompt_tokens,
            completion_tokens=reply.completion_tokens
            if reply.completion_tokens is not None
            else charge.completion_tokens,
            cost_usd=total if total or known else None,
            model=reply.model,
            provider=reply.provider,
            generation_id=reply.generation_id,
            attempts=prior_attempts + attempts,
            latency_s=round(latency_s, 4),
            error=error,
            parsed=json.dumps(parsed) if parsed is not None else None,
            invalid_tries=tries,
            cost_estimated=charge.estimated,
            updated=time.time(),
            cached_tokens=reply.cached_tokens,
            cache_write_tokens=reply.cache_write_tokens,
            attempt_costs=json.dumps(costs) if costs else None,
        )


def every_attempt(prior: Sequence[float], attempts: Sequence[float], charged: float) -> list[float]:
    """The cost of every attempt of a row: earlier tries', then this reply's, priced on its last attempt."""
    these = list(attempts) or [0.0]
    these[-1] += charged - sum(attempts)  # what was priced from tokens, beyond what the server reported
    return [*prior, *(round(cost, 12) for cost in these)]


def _first(value: int | None, fallback: int | None) -> int | None:
    return value if value is not None else fallback
