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

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.engine.tokens import TekkenV3ChatCounter, TokenCounter, count_text

__all__ = ["CacheRule", "CachedEstimate", "SharedPrefixes", "cache_rule"]

# At most this many distinct system prompts are followed; rows beyond share no known prefix.
MAX_GROUPS = 10_000
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


class SharedPrefixes:
    """Rows grouped by system prompt, with the text their user messages share at the start."""

    def __init__(self) -> None:
        self._users: dict[str | None, str] = {}
        self._rows: dict[str | None, int] = {}

    def add(self, systems: Sequence[str | None], users: Sequence[str]) -> None:
        for system, user in zip(systems, users, strict=True):
            shared = self._users.get(system)
            if shared is None:
                if len(self._users) >= MAX_GROUPS:
                    continue
                self._users[system] = user
                self._rows[system] = 1
                continue
            if not user.startswith(shared):
                self._users[system] = _common_prefix(shared, user)
            self._rows[system] += 1

    def estimate(self, counter: TokenCounter, rule: CacheRule) -> CachedEstimate:
        """Expected cached tokens when each group's first row warms the cache for the others."""
        cached = groups = longest = 0
        for system, user_prefix in self._users.items():
            rows = self._rows[system]
            tokens = self._prefix_tokens(counter, system, user_prefix)
            longest = max(longest, tokens)
            per_row = rule.cacheable(tokens)
            if rows > 1 and per_row:
                groups += 1
                cached += (rows - 1) * per_row
        return CachedEstimate(cached, groups, longest, rule.name)

    @staticmethod
    def _prefix_tokens(counter: TokenCounter, system: str | None, user_prefix: str) -> int:
        """Tokens at the start of every request of a group (the counter's template around the text)."""
        if isinstance(counter, TekkenV3ChatCounter):
            # v3 glues the system prompt to the user message: <s>[INST] system\n\nuser [/INST].
            text = f"{system}{_V3_SYSTEM_JOIN}{user_prefix}" if system else user_prefix
            head = _stable_head(text)
            return _V3_LEAD_TOKENS + count_text(head) if head else 0
        # Other templates: the whole system message, then the user message's shared start.
        head = _stable_head(user_prefix)
        system_tokens = count_text(system) + 4 if system is not None else 0  # 4: ApproximateCounter's overhead
        return system_tokens + (count_text(head) if head else 0)
