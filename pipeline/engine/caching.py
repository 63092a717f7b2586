"""Prompt caching, before a run: which prefix the rows share, and how much of it a provider caches.

A provider bills the leading tokens a request shares with a recent request at
its cached price. How much counts depends on its rule (``../shared`` notes,
providers' docs): OpenAI caches from 1,024 tokens in 128-token steps;
Anthropic only behind explicit ``cache_control`` breakpoints (which the
pipeline does not send); Gemini from 1,024 tokens; DeepSeek in 64-token
steps; Mistral documents no minimum.

The dry run feeds every rendered prompt to :class:`SharedPrefixes`, which
groups rows by system prompt and keeps the text their user messages share at
the start. Each group's prefix is counted in tokens with the model's counter
(exactly for v3 Tekken models). The run warms each prefix with one request
before the others go out (``engine/warmup.py``), so every row of a group but
one reads its cacheable part from the cache.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.engine.tokens import TekkenV3ChatCounter, TokenCounter, count_text, encode_text

__all__ = ["CacheRule", "CachedEstimate", "SharedPrefixes", "cache_rule"]

# At most this many distinct system prompts are followed; rows beyond share no known prefix.
MAX_GROUPS = 10_000
# Rows compared with the earlier ones one by one (sorted insertion: fast up to here); later rows
# count their group's common start only.
MAX_COMPARED = 50_000
# `<s>[INST]` start the v3 Tekken template before the text.
_V3_LEAD_TOKENS = 2
_V3_SYSTEM_JOIN = "\n\n"


@dataclass(frozen=True, slots=True)
class CacheRule:
    """How a provider caches prompt prefixes."""

    name: str
    min_tokens: int
    step: int
    automatic: bool = True
    """False: caching needs explicit breakpoints the pipeline does not send (nothing is cached)."""

    def cacheable(self, prefix_tokens: int) -> int:
        """Tokens of a shared prefix of ``prefix_tokens`` that the provider bills as cached."""
        if not self.automatic or prefix_tokens < max(self.min_tokens, 1):
            return 0
        return prefix_tokens // self.step * self.step


OPENAI_RULE = CacheRule("OpenAI: from 1,024 tokens, in 128-token steps", 1024, 128)
_RULES = {
    "openai": OPENAI_RULE,
    "anthropic": CacheRule("Anthropic: only behind cache_control breakpoints (not sent)", 1024, 1, automatic=False),
    "google": CacheRule("Gemini: implicit, from 1,024 tokens", 1024, 1),
    "deepseek": CacheRule("DeepSeek: in 64-token steps", 64, 64),
    "mistral": CacheRule("Mistral: no documented minimum", 1, 1),
    "local": CacheRule("a local server: no cache pricing", 1, 1, automatic=False),
}
_UNKNOWN = CacheRule(
    "no documented rule for this model: assumed OpenAI's (from 1,024 tokens, 128-token steps)",
    1024,
    128,
)
_MISTRAL_WORDS = ("mistral", "ministral", "mixtral", "codestral", "pixtral", "magistral", "devstral", "voxtral")


def cache_rule(model: str, provider: str) -> CacheRule:
    """The caching rule of ``model`` at ``provider`` (by the model's vendor; OpenRouter passes caching through)."""
    if provider == "local":
        return _RULES["local"]
    name = model.strip().lower()
    vendor, _, base = name.rpartition("/")
    if vendor == "anthropic" or base.startswith("claude"):
        return _RULES["anthropic"]
    if vendor == "openai" or base.startswith(("gpt-", "o1", "o3", "o4", "chatgpt")):
        return _RULES["openai"]
    if vendor == "google" or base.startswith("gemini"):
        return _RULES["google"]
    if vendor == "deepseek" or base.startswith("deepseek"):
        return _RULES["deepseek"]
    if vendor == "mistralai" or provider == "mistral" or base.startswith(_MISTRAL_WORDS):
        return _RULES["mistral"]
    return _UNKNOWN


@dataclass(frozen=True, slots=True)
class CachedEstimate:
    """What caching is expected to do for the rows counted."""

    cached_tokens: int
    """Prompt tokens expected to be billed at the cached price."""
    groups: int
    """Distinct shared prefixes (system prompts): each is paid in full once, by its warm-up request."""
    prefix_tokens: int
    """The longest shared prefix found, in tokens."""
    rule: str


def _common_prefix(a: str, b: str) -> str:
    """The longest common start of two strings (halving: fast on long equal runs)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return a[:n]
    low, high = 0, n  # a[:low] == b[:low]; a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return a[:low]


def _stable_head(text: str) -> str:
    """The start of ``text`` whose tokens stay the same whatever follows (see tokens._split_stable_head)."""
    for cut in range(len(text) - 1, 0, -1):
        if text[cut - 1].isascii() and text[cut - 1].isalpha() and text[cut].isascii() and not text[cut].isalpha():
            return text[:cut]
    return ""


@dataclass(slots=True)
class _Group:
    """Rows with one system prompt: the start all their user messages share, and each row's own."""

    common: str
    rows: int = 1
    seen: list[str] = field(default_factory=list)
    """Earlier user messages, sorted: a row's longest start shared with any is its longest with a neighbour."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """Each later row's user message and the earlier one it shares the longest start with."""


class SharedPrefixes:
    """Rows grouped by system prompt, with the text their user messages share at the start.

    A row's prompt is cached up to the longest start it shares with any
    earlier request, so each row's own shared start counts (up to
    ``MAX_COMPARED`` rows; later rows count their group's common start).
    """

    def __init__(self) -> None:
        self._groups: dict[str | None, _Group] = {}
        self._compared = 0

    def add(self, systems: Sequence[str | None], users: Sequence[str]) -> None:
        for system, user in zip(systems, users, strict=True):
            group = self._groups.get(system)
            if group is None:
                if len(self._groups) < MAX_GROUPS:
                    self._groups[system] = _Group(user, seen=[user])
                continue
            if not user.startswith(group.common):
                group.common = _common_prefix(group.common, user)
            group.rows += 1
            if self._compared < MAX_COMPARED:
                self._compared += 1
                group.pairs.append((user, _closest_earlier(group.seen, user)))

    def estimate(self, counter: TokenCounter, rule: CacheRule) -> CachedEstimate:
        """Expected cached tokens when each group's first row warms the cache for the others."""
        cached = groups = longest = 0
        for system, group in self._groups.items():
            base = _template_text(counter, system, group.common)
            base_head = _stable_head(base)
            base_tokens = _prefix_tokens(counter, system, base_head)
            longest = max(longest, base_tokens)
            if group.rows < 2:
                continue
            total = 0
            for user, earlier in group.pairs:
                # After the stable head, both go on as their own tokens: count the ones they share.
                mine = _template_text(counter, system, user)[len(base_head) :]
                theirs = _template_text(counter, system, earlier)[len(base_head) :]
                total += rule.cacheable(base_tokens + _shared_tokens(mine, theirs))
            total += (group.rows - 1 - len(group.pairs)) * rule.cacheable(base_tokens)
            if total:
                groups += 1
                cached += total
        return CachedEstimate(cached, groups, longest, rule.name)


def _closest_earlier(seen: list[str], user: str) -> str:
    """The one of ``seen`` (sorted) sharing the longest start with ``user``, which is then inserted."""
    at = bisect.bisect_left(seen, user)
    best, best_length = "", -1
    for neighbour in seen[max(0, at - 1) : at + 1]:
        length = len(_common_prefix(neighbour, user))
        if length > best_length:
            best, best_length = neighbour, length
    seen.insert(at, user)
    return best


# An ASCII letter followed by an ASCII non-letter: Tekken's pre-tokenizer always cuts between
# them (see tokens._split_stable_head), so the tokens before such a cut never depend on what follows.
_CUT = re.compile(r"[A-Za-z](?=[\x00-\x40\x5b-\x60\x7b-\x7f])")


def _shared_tokens(a: str, b: str) -> int:
    """How many tokens ``a`` and ``b`` share at the start: ``_shared_count(encode(a), encode(b))``.

    Cheaper than encoding both texts: where they part at character ``p``,
    the tokens before the last cut common to both (before ``p``) are the
    same in both and only counted, and the tokens they share all end by the
    end of character ``p`` (equal tokens are equal bytes), so each text is
    encoded only up to its first cut after ``p``.
    """
    p = len(_common_prefix(a, b))
    cuts = [m.end() for m in _CUT.finditer(a, 0, p)]  # within a[:p], so a cut in b too
    head = cuts[-1] if cuts else 0
    a_end, b_end = _CUT.search(a, p), _CUT.search(b, p)
    shared = count_text(a[:head]) if head else 0
    mine = encode_text(a[head : a_end.end() if a_end else len(a)])
    theirs = encode_text(b[head : b_end.end() if b_end else len(b)])
    return shared + _shared_count(mine, theirs)


def _shared_count(a: list[int], b: list[int]) -> int:
    """How many tokens two token lists share at the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _template_text(counter: TokenCounter, system: str | None, user_start: str) -> str:
    """The request text before the user message's shared start ends, as the counter's template lays it out."""
    if isinstance(counter, TekkenV3ChatCounter):
        # v3 glues the system prompt to the user message: <s>[INST] system\n\nuser [/INST].
        return f"{system}{_V3_SYSTEM_JOIN}{user_start}" if system else user_start
    return user_start


def _prefix_tokens(counter: TokenCounter, system: str | None, head: str) -> int:
    """Tokens at the start of every request of a group: the template's, the system's, the stable head's."""
    if isinstance(counter, TekkenV3ChatCounter):
        return _V3_LEAD_TOKENS + count_text(head) if head else 0
    # Other templates: the whole system message (ApproximateCounter's 4 per message), then the user's start.
    system_tokens = count_text(system) + 4 if system is not None else 0
    return system_tokens + (count_text(head) if head else 0)
