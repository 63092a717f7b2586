"""A fake OpenAI/OpenRouter-compatible chat-completions server for tests and benchmarks.

This is a real aiohttp server listening on loopback, not a mock: the pipeline talks to it
over HTTP exactly as it would to OpenRouter, Mistral or a llama.cpp server.  Its replies
are deterministic functions of the last user message, so a test can check that every row
received *its own* completion (:func:`expected_reply`, :func:`expected_label`,
:func:`expected_json`), and its statistics reveal rate-limit violations
(:func:`max_per_window`) and rows that were paid for twice (:meth:`FakeServer.duplicates`).

Use it in-process::

    server = FakeServer()
    server.config.rps = 20
    with server.running():
        ...  # point the pipeline at server.base_url
    assert server.duplicates() == 0

or as a separate process (for benchmarks)::

    python -m tests.fakes.server --port 0 --rps 50 --latency 0.2
    # prints "READY http://127.0.0.1:PORT/v1", runs until SIGTERM/SIGINT

Provider response and error shapes follow ``/work/shared/PROVIDERS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.fakes.billing import (
    InFlightBudget,
    PrefixCache,
    Refusal,
    budget_403_body,
    in_flight_body,
    weight_body,
    word_tokens,
)

JSON = dict[str, Any]

DEFAULT_PRICE_PER_TOKEN = 0.1e-6
# Filler appended to every default reply; fixed so replies stay short and predictable.
_FILLER = "the quick brown fox"
# Vocabulary for generated JSON string values.
_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
)  # fmt: skip
LLAMACPP_SCHEMA_ERROR = "response_format type must be one of 'text', 'json_object'"

# Default error messages per status, modelled on OpenRouter's.
_ERROR_MESSAGES = {
    400: "Bad request",
    401: "No auth credentials found",
    402: "Insufficient credits",
    403: "Key is disabled",
    404: "Not found",
    408: "Request timed out",
    409: "Conflict",
    422: "Unprocessable entity",
    429: "Rate limit exceeded",
    500: "Internal server error",
    502: "Provider returned error",
    503: "No available provider meets your routing requirements",
}
# Statuses that get a Retry-After header (PROVIDERS.md: "may come with 429 and 503").
_RETRY_AFTER_STATUSES = frozenset({429, 503})

# Behaviours that answer 200 with a custom content and are billed like a completion.
_CONTENT_BEHAVIOURS = {
    "invalid_json": "this is not json",
    "wrong_label": '{"label": "not-a-label"}',
    "empty": "",
}


def _cost_field(cost: float, as_string: bool | str) -> float | str:
    """``usage.cost`` as a number, as its text, or in a format (``" {} "``)."""
    if isinstance(as_string, str):
        return as_string.format(cost)
    return str(cost) if as_string else cost


def default_models() -> list[JSON]:
    """The default ``GET /v1/models`` listing (OpenRouter shape)."""
    return [
        {
            "id": "mistralai/ministral-8b",
            "context_length": 131072,
            "pricing": {"prompt": "0.0000001", "completion": "0.0000001", "request": "0"},
            "top_provider": {"max_completion_tokens": None},
        },
        {
            "id": "test/other-model",
            "context_length": 8192,
            "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0"},
        },
    ]


# --------------------------------------------------------------------------- pure helpers


def content_hash(u: str) -> str:
    """Full sha256 hex digest of a user message (the seed of every deterministic reply)."""
    return hashlib.sha256(u.encode()).hexdigest()


def expected_reply(u: str) -> str:
    """The plain-text reply the server gives to last user message ``u``."""
    return f"ok {content_hash(u)[:16]} {_FILLER}"


def expected_label(u: str, labels: Sequence[Any], mode: str = "hash") -> Any:
    """The enum value the server picks for ``u`` from ``labels`` (structured output).

    ``mode="hash"``: chosen by a hash of ``u``. ``mode="text"``: the label that ``u``
    names first (as a whole word, case-insensitive), so a test can write the answer
    it wants into the row's text; a message naming none falls back to the hash.
    """
    if mode == "text":
        named = _named_label(u, labels)
        if named is not None:
            return named
    return labels[int(content_hash(u)[:8], 16) % len(labels)]


def _named_label(u: str, labels: Sequence[Any]) -> Any:
    """The label whose first whole-word occurrence in ``u`` comes earliest, or None."""
    best: tuple[int, Any] | None = None
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(str(label))}(?!\w)", u, re.IGNORECASE)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), label)
    return None if best is None else best[1]


def expected_json(u: str, schema: Mapping[str, Any], label_mode: str = "hash") -> Any:
    """The object the server returns for ``u`` under JSON schema ``schema``.

    Every enum property gets :func:`expected_label` ``(u, enum, label_mode)``; other values
    are derived from a hash of ``u`` and the property path, so they are deterministic but
    varied.
    """
    return _generate(u, schema, schema, "", label_mode)


def _path_int(u: str, path: str) -> int:
    """A deterministic integer for a (message, schema path) pair."""
    return int(hashlib.sha256(f"{u}\x00{path}".encode()).hexdigest()[:8], 16)


def _resolve_ref(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local ``$ref`` pointers (``#/$defs/X``), as pydantic-generated schemas use."""
    seen = 0
    while "$ref" in node and seen < 32:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            break
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
        seen += 1
    return node


def _pick_type(node: Mapping[str, Any]) -> str:
    """The JSON type to generate for a schema node (first non-null type, else inferred)."""
    typ = node.get("type")
    if isinstance(typ, list):
        non_null = [t for t in typ if t != "null"]
        typ = non_null[0] if non_null else "null"
    if typ is None:
        if "properties" in node:
            return "object"
        return "array" if "items" in node else "string"
    return str(typ)


def _bounds(node: Mapping[str, Any], step: float) -> tuple[float | None, float | None]:
    """Inclusive (low, high) bounds of a numeric schema; exclusive ones are moved by step."""
    lo = node.get("minimum")
    hi = node.get("maximum")
    if isinstance(node.get("exclusiveMinimum"), int | float):
        lo = node["exclusiveMinimum"] + step
    if isinstance(node.get("exclusiveMaximum"), int | float):
        hi = node["exclusiveMaximum"] - step
    return lo, hi


def _gen_integer(h: int, node: Mapping[str, Any]) -> int:
    """A deterministic integer within the node's bounds (0..99 when unbounded)."""
    lo, hi = _bounds(node, 1)
    if lo is not None and hi is not None:
        low, high = math.ceil(lo), math.floor(hi)
        return low + h % max(1, high - low + 1)
    if lo is not None:
        return math.ceil(lo) + h % 100
    if hi is not None:
        return math.floor(hi) - h % 100
    return h % 100


def _gen_number(h: int, node: Mapping[str, Any]) -> float:
    """A deterministic float within the node's bounds (0..99.99 when unbounded)."""
    lo, hi = _bounds(node, 0.01)
    if lo is not None and hi is not None:
        return lo + (hi - lo) * (h % 10001) / 10000
    if lo is not None:
        return lo + (h % 10000) / 100
    if hi is not None:
        return hi - (h % 10000) / 100
    return (h % 10000) / 100


def _generate(u: str, node: Mapping[str, Any], root: Mapping[str, Any], path: str, label_mode: str = "hash") -> Any:
    """Generate a deterministic value conforming to schema ``node``."""
    node = _resolve_ref(node, root)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return expected_label(u, node["enum"], label_mode)
    for key in ("anyOf", "oneOf", "allOf"):
        options = node.get(key)
        if options:
            # Prefer the first non-null alternative so Optional[X] yields an X.
            chosen = next((o for o in options if o.get("type") != "null"), options[0])
            return _generate(u, chosen, root, path, label_mode)
    typ = _pick_type(node)
    if typ == "object":
        props = node.get("properties") or {}
        return {name: _generate(u, sub, root, f"{path}/{name}", label_mode) for name, sub in props.items()}
    if typ == "array":
        n = max(2, int(node.get("minItems", 0)))
        n = min(n, int(node.get("maxItems", n)))
        items = node.get("items") or {"type": "string"}
        return [_generate(u, items, root, f"{path}/{i}", label_mode) for i in range(n)]
    h = _path_int(u, path)
    if typ == "integer":
        return _gen_integer(h, node)
    if typ == "number":
        return _gen_number(h, node)
    if typ == "boolean":
        return bool(h & 1)
    if typ == "null":
        return None
    word = _WORDS[h % len(_WORDS)]
    min_len = int(node.get("minLength", 0))
    if len(word) < min_len:
        word = (word * (min_len // len(word) + 1))[:min_len]
    if "maxLength" in node:
        word = word[: int(node["maxLength"])]
    return word


def max_per_window(arrivals: Sequence[float], window_s: float) -> int:
    """Max number of arrivals in any half-open window ``[t, t + window_s)``.

    Two pointers over the sorted times: ``a[i..j]`` fit in one window iff
    ``a[j] - a[i] < window_s``, and the best window always starts at an arrival.
    """
    times = sorted(arrivals)
    best = 0
    i = 0
    for j, t in enumerate(times):
        while t - times[i] >= window_s:
            i += 1
        best = max(best, j - i + 1)
    return best


def count_duplicates(by_content: Mapping[str, int]) -> int:
    """Number of extra billed completions: sum of ``count - 1`` over message hashes."""
    return sum(n - 1 for n in by_content.values() if n > 1)


def content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or OpenAI-style list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def last_user_content(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last ``user`` message ("" when there is none)."""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return content_text(msg.get("content"))
    return ""


# ------------------------------------------------------------------------------ tokenizers

_TEKKEN: Any = None
_TEKKEN_LOCK = threading.Lock()


def get_tekken() -> Any:
    """The Ministral (Tekken v3) tokenizer, loaded once (it takes 1-4 s)."""
    global _TEKKEN
    if _TEKKEN is None:
        with _TEKKEN_LOCK:
            if _TEKKEN is None:
                from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

                _TEKKEN = MistralTokenizer.v3(is_tekken=True)
    return _TEKKEN


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]], tokenizer: str) -> int:
    """Prompt tokens of a chat request under ``tokenizer`` ("words" or "tekken")."""
    if tokenizer == "tekken":
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest.from_openai(list(messages))
        return len(get_tekken().encode_chat_completion(request).tokens)
    return sum(len(content_text(m.get("content")).split()) + 3 for m in messages)


def fit_completion(reply: str, max_tokens: int | None, tokenizer: str) -> tuple[str, int, bool]:
    """Count the reply's tokens and truncate it to ``max_tokens``.

    Returns ``(reply, completion_tokens, truncated)``.
    """
    if tokenizer == "tekken":
        raw = get_tekken().instruct_tokenizer.tokenizer
        tokens = raw.encode(reply, bos=False, eos=False)
        if max_tokens is not None and len(tokens) > max_tokens:
            return raw.decode(tokens[:max_tokens]), max_tokens, True
        return reply, len(tokens), False
    words = reply.split()
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), max_tokens, True
    return reply, len(words), False


# ---------------------------------------------------------------------------- config/stats


@dataclass
class FakeConfig:
    """Run-time switches; plain attributes, safe to change while the server runs."""

    # Seconds to wait before answering (plus uniform 0..jitter); not applied to 429s
    # from the rate limiter, which real providers send straight away.
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    # Server-side limit: token bucket of capacity max(rps, 1) refilled at rps per second.
    rps: float | None = None
    # Retry-After header value for 429 (and scripted 503) answers.
    retry_after: str = "1"
    # With rps: also state the limit on its 429s as OpenRouter does (X-RateLimit-Limit per
    # minute, -Remaining 0, -Reset in epoch milliseconds); otherwise only Retry-After.
    rate_limit_headers: bool = False
    # State OpenAI-style limits on every answer: x-ratelimit-limit-requests (per minute) and
    # x-ratelimit-limit-tokens / -remaining-tokens (per minute; stated, not enforced).
    stated_rpm: int | None = None
    stated_tpm: int | None = None
    # GET /v1/key's data.rate_limit (OpenRouter shape; it now answers requests -1).
    key_rate_limit: JSON = field(default_factory=lambda: {"requests": -1, "interval": "10s"})
    # {substring of the last user message: [behaviour, ...]}: the n-th matching request
    # gets the n-th behaviour, then "ok".  Lists are read, never mutated; assigning a new
    # list to a key restarts it.  Behaviours: "ok", "NNN" or "NNN:message" (HTTP error
    # with OpenRouter's body), "echo_auth" / "echo_auth:NNN" (an answer quoting the
    # request's Authorization header: an error with status NNN, default 400, or with
    # 200 a billed completion), "retry_after_date", "hang", "drop", "error200",
    # "finish_error", "invalid_json", "wrong_label", "empty", "null_content", "no_choices",
    # "in_flight_402", "weight_402", "budget_403" (OpenRouter's credit-limit bodies, see
    # tests/fakes/billing.py). A behaviour ending in "+cost" ("null_content+cost",
    # "no_choices+cost", "error200+cost", "500+cost", "empty+cost", ...) answers the same way
    # but bills the request (prompt plus a full max_tokens of hidden reasoning) and reports it
    # in usage (as a reasoning model that spent max_tokens thinking does); stats count it as a
    # billed completion.
    script: dict[str, list[str]] = field(default_factory=dict)
    # Fraction of unscripted requests answered with fail_kind (a behaviour), seeded.
    fail_rate: float = 0.0
    fail_kind: str = "500"
    seed: int | None = 0
    # False mimics Mistral / llama.cpp: usage without cost (stats still add it up).
    include_cost: bool = True
    # False: no usage object at all (some OpenAI-compatible servers); stats still add it up.
    include_usage: bool = True
    # True: usage.cost as a JSON string ("0.0000021"), as some proxies send it.
    cost_as_string: bool | str = False  # a str: a format for the figure, e.g. " {} " (spaces around it)
    # The response's "provider" key; None omits it.
    provider_name: str | None = "FakeProvider"
    price_per_token: float = DEFAULT_PRICE_PER_TOKEN
    # "words" (fast, approximate) or "tekken" (exact Ministral counts, mistral-common).
    tokenizer: str = "words"
    # Reject OpenAI's json_schema response_format with llama-cpp-python's 500.
    llamacpp_mode: bool = False
    # Keep the last max_bodies request bodies and headers (read at reset/construction).
    record_bodies: bool = True
    max_bodies: int = 5000
    # When set, requests must carry "Authorization: Bearer <api_key>" or get a 401.
    api_key: str | None = None
    # Count requests per client process (found from the connection's port with psutil;
    # loopback clients of the same user only): shows which processes sent the requests.
    record_client_pids: bool = False
    # The GET /v1/models listing.
    models: list[JSON] = field(default_factory=default_models)
    # How enum values (labels) are chosen: "hash" of the user message, or "text": the
    # label the message names (see expected_label), for tests with known answers.
    label_mode: str = "hash"
    # Prompt caching as providers bill it in 2026: the leading tokens a request shares with a
    # request that already FINISHED are billed at cache_read_factor x the price and reported as
    # usage.prompt_tokens_details.cached_tokens; cacheable from cache_min_tokens on, in
    # cache_step-token steps (OpenAI: 1024 and 128). See tests/fakes/billing.py.
    prompt_caching: bool = False
    cache_read_factor: float = 0.1
    cache_min_tokens: int = 0
    cache_step: int = 1
    # OpenRouter's in-flight spending budget in USD: each running request holds its worst case,
    # (prompt + max_tokens) x price; past it, 402 in_flight_budget_exhausted with Retry-After
    # (in_flight_retry_after), and 402 weight_exceeds_budget for a request that alone passes it.
    in_flight_budget_usd: float | None = None
    in_flight_retry_after: str = "1"


class _Stats:
    """Counters mutated on the server thread; snapshots are taken under a lock."""

    def __init__(self, max_bodies: int) -> None:
        self.requests = 0
        self.status_counts: dict[int, int] = {}
        self.ok = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0
        self.arrivals: list[float] = []
        self.completed: list[float] = []  # when each billed completion was answered
        self.by_content: dict[str, int] = {}
        self.bodies: deque[JSON] = deque(maxlen=max_bodies)
        self.response_formats: dict[str, int] = {}
        self.behaviours: dict[str, int] = {}
        self.rate_limited = 0
        self.hung = 0
        self.dropped = 0
        self.cancelled = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.client_pids: dict[int, int] = {}
        self.cached_tokens = 0  # prompt tokens billed at the cached price
        self.cached_per_completion: list[int] = []  # cached tokens of each billed completion, in order
        self.prompt_cost = 0.0  # what the prompts of billed completions cost (cached part included)
        self.in_flight_refused = 0  # 402 in_flight_budget_exhausted answers
        self.weight_refused = 0  # 402 weight_exceeds_budget answers

    def snapshot(self, full: bool = True) -> JSON:
        """A plain-dict copy; ``full=False`` omits the bulky ``bodies`` and ``arrivals``."""
        out: JSON = {
            "requests": self.requests,
            "status_counts": dict(self.status_counts),
            "ok": self.ok,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "by_content": dict(self.by_content),
            "response_formats": dict(self.response_formats),
            "behaviours": dict(self.behaviours),
            "rate_limited": self.rate_limited,
            "hung": self.hung,
            "dropped": self.dropped,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "client_pids": dict(self.client_pids),
            "cached_tokens": self.cached_tokens,
            "cached_per_completion": list(self.cached_per_completion),
            "prompt_cost": self.prompt_cost,
            "in_flight_refused": self.in_flight_refused,
            "weight_refused": self.weight_refused,
        }
        if full:
            out["arrivals"] = list(self.arrivals)
            out["completed"] = list(self.completed)
            out["bodies"] = list(self.bodies)
        return out


class _Reply(Exception):
    """Raised inside request handling to answer immediately with a JSON error."""

    def __init__(self, status: int, body: JSON, headers: Mapping[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def error_body(status: int, message: str | None = None) -> JSON:
    """OpenRouter's error body: ``{"error": {"code": N, "message": ...}}``."""
    if message is None:
        message = _ERROR_MESSAGES.get(status) or _status_phrase(status)
    return {"error": {"code": status, "message": message}}


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _json_response(status: int, body: JSON, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response serialised once, without aiohttp's json_response overhead."""
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


# ---------------------------------------------------------------------------------- server


class FakeServer:
    """A configurable fake chat-completions provider.

    ``config`` (a :class:`FakeConfig`) may be changed at any time, from any thread; the
    server reads it on every request.  Keyword arguments set initial config values.
    """

    def __init__(self, config: FakeConfig | None = None, **overrides: Any) -> None:
        self.config = config or FakeConfig()
        for name, value in overrides.items():
            self._set_config(name, value)
        self.base_url: str | None = None
        self.port: int | None = None
        self._lock = threading.Lock()
        self._stats = _Stats(self.config.max_bodies)
        self._t0 = time.monotonic()
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        # Per-key script position, remembered together with the list it indexes so that
        # assigning a new list (or a new script) restarts that key at its first behaviour.
        self._script_pos: dict[str, tuple[list[str], int]] = {}
        self._rng = random.Random(self.config.seed)
        self._rng_seed = self.config.seed
        self._bucket_rps: float | None = None
        self._bucket_tokens = 0.0
        self._bucket_t = 0.0
        # Connections of requests currently hanging, so stopping can cut them off.
        self._hanging: set[asyncio.Transport] = set()
        self._pid_by_port: dict[int, int] = {}
        self._prefix_cache: PrefixCache | None = None
        self._in_flight: InFlightBudget | None = None
        self._arrivals: dict[int, tuple[list[Any], int]] = {}  # prompt tokens and cached count at arrival

    # -- public helpers -------------------------------------------------------------------

    def stats(self) -> JSON:
        """Snapshot of the statistics as a plain dict.

        Keys: ``requests`` (chat POSTs received), ``status_counts`` ({int status: n} of
        answers sent; hung/dropped requests are not in it), ``ok`` (billed 200
        completions, including "invalid_json"/"wrong_label"/"empty" ones),
        ``prompt_tokens``, ``completion_tokens``, ``cost`` (sums over billed
        completions), ``arrivals`` (seconds since start, monotonic), ``completed`` (when
        each billed completion was answered, same clock), ``by_content``
        ({sha256(u)[:16]: billed completions}), ``bodies`` (``{"t", "path", "body",
        "headers"}``, headers a case-insensitive ``CIMultiDict``), ``response_formats``
        ({type: n}), ``behaviours`` ({non-ok behaviour: n}), ``rate_limited``, ``hung``,
        ``dropped``, ``cancelled`` (client gave up before the answer; not billed),
        ``in_flight``, ``max_in_flight``, ``client_pids`` ({pid: requests}, with
        ``record_client_pids``; -1 for a client not found).
        """
        with self._lock:
            return self._stats.snapshot(full=True)

    def duplicates(self) -> int:
        """Completions billed more than once for the same user message."""
        with self._lock:
            return count_duplicates(self._stats.by_content)

    def reset(self) -> None:
        """Clear the statistics, the script and its positions, the rate-limit bucket."""
        with self._lock:
            self._stats = _Stats(self.config.max_bodies)
            self.config.script = {}
            self._script_pos.clear()
            self._pid_by_port.clear()
            self._bucket_rps = None
            self._rng = random.Random(self.config.seed)
            self._rng_seed = self.config.seed
            self._prefix_cache = None
            self._in_flight = None

    def _set_config(self, name: str, value: Any) -> None:
        if name not in {f.name for f in dataclasses.fields(FakeConfig)}:
            raise AttributeError(f"unknown FakeConfig attribute {name!r}")
        setattr(self.config, name, value)

    # -- app ------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (routes under ``/v1`` and, as an alias, ``/api/v1``)."""
        app = web.Application(client_max_size=64 * 1024**2)
        for prefix in ("/v1", "/api/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self._handle_chat)
            app.router.add_get(f"{prefix}/models", self._handle_models)
            app.router.add_get(f"{prefix}/key", self._handle_key)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/reset", self._handle_reset)
        app.router.add_post("/control", self._handle_control)
        return app

    async def _handle_models(self, request: web.Request) -> web.Response:
        return _json_response(200, {"data": self.config.models})

    async def _handle_key(self, request: web.Request) -> web.Response:
        """OpenRouter's ``GET /key``: the key's credit and (deprecated) rate limit."""
        try:
            self._check_auth(request)
        except _Reply as reply:
            return _json_response(reply.status, reply.body, reply.headers)
        data = {"label": "sk-or-v1-fake", "limit": None, "usage": 0.0, "rate_limit": self.config.key_rate_limit}
        return _json_response(200, {"data": data})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        full = request.query.get("full", "0") not in ("0", "", "false")
        with self._lock:
            snap = self._stats.snapshot(full=full)
        if full:
            snap["bodies"] = [{**b, "headers": dict(b["headers"])} for b in snap["bodies"]]
        snap["duplicates"] = count_duplicates(snap["by_content"])
        return web.Response(text=json.dumps(snap), content_type="application/json")

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(200, {"ok": True})

    async def _handle_control(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("body must be a JSON object")
            for name, value in changes.items():
                self._set_config(name, value)
        except (ValueError, TypeError, AttributeError) as exc:
            return _json_response(400, error_body(400, str(exc)))
        return _json_response(200, dataclasses.asdict(self.config))

    # -- chat completions -----------------------------------------------------------------

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        """Entry point: bookkeeping around :meth:`_answer_chat`."""
        st = self._stats
        with self._lock:
            st.requests += 1
            st.arrivals.append(time.monotonic() - self._t0)
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        # ``trace`` tells this wrapper which behaviour was chosen, e.g. to tell a
        # deliberate hang from a client that gave up during the latency sleep.
        trace: dict[str, str] = {}
        if self.config.record_client_pids:
            await self._record_client_pid(request)
        try:
            return await self._answer_chat(request, trace)
        except _Reply as reply:
            self._count_status(reply.status)
            return _json_response(reply.status, reply.body, reply.headers)
        except asyncio.CancelledError:
            # The client went away before we answered (aiohttp cancels the handler).
            # Hang and drop end this way by design; they have their own counters.
            if trace.get("behaviour") not in ("hang", "drop"):
                with self._lock:
                    self._stats.cancelled += 1
            raise
        finally:
            with self._lock:
                st.in_flight -= 1

    async def _record_client_pid(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer:
            return
        port = int(peer[1])
        pid = self._pid_by_port.get(port)
        if pid is None:
            # Once per connection (keep-alive reuses it): scanning sockets takes milliseconds.
            pid = await asyncio.get_running_loop().run_in_executor(None, self._pid_of_client_port, port)
            self._pid_by_port[port] = pid
        with self._lock:
            pids = self._stats.client_pids
            pids[pid] = pids.get(pid, 0) + 1

    def _pid_of_client_port(self, port: int) -> int:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == self.port:
                return conn.pid or -1
        return -1

    def _count_status(self, status: int) -> None:
        with self._lock:
            counts = self._stats.status_counts
            counts[status] = counts.get(status, 0) + 1

    async def _answer_chat(self, request: web.Request, trace: dict[str, str]) -> web.StreamResponse:
        body = await self._parse_body(request)
        self._check_auth(request)
        self._check_rate_limit()
        messages = body["messages"]
        u = last_user_content(messages)
        fmt_type, schema = self._parse_response_format(body.get("response_format"))
        max_tokens = self._parse_max_tokens(body)
        if self.config.prompt_caching:
            # Cached is what FINISHED requests had written when this one arrived.
            tokens = self._prompt_token_list(messages)
            self._arrivals[id(body)] = (tokens, self._cache().cached(tokens))
        try:
            held = await self._hold_in_flight(messages, max_tokens)
            try:
                return await self._answer_held(request, trace, body, u, fmt_type, schema, max_tokens)
            finally:
                if held and self._in_flight is not None:
                    self._in_flight.release(held)
        finally:
            self._arrivals.pop(id(body), None)

    async def _hold_in_flight(self, messages: list[JSON], max_tokens: int | None) -> float:
        """Hold this request's worst case against the in-flight budget (0: none), or refuse it with a 402."""
        budget = self.config.in_flight_budget_usd
        if budget is None:
            return 0.0
        with self._lock:
            if self._in_flight is None or self._in_flight.budget_usd != budget:
                self._in_flight = InFlightBudget(budget)
            tracker = self._in_flight
        worst = (await self._prompt_tokens(messages) + (max_tokens or 4096)) * self.config.price_per_token
        refusal = tracker.hold(worst)
        if refusal is None:
            return worst
        with self._lock:
            if refusal is Refusal.WEIGHT:
                self._stats.weight_refused += 1
            else:
                self._stats.in_flight_refused += 1
        if refusal is Refusal.WEIGHT:
            raise _Reply(402, weight_body())
        raise _Reply(402, in_flight_body(), {"Retry-After": str(self.config.in_flight_retry_after)})

    async def _answer_held(
        self,
        request: web.Request,
        trace: dict[str, str],
        body: JSON,
        u: str,
        fmt_type: str | None,
        schema: JSON | None,
        max_tokens: int | None,
    ) -> web.StreamResponse:
        cfg = self.config
        behaviour = self._next_behaviour(u)
        trace["behaviour"] = behaviour
        if cfg.latency_s > 0 or cfg.latency_jitter_s > 0:
            delay = cfg.latency_s + random.uniform(0, cfg.latency_jitter_s)
            await asyncio.sleep(delay)
        if behaviour == "ok":
            content = self._structured_reply(u, fmt_type, schema, cfg.label_mode)
            return await self._complete(body, u, content, max_tokens)
        with self._lock:
            st = self._stats
            st.behaviours[behaviour] = st.behaviours.get(behaviour, 0) + 1
        return await self._misbehave(request, behaviour, body, u, max_tokens)

    async def _parse_body(self, request: web.Request) -> JSON:
        """Parse and minimally validate the JSON body; record it when configured."""
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise _Reply(400, error_body(400, f"Invalid JSON body: {exc}")) from None
        if self.config.record_bodies:
            record = {
                "t": time.monotonic() - self._t0,
                "path": request.path,
                "body": body,
                "headers": CIMultiDict(request.headers),
            }
            with self._lock:
                self._stats.bodies.append(record)
        if not isinstance(body, dict):
            raise _Reply(400, error_body(400, "Request body must be a JSON object"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reply(400, error_body(400, "messages must be a non-empty list"))
        if not all(isinstance(m, dict) for m in messages):
            raise _Reply(400, error_body(400, "each message must be an object"))
        return body

    def _check_auth(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            raise _Reply(401, error_body(401))

    def _check_rate_limit(self) -> None:
        """Token bucket: capacity ``rps`` (a one-second burst), refilled at ``rps``/s."""
        rps = self.config.rps
        if not rps:
            return
        now = time.monotonic()
        capacity = max(float(rps), 1.0)
        with self._lock:
            if rps != self._bucket_rps:
                # New (or changed) limit: start with a full bucket.
                self._bucket_rps = rps
                self._bucket_tokens = capacity
            else:
                refill = (now - self._bucket_t) * rps
                self._bucket_tokens = min(capacity, self._bucket_tokens + refill)
            self._bucket_t = now
            if self._bucket_tokens >= 1.0:
                self._bucket_tokens -= 1.0
                return
            self._stats.rate_limited += 1
            wait_s = (1.0 - self._bucket_tokens) / rps
        headers = {"Retry-After": str(self.config.retry_after), **self._stated_headers()}
        if self.config.rate_limit_headers:
            headers["X-RateLimit-Limit"] = str(round(rps * 60))
            headers["X-RateLimit-Remaining"] = "0"
            headers["X-RateLimit-Reset"] = str(int((time.time() + wait_s) * 1000))
        raise _Reply(429, error_body(429), headers)

    def _stated_headers(self) -> dict[str, str]:
        """OpenAI-style limit headers (``stated_rpm`` / ``stated_tpm``), sent on every answer."""
        headers = {}
        if self.config.stated_rpm:
            headers["x-ratelimit-limit-requests"] = str(self.config.stated_rpm)
        if self.config.stated_tpm:
            headers["x-ratelimit-limit-tokens"] = str(self.config.stated_tpm)
            headers["x-ratelimit-remaining-tokens"] = str(self.config.stated_tpm)
        return headers

    def _parse_max_tokens(self, body: JSON) -> int | None:
        value = body.get("max_tokens", body.get("max_completion_tokens"))
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _Reply(400, error_body(400, "max_tokens must be a positive integer"))
        return value

    def _parse_response_format(self, fmt: Any) -> tuple[str | None, JSON | None]:
        """Return ``(type, schema)`` of the request's response_format, validating it."""
        if fmt is None:
            return None, None
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise _Reply(400, error_body(400, "response_format must be an object with a type"))
        fmt_type = fmt["type"]
        with self._lock:
            seen = self._stats.response_formats
            seen[fmt_type] = seen.get(fmt_type, 0) + 1
        if fmt_type == "text":
            return fmt_type, None
        if fmt_type == "json_schema":
            if self.config.llamacpp_mode:
                # llama-cpp-python's shape: an internal error listing the allowed types.
                body = {
                    "error": {
                        "message": LLAMACPP_SCHEMA_ERROR,
                        "type": "internal_server_error",
                        "param": None,
                        "code": None,
                    }
                }
                raise _Reply(500, body)
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise _Reply(400, error_body(400, "response_format.json_schema is required"))
            return fmt_type, self._validate_schema(spec.get("schema"))
        if fmt_type == "json_object":
            schema = fmt.get("schema")
            return fmt_type, None if schema is None else self._validate_schema(schema)
        raise _Reply(400, error_body(400, f"Unsupported response_format type {fmt_type!r}"))

    @staticmethod
    def _validate_schema(schema: Any) -> JSON:
        if (
            not isinstance(schema, dict)
            or schema.get("type") != "object"
            or not isinstance(schema.get("properties"), dict)
        ):
            message = "Invalid schema: expected a JSON schema with type 'object' and properties"
            raise _Reply(400, error_body(400, message))
        return schema

    @staticmethod
    def _structured_reply(u: str, fmt_type: str | None, schema: JSON | None, label_mode: str = "hash") -> str:
        if schema is not None:
            return json.dumps(expected_json(u, schema, label_mode))
        if fmt_type == "json_object":
            # JSON mode without a schema: any JSON object will do.
            return json.dumps({"reply": expected_reply(u)})
        return expected_reply(u)

    def _next_behaviour(self, u: str) -> str:
        """Scripted behaviour for ``u`` if any is pending, else a random failure, else ok."""
        cfg = self.config
        script = cfg.script
        if script:
            with self._lock:
                for key, steps in list(script.items()):  # the test thread may edit it
                    if key not in u:
                        continue
                    held, pos = self._script_pos.get(key, (steps, 0))
                    if held is not steps:
                        pos = 0
                    self._script_pos[key] = (steps, pos + 1)
                    if pos < len(steps):
                        return str(steps[pos])
                    return "ok"
        if cfg.fail_rate > 0:
            with self._lock:
                if self._rng_seed != cfg.seed:
                    self._rng = random.Random(cfg.seed)
                    self._rng_seed = cfg.seed
                if self._rng.random() < cfg.fail_rate:
                    return cfg.fail_kind
        return "ok"

    async def _prompt_tokens(self, messages: list[JSON]) -> int:
        if self.config.tokenizer == "tekken" and _TEKKEN is None:
            # Load off the event loop so other requests keep flowing meanwhile.
            await asyncio.get_running_loop().run_in_executor(None, get_tekken)
        from mistral_common.exceptions import MistralCommonException

        try:
            return count_prompt_tokens(messages, self.config.tokenizer)
        except (MistralCommonException, ValueError, TypeError, KeyError) as exc:
            # mistral-common rejects malformed conversations (pydantic errors are ValueErrors).
            raise _Reply(400, error_body(400, f"Invalid messages: {exc}")) from None

    def _cache(self) -> PrefixCache:
        cfg = self.config
        with self._lock:
            cache = self._prefix_cache
            if cache is None or (cache.min_tokens, cache.step) != (cfg.cache_min_tokens, max(1, cfg.cache_step)):
                cache = self._prefix_cache = PrefixCache(cfg.cache_min_tokens, cfg.cache_step)
            return cache

    def _prompt_token_list(self, messages: list[JSON]) -> list[Any]:
        """The prompt's tokens, as many as ``count_prompt_tokens`` counts (for prefix caching)."""
        if self.config.tokenizer == "tekken":
            from mistral_common.protocol.instruct.request import ChatCompletionRequest

            request = ChatCompletionRequest.from_openai(list(messages))
            return list(get_tekken().encode_chat_completion(request).tokens)
        return word_tokens(messages)

    async def _complete(
        self,
        body: JSON,
        u: str,
        content: str,
        max_tokens: int | None,
        finish_reason: str = "stop",
    ) -> web.Response:
        """Answer a billed 200 completion and account for it."""
        cfg = self.config
        prompt = await self._prompt_tokens(body["messages"])
        cache, tokens, cached = None, [], 0
        if cfg.prompt_caching:
            cache = self._cache()
            tokens, cached = self._arrivals.pop(id(body), None) or (self._prompt_token_list(body["messages"]), 0)
        content, completion, truncated = fit_completion(content, max_tokens, cfg.tokenizer)
        if truncated:
            finish_reason = "length"
        prompt_cost = ((prompt - cached) + cached * cfg.cache_read_factor) * cfg.price_per_token
        cost = prompt_cost + completion * cfg.price_per_token
        usage: JSON = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if cfg.prompt_caching:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if cfg.include_cost:
            usage["cost"] = _cost_field(cost, cfg.cost_as_string)
        payload = self._envelope(body, content, finish_reason, usage)
        h16 = content_hash(u)[:16]
        if cache is not None:
            cache.finished(tokens)  # the cache is written when the request finishes
        with self._lock:
            st = self._stats
            st.cached_tokens += cached
            st.cached_per_completion.append(cached)
            st.prompt_cost += prompt_cost
            st.ok += 1
            st.completed.append(time.monotonic() - self._t0)
            st.prompt_tokens += prompt
            st.completion_tokens += completion
            st.cost += cost
            st.by_content[h16] = st.by_content.get(h16, 0) + 1
            st.status_counts[200] = st.status_counts.get(200, 0) + 1
        return _json_response(200, payload, self._stated_headers() or None)

    def _envelope(self, body: JSON, content: str, finish_reason: str, usage: JSON) -> JSON:
        """The OpenAI/OpenRouter success shape around one choice."""
        payload: JSON = {
            "id": f"gen-{self._id_prefix}{next(self._ids):x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        if self.config.provider_name is not None:
            payload["provider"] = self.config.provider_name
        payload["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "native_finish_reason": finish_reason,
            }
        ]
        if self.config.include_usage:
            payload["usage"] = usage
        return payload

    async def _misbehave(
        self,
        request: web.Request,
        behaviour: str,
        body: JSON,
        u: str,
        max_tokens: int | None,
    ) -> web.StreamResponse:
        """Answer with a scripted/random failure behaviour."""
        if behaviour.endswith("+cost"):
            return await self._billed_failure(behaviour.removesuffix("+cost"), body, u, max_tokens)
        if behaviour in _CONTENT_BEHAVIOURS:
            return await self._complete(body, u, _CONTENT_BEHAVIOURS[behaviour], max_tokens)
        if behaviour == "finish_error":
            # Not billed: zero usage so client-side sums match the server's.
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            if self.config.include_cost:
                usage["cost"] = 0.0
            self._count_status(200)
            return _json_response(200, self._envelope(body, "", "error", usage))
        if behaviour.startswith("echo_auth"):
            # A careless server or proxy quoting the request's credentials back.
            status = int(behaviour.partition(":")[2] or 400)
            echoed = request.headers.get("Authorization", "")
            if status == 200:
                return await self._complete(body, u, f"as requested, your header was Authorization: {echoed}", None)
            message = f"Invalid request. Headers received: Authorization: {echoed}; key={echoed.split()[-1]}"
            raise _Reply(status, error_body(status, message))
        if behaviour == "in_flight_402":
            raise _Reply(402, in_flight_body(), {"Retry-After": str(self.config.in_flight_retry_after)})
        if behaviour == "weight_402":
            raise _Reply(402, weight_body())
        if behaviour == "budget_403":
            resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            raise _Reply(403, budget_403_body(resets))
        if behaviour == "error200":
            raise _Reply(200, error_body(502, "Provider returned error"))
        if behaviour == "null_content":
            # A 200 whose message has no content at all (and no tool calls); not billed.
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            self._count_status(200)
            return _json_response(200, self._envelope(body, None, "stop", usage))  # type: ignore[arg-type]
        if behaviour == "no_choices":
            self._count_status(200)
            payload = self._envelope(body, "", "stop", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            payload["choices"] = []
            return _json_response(200, payload)
        if behaviour == "retry_after_date":
            when = email.utils.formatdate(math.ceil(time.time()) + 1, usegmt=True)
            raise _Reply(429, error_body(429), {"Retry-After": when})
        if behaviour == "hang":
            return await self._hang(request)
        if behaviour == "drop":
            return await self._drop(request)
        status_text, _, message = behaviour.partition(":")
        if status_text.isdigit():
            status = int(status_text)
            headers = {}
            if status in _RETRY_AFTER_STATUSES:
                headers["Retry-After"] = str(self.config.retry_after)
            raise _Reply(status, error_body(status, message or None), headers)
        raise _Reply(500, error_body(500, f"fakeserver: unknown behaviour {behaviour!r}"))

    async def _billed_failure(self, kind: str, body: JSON, u: str, max_tokens: int | None) -> web.Response:
        """A reply that carries no usable answer but was billed, with usage.cost saying so."""
        cfg = self.config
        prompt = await self._prompt_tokens(body["messages"])
        completion = max_tokens or 16
        cost = (prompt + completion) * cfg.price_per_token
        usage: JSON = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if cfg.include_cost:
            usage["cost"] = _cost_field(cost, cfg.cost_as_string)
        status = 200
        if kind == "null_content":
            payload = self._envelope(body, None, "length", usage)  # type: ignore[arg-type]
        elif kind == "empty":
            payload = self._envelope(body, "", "length", usage)
        elif kind == "no_choices":
            payload = self._envelope(body, "", "length", usage)
            del payload["choices"]
        elif kind == "reasoning":  # every max_token spent thinking: reasoning text, no content
            payload = self._envelope(body, None, "length", usage)  # type: ignore[arg-type]
            payload["choices"][0]["message"]["reasoning"] = "Let me think about this step by step. " * 4
        elif kind == "empty_choice":
            payload = self._envelope(body, "", "length", usage)
            payload["choices"] = [{}]
        elif kind == "null_message":
            payload = self._envelope(body, "", "length", usage)
            payload["choices"] = [{"index": 0, "message": None, "finish_reason": "length"}]
        elif kind == "chunk":  # a streaming chunk's shape for a request that did not ask to stream
            payload = self._envelope(body, "", "length", usage)
            payload["object"] = "chat.completion.chunk"
            payload["choices"] = [
                {"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": "length"}
            ]
        elif kind == "error200":
            payload = {**error_body(502, "Provider returned error"), "usage": usage}
        elif kind.isdigit():
            status = int(kind)
            payload = {**error_body(status), "usage": usage}
        else:
            raise _Reply(500, error_body(500, f"fakeserver: unknown behaviour {kind!r}+cost"))
        h16 = content_hash(u)[:16]
        with self._lock:
            st = self._stats
            st.ok += 1
            st.prompt_tokens += prompt
            st.completion_tokens += completion
            st.cost += cost
            st.by_content[h16] = st.by_content.get(h16, 0) + 1
            st.status_counts[status] = st.status_counts.get(status, 0) + 1
        return _json_response(status, payload)

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Never answer; return once the client has gone away."""
        with self._lock:
            self._stats.hung += 1
        transport = request.transport
        if transport is None:
            return web.Response(status=499)
        self._hanging.add(transport)
        try:
            # Our runner cancels us on disconnect; polling covers apps run by other runners
            # (aiohttp offers no event to await for "the client went away").
            while True:
                if transport.is_closing():
                    break
                await asyncio.sleep(0.05)
        finally:
            self._hanging.discard(transport)
        return web.Response(status=499)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the TCP connection without sending anything."""
        with self._lock:
            self._stats.dropped += 1
        if request.transport is not None:
            request.transport.abort()
        # Writing this response fails quietly: aiohttp treats it as a premature disconnect.
        await asyncio.sleep(0)
        return web.Response(status=499)

    # -- running --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
        """Start listening on the current loop; return the runner for :meth:`stop`.

        Sets :attr:`port` and :attr:`base_url`.
        """
        if self.config.tokenizer == "tekken":
            await asyncio.get_running_loop().run_in_executor(None, get_tekken)
        # Bind ourselves so port 0 yields a known free port without private attributes.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # access_log=None keeps the hot path lean; handler_cancellation ends "hang" and
        # latency sleeps as soon as the client disconnects; a short shutdown_timeout keeps
        # stopping fast even with hung requests.
        runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            await runner.setup()
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self._t0 = time.monotonic()
        return runner

    async def stop(self, runner: web.AppRunner) -> None:
        """Stop a runner from :meth:`start`, cutting off hung requests right away."""
        for transport in list(self._hanging):
            transport.abort()
        await runner.cleanup()

    async def serve(
        self,
        stop: asyncio.Event,
        host: str = "127.0.0.1",
        port: int = 0,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        """Serve until ``stop`` is set; ``on_ready(base_url)`` is called once listening."""
        runner = await self.start(host, port)
        try:
            if on_ready is not None and self.base_url is not None:
                on_ready(self.base_url)
            await stop.wait()
        finally:
            await self.stop(runner)

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[FakeServer]:
        """Run the server in a background thread with its own event loop; yield self.

        Works from sync and async tests alike: the caller's loop (if any) is never used.
        """
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fakeserver", daemon=True)
        thread.start()
        try:
            # Startup errors (e.g. port in use) surface here, in the caller's thread.
            runner = asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(30)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.stop(runner), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


# ------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.server",
        description="Fake OpenAI/OpenRouter chat-completions server (for benchmarks).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rps", type=float, default=None, help="server-side rate limit")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra uniform 0..S latency")
    parser.add_argument("--retry-after", default="1", help="Retry-After value for 429/503")
    parser.add_argument(
        "--rate-limit-headers", action="store_true", help="state X-RateLimit-* on 429s (OpenRouter style)"
    )
    parser.add_argument("--tokenizer", choices=("words", "tekken"), default="words")
    parser.add_argument("--no-cost", action="store_true", help="omit usage.cost")
    parser.add_argument("--provider-name", default="FakeProvider")
    parser.add_argument("--no-provider", action="store_true", help="omit the provider key")
    parser.add_argument("--price-per-token", type=float, default=DEFAULT_PRICE_PER_TOKEN)
    parser.add_argument("--llamacpp", action="store_true", help="reject json_schema like llama-cpp-python")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-kind", default="500")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record-bodies", action="store_true")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FakeConfig:
    """Build a :class:`FakeConfig` from parsed CLI arguments."""
    return FakeConfig(
        latency_s=args.latency,
        latency_jitter_s=args.jitter,
        rps=args.rps,
        retry_after=args.retry_after,
        rate_limit_headers=args.rate_limit_headers,
        tokenizer=args.tokenizer,
        include_cost=not args.no_cost,
        provider_name=None if args.no_provider else args.provider_name,
        price_per_token=args.price_per_token,
        llamacpp_mode=args.llamacpp,
        fail_rate=args.fail_rate,
        fail_kind=args.fail_kind,
        seed=args.seed,
        record_bodies=not args.no_record_bodies,
        api_key=args.api_key,
    )


async def _main_async(args: argparse.Namespace) -> None:
    server = FakeServer(config_from_args(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def announce(url: str) -> None:
        print(f"READY {url}", flush=True)

    await server.serve(stop, args.host, args.port, on_ready=announce)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serve in the foreground until SIGTERM/SIGINT, then return 0."""
    asyncio.run(_main_async(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
