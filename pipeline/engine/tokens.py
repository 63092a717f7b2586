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

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import tiktoken

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
# Loading the tokenizer, once per process.

# The file `MistralTokenizer.v3(is_tekken=True)` reads, inside the mistral-common wheel.
_TEKKEN_V3_FILE = "tekken_240718.json"

_load_lock = threading.Lock()
_encode: Callable[[str], list[int]] | None = None


def _tekken_encode() -> Callable[[str], list[int]]:
    """Return the process-wide function giving a plain text's Tekken tokens, loading it on first use."""
    global _encode
    # Double-checked so concurrent first callers load it only once, while
    # later callers never touch the lock.
    if _encode is None:
        with _load_lock:
            if _encode is None:
                _encode = _load_encode()
    return _encode


def _load_encode() -> Callable[[str], list[int]]:
    """Tekken's ``encode`` without the ids' shift past the special tokens (counts are the same).

    Tekken's ``encode`` is ``tiktoken.Encoding.encode`` on the raw text. Its
    ``Encoding`` registers no special tokens, so ``encode_ordinary`` (no
    special-token scan) gives the same tokens, and text such as ``"[INST]"``
    or ``"<s>"`` is plain text. That ``Encoding`` is built here from
    mistral-common's bundled file as its ``Tekkenizer`` builds it (0.7 s
    instead of 1.9 s, and 45 MB less: the ``Tekkenizer`` also decodes every
    token's text); a test checks both are the same. Should the file or its
    layout change, the ``MistralTokenizer`` is loaded instead.
    """
    try:
        return _encoding_from_file().encode_ordinary
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        pass
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tekken = MistralTokenizer.v3(is_tekken=True).instruct_tokenizer.tokenizer
    encoding = getattr(tekken, "_model", None)
    encode_ordinary = getattr(encoding, "encode_ordinary", None)
    if encode_ordinary is not None and not getattr(encoding, "_special_tokens", None):
        return encode_ordinary
    return lambda text: tekken.encode(text, bos=False, eos=False)


def _encoding_from_file() -> tiktoken.Encoding:
    """The v3 Tekken ``tiktoken.Encoding``, read from mistral-common's data as ``Tekkenizer`` does."""
    import base64
    import json
    from pathlib import Path

    import mistral_common
    import tiktoken

    path = Path(mistral_common.__file__).parent / "data" / _TEKKEN_V3_FILE
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    config = data["config"]
    if config.get("version") != "v3":
        raise ValueError(f"{path}: tokenizer version {config.get('version')}, not v3")
    inner = config["default_vocab_size"] - config["default_num_special_tokens"]
    vocab = data["vocab"][:inner]
    ranks = {base64.b64decode(entry["token_bytes"]): entry["rank"] for entry in vocab}
    if len(ranks) != inner or set(ranks.values()) != set(range(inner)):
        raise ValueError(f"{path}: unexpected vocabulary")
    return tiktoken.Encoding(
        name=_TEKKEN_V3_FILE.removesuffix(".json"), pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens={}
    )


def _text_token_counter() -> Callable[[str], int]:
    """Return a function giving the number of Tekken tokens in a plain text."""
    encode = _tekken_encode()
    return lambda text: len(encode(text))


def _check_lengths(systems: Sequence[str | None], users: Sequence[str]) -> None:
    if len(systems) != len(users):
        raise ValueError(f"{len(systems)} system prompts for {len(users)} user messages")


# --------------------------------------------------------------------------
# Where Tekken's pre-tokenizer always cuts, and the v3 template.

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
    tests against ``encode_chat_completion`` and ``encode_ordinary`` exercise this.

    Returns ``("", system)`` when there is no such cut.
    """
    for cut in range(len(system) - 1, 0, -1):
        if _is_ascii_letter(system[cut - 1]) and system[cut].isascii() and not system[cut].isalpha():
            return system[:cut], system[cut:]
    return "", system


# --------------------------------------------------------------------------
# Counting many texts at once.

# Fewer texts than this are counted one by one: the array set-up costs more than it saves.
_PIECES_MIN_TEXTS = 64
_PIECES_CHUNK = 4096
# Texts with fewer pieces than this on average are counted whole (see _count_pieces).
_PIECES_MIN_PER_TEXT = 4
# Distinct pieces remembered across batches (prose uses tens of thousands; at most ~10 MB); longer
# pieces (scripts without ASCII letters, long numbers) are encoded per batch, not kept.
_KNOWN_PIECES_MAX = 1 << 16
_KNOWN_PIECE_MAX_CHARS = 64
_known_pieces: dict[str, int] = {}


def count_texts(texts: Sequence[str]) -> list[int]:
    """Tekken tokens of each text, exactly ``len(encode_ordinary(text))``, many at a time.

    A row-by-row loop spends ~25 us per 100-word text in tiktoken's regex and
    BPE. Here the texts are cut where Tekken's pre-tokenizer always cuts (after
    an ASCII letter followed by an ASCII non-letter, the rule of
    :func:`_split_stable_head`): a text's tokens are then the sum of its
    pieces' tokens, and a batch of prose holds few distinct pieces (``" the"``,
    ``".\\n\\nThe"``), each encoded once. The cuts are found with numpy over
    the texts' UTF-8 bytes (an ASCII byte is always a whole character) and the
    distinct pieces with Arrow's hash table, so the per-row Python work is gone.
    Texts Arrow cannot hold (lone surrogates: tiktoken's own fix-up applies
    then) are counted one by one.
    """
    count = _text_token_counter()
    if len(texts) < _PIECES_MIN_TEXTS:
        return [count(text) for text in texts]
    import pyarrow as pa

    # The C allocator, not Arrow's default (mimalloc): that one kept ~50 MB more
    # resident over a 1,000,000-row dry run for these short-lived arrays.
    pool = pa.system_memory_pool()
    totals: list[int] = []
    # In chunks: a chunk's arrays take a few bytes per byte of text, and ones
    # this size are reused by the allocator instead of raising the peak RSS
    # (larger chunks look each distinct piece up fewer times: 4,096 rows of
    # ~100 words ran 25% faster than 1,024 on varied English, same peak RSS).
    for at in range(0, len(texts), _PIECES_CHUNK):
        chunk = texts[at : at + _PIECES_CHUNK]
        try:
            array = pa.array(chunk, pa.large_string(), memory_pool=pool)
        except (pa.ArrowException, UnicodeError):
            totals += [count(text) for text in chunk]
        else:
            counted = _count_pieces(array, count, pool)
            totals += counted if counted is not None else [count(text) for text in chunk]
    return totals


def _count_pieces(array: pa.LargeStringArray, count: Callable[[str], int], pool: pa.MemoryPool) -> list[int] | None:
    """Tokens of each string of ``array`` (no nulls), as the sum of its pieces' tokens.

    None when the texts have too few cuts for pieces to pay (text without
    ASCII letters, such as Chinese, is one piece): they are counted whole.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    if start == end:
        return [0] * n
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[start:end]
    offsets = offsets - start
    # In place where it can be: a byte of text takes a few bytes of arrays here, not ten.
    work = np.bitwise_or(data, 32)
    work -= 97  # uint8 arithmetic wraps: only 'A'-'Z' and 'a'-'z' land below 26
    letter = work < 26
    other_ascii = np.less(data, 128, out=work.view(np.bool_))
    np.greater(other_ascii, letter, out=other_ascii)  # ASCII and not a letter
    cut = np.zeros(len(data) + 1, dtype=bool)
    np.logical_and(letter[:-1], other_ascii[1:], out=cut[1:-1])
    del work, letter, other_ascii
    cut[offsets] = True  # every text starts and ends a piece
    bounds = np.flatnonzero(cut).astype(np.int64, copy=False)
    del cut
    if len(bounds) - 1 < _PIECES_MIN_PER_TEXT * n:
        return None
    pieces = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(data))
    encoded = pc.dictionary_encode(pieces, memory_pool=pool)
    distinct = _pieces_tokens(encoded.dictionary.to_pylist(), count)
    running = np.zeros(len(bounds), dtype=np.int64)
    np.cumsum(distinct.take(encoded.indices.to_numpy()), out=running[1:])
    first = np.searchsorted(bounds, offsets)  # each text's first piece (its start is a bound)
    return (running[first[1:]] - running[first[:-1]]).tolist()


def _pieces_tokens(pieces: list[str], count: Callable[[str], int]) -> np.ndarray:
    """Tokens of each distinct piece: remembered ones looked up in one C loop, the others encoded."""
    import numpy as np

    known = _known_pieces
    tokens = np.fromiter(map(known.get, pieces, itertools.repeat(-1)), dtype=np.int32, count=len(pieces))
    for i in np.flatnonzero(tokens < 0).tolist():
        piece = pieces[i]
        tokens[i] = found = count(piece)
        if len(piece) <= _KNOWN_PIECE_MAX_CHARS:
            if len(known) >= _KNOWN_PIECES_MAX:
                known.clear()  # a new vocabulary: start over rather than grow without end
            known[piece] = found
    return tokens


# --------------------------------------------------------------------------
# The exact v3 Tekken chat counter.


class TekkenV3ChatCounter:
    """Exact prompt tokens for models using mistral-common's v3 Tekken template.

    For one system prompt and one user message mistral-common v3 produces
    ``<s>[INST]`` + text + ``[/INST]``, where text is ``system + "\\n\\n" + user``
    when the system prompt is non-empty and just ``user`` otherwise (an empty
    system prompt is dropped; no content is stripped). So the count is 3 plus
    the Tekken tokens of that text, counted with the bare tiktoken ``Encoding``
    (many rows at once by :func:`count_texts`).
    """

    name = "mistral-common Tekken (v3)"
    exact = True

    def count_chat(self, systems: Sequence[str | None], users: Sequence[str]) -> list[int]:
        """Prompt tokens per row, equal to ``encode_chat_completion``'s count."""
        _check_lengths(systems, users)
        texts = [
            f"{system}{_V3_SYSTEM_JOIN}{user}" if system else user for system, user in zip(systems, users, strict=True)
        ]
        return [_V3_TEMPLATE_TOKENS + n for n in count_texts(texts)]


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
    return list(_tekken_encode()(text))
