"""Offline prompt-token counting for cost estimates and context checks.

Everything here works without network access: the Tekken tokenizer ships
inside the ``mistral-common`` wheel (``tiktoken``'s own loaders and the
Hugging Face hub download their files at run time, so they are not used).

Two counters exist:

* :class:`TekkenV3ChatCounter` is exact for models whose tokenizer and chat
  template are mistral-common's v3 Tekken (``mistralai/ministral-8b`` and
  friends). It reproduces ``len(encode_chat_completion(...).tokens)`` without
  building a request object per row, which is far too slow for a million rows.
* :class:`ApproximateCounter` is used for every other model: the same Tekken
  BPE over each message's text plus a fixed per-message overhead.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

__all__ = [
    "APPROX_TOKENS_PER_MESSAGE",
    "ApproximateCounter",
    "TekkenV3ChatCounter",
    "TokenCounter",
    "counter_for",
    "is_v3_tekken_model",
]


class TokenCounter(Protocol):
    """Counts the prompt tokens of one chat request per row."""

    name: str
    """Human-readable description, e.g. ``"mistral-common Tekken (v3)"``."""
    exact: bool
    """True when this is the model's own tokenizer and chat template."""

    def count_chat(self, systems: Sequence[str | None], users: Sequence[str]) -> list[int]:
        """Prompt tokens of ``[system (if not None), user]`` for each row."""
        ...


# --------------------------------------------------------------------------
# Loading the tokenizer (1-4 s), once per process.

_load_lock = threading.Lock()
_tokenizer: MistralTokenizer | None = None


def _mistral_tokenizer() -> MistralTokenizer:
    """Return the process-wide v3 Tekken tokenizer, loading it on first use."""
    global _tokenizer
    # Double-checked so concurrent first callers load it only once, while
    # later callers never touch the lock.
    if _tokenizer is None:
        with _load_lock:
            if _tokenizer is None:
                from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

                _tokenizer = MistralTokenizer.v3(is_tekken=True)
    return _tokenizer


def _text_token_counter() -> Callable[[str], int]:
    """Return a function giving the number of Tekken tokens in a plain text.

    Tekken's ``encode`` is ``tiktoken.Encoding.encode`` on the raw text, with
    ids shifted past the special tokens. Its tiktoken ``Encoding`` registers no
    special tokens, so ``encode_ordinary`` (no special-token scan) gives the
    same tokens, and text such as ``"[INST]"`` or ``"<s>"`` is plain text.
    The ``Encoding`` lives in a private attribute: if a future mistral-common
    moves it, fall back to the public per-text ``encode`` (slower, same result).
    """
    tekken = _mistral_tokenizer().instruct_tokenizer.tokenizer
    encoding = getattr(tekken, "_model", None)
    encode_ordinary = getattr(encoding, "encode_ordinary", None)
    if encode_ordinary is not None and not getattr(encoding, "_special_tokens", None):
        return lambda text: len(encode_ordinary(text))
    return lambda text: len(tekken.encode(text, bos=False, eos=False))


def _check_lengths(systems: Sequence[str | None], users: Sequence[str]) -> None:
    if len(systems) != len(users):
        raise ValueError(f"{len(systems)} system prompts for {len(users)} user messages")


# --------------------------------------------------------------------------
# The exact v3 Tekken chat counter.

# `<s>`, `[INST]` and `[/INST]`: the v3 template for a single user turn.
_V3_TEMPLATE_TOKENS = 3
# mistral-common glues the system prompt to the last user message with this.
_V3_SYSTEM_JOIN = "\n\n"


def _is_ascii_letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _split_stable_head(system: str) -> tuple[str, str]:
    """Split ``system`` into ``(head, tail)`` so tokens(head + X) = tokens(head) + tokens(X)
    for every X starting with ``tail``.

    Why this holds: tiktoken tokenizes each piece of its pre-tokenizer regex
    separately. We cut just after an ASCII letter that is followed by an ASCII
    non-letter. In Tekken's pattern only the letter alternatives can cover a
    letter, they consume letters and marks only after their optional one-char
    prefix, and every other alternative stops at a letter. So the regex piece
    holding that letter ends exactly at the cut, whatever follows it, no match
    before the cut looks past it, and the pattern has no look-behind: the
    pieces after the cut are those of the tail on its own. The randomized
    test against ``encode_chat_completion`` exercises this.

    Returns ``("", system)`` when there is no such cut.
    """
    for cut in range(len(system) - 1, 0, -1):
        if _is_ascii_letter(system[cut - 1]) and system[cut].isascii() and not system[cut].isalpha():
            return system[:cut], system[cut:]
    return "", system


class TekkenV3ChatCounter:
    """Exact prompt tokens for models using mistral-common's v3 Tekken template.

    For one system prompt and one user message mistral-common v3 produces
    ``<s>[INST]`` + text + ``[/INST]``, where text is ``system + "\\n\\n" + user``
    when the system prompt is non-empty and just ``user`` otherwise (an empty
    system prompt is dropped; no content is stripped). So the count is 3 plus
    the Tekken tokens of that text, counted with the bare tiktoken ``Encoding``.

    A system prompt shared by many rows (the usual case) is not re-tokenized
    per row: its stable head (see :func:`_split_stable_head`) is counted once.
    """

    name = "mistral-common Tekken (v3)"
    exact = True

    def count_chat(self, systems: Sequence[str | None], users: Sequence[str]) -> list[int]:
        """Prompt tokens per row, equal to ``encode_chat_completion``'s count.

        A plain loop, not threads: tiktoken releases the GIL while encoding,
        but for prompts of a few hundred tokens the per-call Python work
        dominates. Measured on the 2-core box, two threads over big chunks
        were 10-30% slower than one, and ``encode_ordinary_batch`` (one future
        per text) about 2.5x slower.
        """
        _check_lengths(systems, users)
        count = _text_token_counter()
        # Only systems used by several rows are worth splitting: for a
        # one-off system, counting head and tail separately costs as much as
        # counting the whole prompt once.
        shared = Counter(system for system in systems if system)
        heads: dict[str, tuple[int, str]] = {}
        totals: list[int] = []
        for system, user in zip(systems, users, strict=True):
            if not system:
                totals.append(_V3_TEMPLATE_TOKENS + count(user))
            elif shared[system] > 1:
                entry = heads.get(system)
                if entry is None:
                    head, tail = _split_stable_head(system)
                    entry = heads[system] = ((count(head) if head else 0), tail)
                head_tokens, tail = entry
                totals.append(_V3_TEMPLATE_TOKENS + head_tokens + count(tail + _V3_SYSTEM_JOIN + user))
            else:
                totals.append(_V3_TEMPLATE_TOKENS + count(system + _V3_SYSTEM_JOIN + user))
        return totals


# --------------------------------------------------------------------------
# The approximate counter for every other model.

APPROX_TOKENS_PER_MESSAGE = 4
"""Allowance for a chat template's role markers and separators, per message."""


class ApproximateCounter:
    """Tekken BPE over each message's text plus a fixed per-message overhead.

    Other models have other tokenizers (and we cannot download them), so this
    is an estimate: close for English with modern ~130k-vocabulary tokenizers,
    rougher for code or other scripts.
    """

    name = "approximate (Tekken BPE)"
    exact = False

    def count_chat(self, systems: Sequence[str | None], users: Sequence[str]) -> list[int]:
        """Estimated prompt tokens per row."""
        _check_lengths(systems, users)
        count = _text_token_counter()
        # Messages are counted separately here, so each distinct system
        # prompt is counted exactly once.
        system_tokens: dict[str, int] = {}
        for system in systems:
            if system is not None and system not in system_tokens:
                system_tokens[system] = count(system) + APPROX_TOKENS_PER_MESSAGE

        return [
            (system_tokens[system] if system is not None else 0) + count(user) + APPROX_TOKENS_PER_MESSAGE
            for system, user in zip(systems, users, strict=True)
        ]


# --------------------------------------------------------------------------
# Choosing a counter.

# Models whose tokenizer and chat template are mistral-common's v3 Tekken,
# after normalisation by `_base_model_name`. Taken from mistral-common's own
# MODEL_NAME_TO_TOKENIZER_CLS (ministral-8b-2410, open-mistral-nemo-2407,
# mistral-small-2409, pixtral-12b-2409) plus the aliases OpenRouter and
# Mistral's API use for them. Deliberately absent: newer models behind
# "-latest" aliases (mistral-small-latest is Mistral Small 3.x, which uses a
# newer Tekken template with [SYSTEM_PROMPT] tokens that mistral-common does
# not ship offline), SentencePiece models (mistral-7b, mixtral, codestral,
# mistral-large) and models with an unknown tokenizer (ministral-3b).
_V3_TEKKEN_MODELS = frozenset(
    {
        "ministral-8b",
        "ministral-8b-2410",
        "ministral-8b-latest",
        "mistral-nemo",
        "mistral-nemo-2407",
        "open-mistral-nemo",
        "open-mistral-nemo-2407",
        "pixtral-12b",
        "pixtral-12b-2409",
        "mistral-small-2409",
    }
)


def _base_model_name(model: str) -> str:
    """``"mistralai/Ministral-8B:free"`` -> ``"ministral-8b"``; other vendors keep their prefix."""
    name = model.strip().lower()
    name = name.split(":", 1)[0]  # OpenRouter variants: ":free", ":nitro", ...
    return name.removeprefix("mistralai/")


def is_v3_tekken_model(model: str) -> bool:
    """True when ``model`` is known to use mistral-common's v3 Tekken chat template."""
    return _base_model_name(model) in _V3_TEKKEN_MODELS


_EXACT_V3 = TekkenV3ChatCounter()
_APPROXIMATE = ApproximateCounter()


def counter_for(model: str) -> TokenCounter:
    """Return the token counter for ``model`` (exact for v3 Tekken models).

    Cheap: the tokenizer itself is loaded on the first count, once per process.
    """
    return _EXACT_V3 if is_v3_tekken_model(model) else _APPROXIMATE


_text_counter: Callable[[str], int] | None = None


def count_text(text: str) -> int:
    """Tokens in a plain text (a completion), with the Tekken tokenizer.

    Used to charge replies that arrive without ``usage``: exact for Tekken
    models, an estimate for others.
    """
    global _text_counter
    if _text_counter is None:
        _text_counter = _text_token_counter()
    return _text_counter(text)


def encode_text(text: str) -> list[int]:
    """The Tekken tokens of a plain text (the dry run compares rows' starts token by token)."""
    tekken = _mistral_tokenizer().instruct_tokenizer.tokenizer
    encoding = getattr(tekken, "_model", None)
    encode_ordinary = getattr(encoding, "encode_ordinary", None)
    if encode_ordinary is not None and not getattr(encoding, "_special_tokens", None):
        return list(encode_ordinary(text))
    return list(tekken.encode(text, bos=False, eos=False))
