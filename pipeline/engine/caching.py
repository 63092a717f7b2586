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

import re
from collections.abc import Iterator, Sequence
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
    """The longest common start of two strings.

    Compared in stretches that double (16, 32, 64, ... characters), then
    halving within the first stretch that differs: the work follows the
    length of the common start, not of the strings (rows share tens of
    characters of texts hundreds long).
    """
    n = min(len(a), len(b))
    low, high = 0, min(16, n)  # a[:low] == b[:low]
    while a[low:high] == b[low:high]:
        if high == n:
            return a[:n]
        low, high = high, min(2 * high, n)
    while high - low > 1:  # a[low:high] != b[low:high]
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
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
    compared: list[str] = field(default_factory=list)
    """The first row's user message, then those of the later rows compared with the earlier ones, in order."""


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
        if len(systems) != len(users):
            raise ValueError(f"{len(systems)} system prompts for {len(users)} user messages")
        if users and self._compared >= MAX_COMPARED and systems.count(systems[0]) == len(systems):
            group = self._groups.get(systems[0])
            if group is not None:
                # One system, no more rows to compare: only the group's common start changes. The start
                # all the users share is the one the first and last of them in sorted order share.
                group.common = _common_prefix(group.common, _common_prefix(min(users), max(users)))
                group.rows += len(users)
                return
        for system, user in zip(systems, users, strict=True):
            group = self._groups.get(system)
            if group is None:
                if len(self._groups) < MAX_GROUPS:
                    self._groups[system] = _Group(user, compared=[user])
                continue
            if not user.startswith(group.common):
                group.common = _common_prefix(group.common, user)
            group.rows += 1
            if self._compared < MAX_COMPARED:
                self._compared += 1
                group.compared.append(user)

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
            for user, earlier in _closest_earlier(group.compared):
                # After the stable head, both go on as their own tokens: count the ones they share.
                mine = _template_text(counter, system, user)[len(base_head) :]
                theirs = _template_text(counter, system, earlier)[len(base_head) :]
                total += rule.cacheable(base_tokens + _shared_tokens(mine, theirs))
            total += (group.rows - len(group.compared)) * rule.cacheable(base_tokens)
            if total:
                groups += 1
                cached += total
        return CachedEstimate(cached, groups, longest, rule.name)


def _closest_earlier(arrivals: list[str]) -> Iterator[tuple[str, str]]:
    """Each message after the first, with the earlier one it shares the longest start with.

    That earlier message is one of its two neighbours in sorted order among
    the earlier ones (sorted texts share less the farther apart they are);
    on a tie, the smaller one. All are found at once: one sort, then each
    message's nearest earlier neighbour on either side with a stack, where
    inserting every message into a sorted list took quadratic time.
    """
    order = sorted(range(len(arrivals)), key=arrivals.__getitem__)  # stable: equal texts in arrival order
    below = _nearest_earlier(order)
    above = _nearest_earlier(order[::-1])[::-1]
    for at, i in enumerate(order):
        if i == 0:
            continue  # the first message has nothing earlier
        user = arrivals[i]
        best, best_length = "", -1
        for j in (below[at], above[at]):
            if j >= 0 and (length := len(_common_prefix(arrivals[j], user))) > best_length:
                best, best_length = arrivals[j], length
        yield user, best


def _nearest_earlier(order: list[int]) -> list[int]:
    """For each position of ``order``, the nearest value before it that is smaller (-1: none)."""
    nearest: list[int] = []
    stack: list[int] = []
    for i in order:
        while stack and stack[-1] > i:
            stack.pop()
        nearest.append(stack[-1] if stack else -1)
        stack.append(i)
    return nearest


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
