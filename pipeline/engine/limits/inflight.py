"""Requests in flight under a provider's in-flight budget: fewer at once after a 402, more as answers come.

OpenRouter holds each running request's worst case (prompt + ``max_tokens``)
against a key's in-flight budget and refuses the request that would pass it
(402 ``in_flight_budget_exhausted``, with ``Retry-After``). That is
back-pressure, not a failure: :class:`InFlightWindow` halves the requests
allowed in flight on such a refusal (once per episode: refusals of requests
sent before the cut do not cut again), and adds about one request per
window's worth of answers after, as TCP and the adaptive rate limiter do.
Without refusals it allows ``ceiling`` (the job's concurrency) and costs one
comparison per request.
"""

from __future__ import annotations

import math

from pipeline.engine.limits.adaptive import Gate

__all__ = ["InFlightWindow"]


class InFlightWindow:
    """An additive-increase, multiplicative-decrease cap on requests in flight."""

    def __init__(self, ceiling: int, backoff: float = 0.5) -> None:
        self.ceiling = ceiling
        self.backoff = backoff
        self.window = float(ceiling)
        self.gate = Gate(ceiling)
        self.refusals = 0
        self._epoch = 0  # bumped by every cut; a request remembers the epoch it was sent in

    @property
    def epoch(self) -> int:
        return self._epoch

    def refused(self, sent_epoch: int) -> None:
        """A request sent in ``sent_epoch`` was refused for the in-flight budget."""
        self.refusals += 1
        if sent_epoch < self._epoch:
            return  # sent before the last cut: that cut already answered this episode
        in_flight = max(1, self.gate.in_use)
        self.window = max(1.0, min(self.window, float(in_flight)) * self.backoff)
        self._epoch += 1
        self.gate.resize(max(1, math.floor(self.window)))

    def answered(self) -> None:
        """A request went through: grow by about one per window of answers, up to the ceiling."""
        if self.window >= self.ceiling:
            return
        self.window = min(float(self.ceiling), self.window + 1.0 / self.window)
        self.gate.resize(max(1, math.floor(self.window)))
