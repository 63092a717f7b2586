"""The tracker: one object owns the run's counters and its progress bar.

Workers only call :meth:`Tracker.report`. The bar's text is refreshed at most
a few times a second, so progress costs next to nothing per row.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm import tqdm

from pipeline.store.journal import RowStatus

if TYPE_CHECKING:
    from pipeline.engine.limits.limiter import LearnedRate

REFRESH_S = 0.5


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0
    resumed: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_estimated: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens read from the provider's cache
    cache_saved_usd: float = 0.0  # what that saved against the input price


class Tracker:
    def __init__(self, total: int, quiet: bool = False, desc: str = "rows", notebook: bool = False) -> None:
        self.counters = Counters()
        self.started = time.monotonic()
        self.quiet = quiet
        self._next_refresh = 0.0
        self._paused_until = 0.0  # wall-clock time a server's Retry-After pauses the job until
        self.note = ""  # shown after the counters, e.g. batch mode's "3 batches pending"
        # The limiter's learned rate (requests_per_minute = "auto"), shown in the bar.
        self.learned: Callable[[], LearnedRate | None] | None = None
        if notebook:
            from tqdm.auto import tqdm as bar  # notebook-aware; imported only when asked for
        else:
            bar = tqdm
        self.bar = bar(
            total=total,
            desc=desc,
            unit="row",
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.05,
            mininterval=REFRESH_S,
        )

    def resumed(self, rows: int) -> None:
        """Rows already done by an earlier run count toward the total."""
        self.counters.resumed += rows
        self.bar.update(rows)

    def skipped(self, rows: int) -> None:
        self.counters.skipped += rows
        self.bar.update(rows)

    def requests(self, attempts: int, cost: float, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Requests sent for a row (one reply, with its retries) and what they cost."""
        c = self.counters
        c.requests += attempts
        c.prompt_tokens += prompt_tokens or 0
        c.completion_tokens += completion_tokens or 0
        c.cost_usd += cost

    def cached(self, tokens: int, saved_usd: float) -> None:
        """Prompt tokens a reply read from the provider's cache, and what they saved."""
        self.counters.cached_tokens += tokens
        self.counters.cache_saved_usd += saved_usd

    def row_done(self, status: RowStatus, error: str | None) -> None:
        c = self.counters
        if status == RowStatus.OK:
            c.ok += 1
        elif status == RowStatus.INVALID:
            c.invalid += 1
        else:
            c.failed += 1
        if error:
            kind = error.split(":", 1)[0][:40]
            c.errors[kind] = c.errors.get(kind, 0) + 1
        self.bar.update(1)
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self._refresh_postfix()

    def paused(self, seconds: float) -> None:
        """The server asked the job to wait (429 with Retry-After): say so, and until when."""
        until = time.time() + seconds
        if until > self._paused_until + 1:
            self._paused_until = until
            self._refresh_postfix()
            self.bar.refresh()

    def _refresh_postfix(self) -> None:
        c = self.counters
        tokens = c.prompt_tokens + c.completion_tokens
        text = f"${c.cost_usd:.4f}, {tokens:,} tok, {c.failed + c.invalid} err"
        text += self._rate_text()
        if self._paused_until > time.time():
            text += f", paused by the server until {time.strftime('%H:%M:%S', time.localtime(self._paused_until))}"
        if self.note:
            text += f", {self.note}"
        self.bar.set_postfix_str(text, refresh=False)

    def set_note(self, note: str) -> None:
        if note != self.note:
            self.note = note
            self._refresh_postfix()
            self.bar.refresh()

    def _rate_text(self) -> str:
        learned = self.learned() if self.learned is not None else None
        if learned is None or learned.current_requests_per_minute is None:
            return ""
        return f", auto {learned.current_requests_per_minute:,.0f}/min"

    def close(self) -> None:
        self._refresh_postfix()
        self.bar.close()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started
