"""One rate cap for many processes: send times handed out by a single scheduler.

With ``--engine ray`` requests leave from several worker processes, but
``requests_per_minute`` and ``tokens_per_minute`` are the provider's limits
for the whole job. One :class:`Schedule` (inside a Ray actor) decides when
every request may go: workers ask for the send times of the requests they
have waiting, a few at a time, and sleep until each time comes. Nothing is
granted ahead of a request that exists, so a crashed worker wastes at most
the slots of the requests it had waiting.

Requests are spaced evenly (no burst at all), at a rate lowered by a margin:
times travel between processes, and a worker that receives its grant late
sends late, which can bunch two requests together. Two percent of the cap (at
least one request a minute) absorbs that, so no 60-second window at the
provider holds more than ``requests_per_minute``. Tokens follow the same
generic cell-rate rule with a bucket the size the in-process limiter uses.
A 429 seen by any worker pauses the schedule: every later grant comes after
the cool-down, and the actor tells every worker at once (``pause``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MARGIN = 0.02  # of the cap, at least one request (or token budget) a minute


def effective_per_minute(cap: float) -> float:
    """The rate the schedule keeps to for a cap: a small margin below it."""
    return max(cap - max(1.0, MARGIN * cap), cap / 2)


def token_capacity(tokens_per_minute: int, max_tokens: int) -> int:
    """The token bucket of the in-process limiter: a tenth of a minute, room for a large request."""
    return min(tokens_per_minute, max(tokens_per_minute // 10, 2 * max_tokens + 2048))


@dataclass(frozen=True)
class Grant:
    """Send times (``time.time()`` seconds) for the requests asked for, in order."""

    times: list[float]
    paused_until: float


class Schedule:
    """Hands out send times under the job's caps, for every worker together."""

    def __init__(
        self,
        requests_per_minute: float,
        tokens_per_minute: int = 0,
        max_tokens: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.interval = 60.0 / effective_per_minute(requests_per_minute) if requests_per_minute else 0.0
        self.max_tokens = max_tokens
        self.token_s = 60.0 / effective_per_minute(tokens_per_minute) if tokens_per_minute else 0.0
        self.capacity = token_capacity(tokens_per_minute, max_tokens) if tokens_per_minute else 0
        self.next_request = 0.0  # the earliest time of the next request
        self.tokens_tat = 0.0  # the token bucket's theoretical arrival time (GCRA)
        self.paused_until = 0.0

    def grant(self, prompt_tokens: Sequence[int]) -> Grant:
        """Send times for requests with these prompt sizes (0 when not counted)."""
        start = max(self.clock(), self.paused_until)
        return Grant([self._one(start, tokens) for tokens in prompt_tokens], self.paused_until)

    def _one(self, start: float, prompt_tokens: int) -> float:
        at = max(start, self.next_request)
        if self.token_s:
            # Charged like the in-process limiter: the prompt plus max_tokens, at most a full bucket.
            cost = min(prompt_tokens + self.max_tokens, self.capacity) * self.token_s
            at = max(at, self.tokens_tat + cost - self.capacity * self.token_s)
            self.tokens_tat = max(self.tokens_tat, at) + cost
        self.next_request = at + self.interval
        return at

    def cool_down(self, seconds: float) -> float:
        """Pause every request for ``seconds`` from now (a 429); returns the end of the pause."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self.next_request = max(self.next_request, self.paused_until)
        return self.paused_until
