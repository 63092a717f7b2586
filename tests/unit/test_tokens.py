"""Tests for pipeline.tokens: the fast counter must equal mistral-common's own count."""

from __future__ import annotations

import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from pipeline.engine import tokens
from pipeline.engine.tokens import (
    APPROX_TOKENS_PER_MESSAGE,
    ApproximateCounter,
    TekkenV3ChatCounter,
    counter_for,
)

# Pieces random messages are assembled from: plain words plus everything that
# could trip up a re-implementation of the template (whitespace at the edges,
# newlines next to the "\n\n" join, non-ASCII letters and marks, emoji,
# digits, punctuation runs, and text that looks like special tokens).
# fmt: off
FRAGMENTS = [
    "hello", "world", "The", "quick", "brown", "fox", "isn't", "e.g.", "U.S.A.",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "\n\n\n", "\u00a0", "\u3000",
    "café", "naïve", "Straße", "ÉCOLE", "e\u0301", "日本語のテキスト", "中文", "مرحبا",
    "Привет", "ελληνικά", "🙂", "👩‍💻", "🇫🇷", "✓", "…", "—", "«»",
    "[INST]", "[/INST]", "<s>", "</s>", "<unk>", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
    "<|endoftext|>", "<|im_start|>", "[IMG]",
    "0", "42", "3.14159", "1,000,000", "2026-11-20",
    ".", ",", "!?", "...", "::", "//", "/*", "*/", "{", "}", '{"a": [1, 2]}',
    "def f(x):\n    return x", "'", '"', "`", "#", "$", "%", "&&", "||", "\\",
]
# fmt: on


def random_text(rng: random.Random, max_fragments: int = 12) -> str:
    """A random string of 0..max_fragments fragments, sometimes space-separated."""
    parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(0, max_fragments))]
    return rng.choice(["", " "]).join(parts)


def random_system(rng: random.Random, pool: list[str]) -> str | None:
    """None, empty, whitespace, a shared pool entry (fast path) or a one-off text."""
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.2:
        return rng.choice(["", " ", "\n", "  \n\n"])
    if roll < 0.6:
        return rng.choice(pool)
    return random_text(rng)


@pytest.fixture(scope="module")
def mistral() -> MistralTokenizer:
    return MistralTokenizer.v3(is_tekken=True)


def reference(tok: MistralTokenizer, system: str | None, user: str) -> int:
    """The authoritative count, one request at a time."""
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    request = ChatCompletionRequest.from_openai(messages)  # type: ignore[arg-type]
    return len(tok.encode_chat_completion(request).tokens)


def assert_matches_reference(tok: MistralTokenizer, systems: list[str | None], users: list[str]) -> None:
    got = TekkenV3ChatCounter().count_chat(systems, users)
    want = [reference(tok, s, u) for s, u in zip(systems, users, strict=True)]
    mismatches = [(s, u, g, w) for s, u, g, w in zip(systems, users, got, want, strict=True) if g != w]
    assert not mismatches, mismatches[:5]


def test_randomized_rows_match_encode_chat_completion(mistral: MistralTokenizer) -> None:
    rng = random.Random(20261120)
    # A small pool so most systems repeat and take the shared-head fast path.
    pool = [random_text(rng, 20) for _ in range(12)] + [
        "You are a helpful assistant.",
        "You are a helpful assistant",
        "Answer in JSON.\n",
        "Classify the review. ",
        "Réponds en français…",
        "日本語で答えてください",
    ]
    systems = [random_system(rng, pool) for _ in range(600)]
    users = [random_text(rng) for _ in range(600)]
    assert_matches_reference(mistral, systems, users)


EDGE_CASES: list[tuple[str | None, str]] = [
    (None, ""),
    (None, "hello"),
    ("", "hello"),  # an empty system prompt is dropped by mistral-common
    (" ", "hello"),  # whitespace-only is not empty: it is kept
    ("  sys  ", "  user  "),  # no stripping on either side
    ("sys\n", "\nuser"),  # newlines around the "\n\n" join merge into one piece
    ("sys.", "\n\nuser"),
    ("sys", ""),
    ("\n\n", "\n\n"),
    ("[INST]", "[/INST]"),
    ("<s>", "</s>"),
    ("<s>[INST] hi [/INST]</s>", "[TOOL_CALLS] <unk>"),
    ("Émoji 👩‍💻 and 🇫🇷", "🙂🙂🙂"),
    ("café", "e\u0301t\u00e9"),
    ("line one\r\nline two", "tab\tseparated\tvalues"),
    ("x" * 5000, "y" * 5000),
]


@pytest.mark.parametrize(("system", "user"), EDGE_CASES)
def test_edge_cases_match_encode_chat_completion(mistral: MistralTokenizer, system: str | None, user: str) -> None:
    # Twice over, so a system prompt is counted both as a one-off (first call)
    # and as a shared prompt split at its stable head (second call).
    assert_matches_reference(mistral, [system], [user])
    assert_matches_reference(mistral, [system, system], [user, user])


@pytest.mark.parametrize(
    "system",
    ["abc", "abc.", "abc ", "abc\n", "abc...\n\n", "It's", "ÉCOLE", "naïve", "a1", "a b c d", "end."],
)
def test_shared_system_split_is_exact(mistral: MistralTokenizer, system: str) -> None:
    # Systems ending right at, or just after, the cut point with users that
    # start with every kind of character the Tekken pattern distinguishes.
    users = ["", " x", "x", "X", "\n", "\n\nx", ".", "1", "é", "🙂", "'s", "  \n", "/"]
    assert_matches_reference(mistral, [system] * len(users), users)


def test_split_stable_head_is_additive(mistral: MistralTokenizer) -> None:
    encoding = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    rng = random.Random(7)
    for _ in range(500):
        text = random_text(rng, 16)
        head, tail = tokens._split_stable_head(text)
        assert head + tail == text
        suffix = tail + random_text(rng, 4)
        whole = len(encoding.encode_ordinary(head + suffix))
        assert whole == len(encoding.encode_ordinary(head)) + len(encoding.encode_ordinary(suffix))


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 system prompts for 1 user messages"):
        TekkenV3ChatCounter().count_chat([None, None], ["x"])


def test_empty_batch() -> None:
    assert counter_for("mistralai/ministral-8b").count_chat([], []) == []


@pytest.mark.parametrize(
    "model",
    [
        "mistralai/ministral-8b",
        "ministral-8b-latest",
        "ministral-8b-2410",
        "MistralAI/Ministral-8B",
        "mistralai/mistral-nemo:free",
        "open-mistral-nemo",
    ],
)
def test_v3_tekken_models_are_exact(model: str) -> None:
    counter = counter_for(model)
    assert counter.exact is True
    assert counter.name == "mistral-common Tekken (v3)"


@pytest.mark.parametrize(
    "model",
    [
        "openai/gpt-4o-mini",
        "meta-llama/llama-3.1-8b-instruct",
        "smollm2-135m",
        # Newer Mistral models use other templates/tokenizers than v3 Tekken.
        "mistral-small-latest",
        "mistralai/mistral-large",
        "mistralai/mixtral-8x7b-instruct",
    ],
)
def test_other_models_are_approximate(model: str) -> None:
    counter = counter_for(model)
    assert counter.exact is False
    assert counter.name == "approximate (Tekken BPE)"


def test_approximate_counts_text_plus_per_message_overhead(mistral: MistralTokenizer) -> None:
    encoding = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    system, user = "You are terse.", "Summarise: the cat sat on the mat."
    counts = ApproximateCounter().count_chat([system, None, ""], [user, user, user])
    n_system, n_user = len(encoding.encode(system)), len(encoding.encode(user))
    assert counts == [
        n_system + n_user + 2 * APPROX_TOKENS_PER_MESSAGE,
        n_user + APPROX_TOKENS_PER_MESSAGE,
        n_user + 2 * APPROX_TOKENS_PER_MESSAGE,  # an empty system message is still sent
    ]
