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
    # Row by row (few rows) and in a batch counted piece by piece (many rows).
    assert_matches_reference(mistral, [system], [user])
    want = reference(mistral, system, user)
    assert TekkenV3ChatCounter().count_chat([system] * 70, [user] * 70) == [want] * 70


@pytest.mark.parametrize(
    "system",
    ["abc", "abc.", "abc ", "abc\n", "abc...\n\n", "It's", "ÉCOLE", "naïve", "a1", "a b c d", "end."],
)
def test_shared_system_split_is_exact(mistral: MistralTokenizer, system: str) -> None:
    # Systems ending right at, or just after, a cut point with users that
    # start with every kind of character the Tekken pattern distinguishes
    # (five times over: enough rows to be counted piece by piece).
    users = ["", " x", "x", "X", "\n", "\n\nx", ".", "1", "é", "🙂", "'s", "  \n", "/"] * 5
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


# Texts for the batch counter: the random ones above plus what a prompt template
# renders (placeholders, literal braces), text without any ASCII letter (one
# long piece), NUL bytes, letters next to marks and digits, and very long rows.
# fmt: off
BATCH_EXTRAS = [
    "", " ", "\n\n", "{text}", "{{text}}", "Classify: {text}\n\n", "Review: {{ not a field }}",
    "日本語のテキストです。" * 40, "١٢٣٤٥٦٧٨٩٠" * 10, "0123456789" * 50, "a\x00b", "\x00",
    "ab\u0301c", "a\u0301", "x1y2z3", "A.B.C.", "word" * 300, "word " * 2000, "🙂" * 100,
    "👩‍💻👩‍💻 done", "Ünïcödé ÀÉÎ", "tab\tand\r\nlines\n", "ends with letter", "z",
]
# fmt: on


def batch_texts(rng: random.Random, n: int) -> list[str]:
    return [
        rng.choice(BATCH_EXTRAS) + random_text(rng, 30) if rng.random() < 0.3 else random_text(rng, 30)
        for _ in range(n)
    ]


def test_count_texts_equals_counting_each_text(mistral: MistralTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch counter (pieces, chunks, a bounded memo of pieces) gives every text's exact count."""
    encoding = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    rng = random.Random(20261205)
    texts = batch_texts(rng, 3000) + BATCH_EXTRAS * 3
    rng.shuffle(texts)
    # Small chunks and a small memo, so several chunks, a short last one and clearing the memo are all exercised.
    monkeypatch.setattr(tokens, "_PIECES_CHUNK", 700)
    monkeypatch.setattr(tokens, "_KNOWN_PIECES_MAX", 500)
    monkeypatch.setattr(tokens, "_known_pieces", {})
    want = [len(encoding.encode_ordinary(text)) for text in texts]
    assert tokens.count_texts(texts) == want
    assert tokens.count_texts(texts) == want  # again, with pieces remembered from the first pass


@pytest.mark.parametrize("min_per_text", [0, 10**6])
def test_text_with_few_cuts_is_counted_whole_or_in_pieces_alike(
    mistral: MistralTokenizer, monkeypatch: pytest.MonkeyPatch, min_per_text: int
) -> None:
    # Chinese, Cyrillic and digits have no ASCII letter to cut after: a text is one piece, or a few.
    encoding = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    rng = random.Random(min_per_text)
    texts = [
        "".join(rng.choice("日本語のテキスト。中文，Привет мир 12345 e\u0301 🙂x.") for _ in range(80))
        for _ in range(300)
    ]
    monkeypatch.setattr(tokens, "_PIECES_MIN_PER_TEXT", min_per_text)
    assert tokens.count_texts(texts) == [len(encoding.encode_ordinary(text)) for text in texts]


def test_count_texts_falls_back_for_text_arrow_cannot_hold(mistral: MistralTokenizer) -> None:
    # A lone surrogate (possible from the Python API) is no valid UTF-8: tiktoken's own fix-up counts it.
    encoding = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    texts = ["fine text"] * 70 + ["bad \ud800 surrogate"]
    assert tokens.count_texts(texts) == [len(encoding.encode_ordinary(text)) for text in texts]


def test_encoding_read_from_file_is_mistral_commons_own(mistral: MistralTokenizer) -> None:
    theirs = mistral.instruct_tokenizer.tokenizer._model  # type: ignore[attr-defined]
    ours = tokens._encoding_from_file()
    assert ours._pat_str == theirs._pat_str
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours._special_tokens == theirs._special_tokens == {}


def test_without_the_bundled_file_the_mistral_tokenizer_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise OSError("no such file")

    monkeypatch.setattr(tokens, "_encoding_from_file", missing)
    encode = tokens._load_encode()  # mistral-common's own Tekkenizer, ~1 s slower
    text = "Hello, world! [INST] café 🙂 {text}"
    assert encode(text) == tokens.encode_text(text)


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
