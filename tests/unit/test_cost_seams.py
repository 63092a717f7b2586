"""Pure seams of cost truth: usage fields, credit-limit errors, caching rules, prefixes, warm-up, in-flight window."""

from __future__ import annotations

import asyncio
import random

import pytest

from pipeline.engine import caching
from pipeline.engine.caching import CacheRule, SharedPrefixes, cache_rule
from pipeline.engine.limits.inflight import InFlightWindow
from pipeline.engine.tokens import counter_for, encode_text
from pipeline.engine.warmup import MAX_WARM, PrefixWarmer, prefix_key
from pipeline.providers.credit import LimitKind, credit_limit
from pipeline.providers.usage import Usage, parse_cost, parse_usage
from tests.fakes.billing import PrefixCache, budget_403_body, in_flight_body, weight_body, word_tokens

# ---------------------------------------------------------------------------- usage


def test_openai_and_openrouter_cached_tokens():
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
        "cost": 0.00012,
    }
    assert parse_usage(usage) == Usage(1200, 10, 1024, 0, 0.00012)


def test_anthropic_style_usage_counts_the_cached_parts_into_the_prompt():
    usage = {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 1000}
    usage["cache_creation_input_tokens"] = 300
    assert parse_usage(usage) == Usage(1320, 5, 1000, 300, None)


def test_anthropic_fields_beside_prompt_tokens_are_parts_of_it():
    usage = {"prompt_tokens": 1320, "completion_tokens": 5, "cache_read_input_tokens": 1000}
    assert parse_usage(usage).prompt_tokens == 1320 and parse_usage(usage).cached_tokens == 1000


def test_deepseek_cache_hits_and_malformed_values():
    assert parse_usage({"prompt_tokens": 100, "prompt_cache_hit_tokens": 64}).cached_tokens == 64
    bad = parse_usage({"prompt_tokens": "12", "completion_tokens": -1, "prompt_tokens_details": [], "cost": "x"})
    assert bad == Usage()
    assert parse_usage(None) == Usage()
    assert parse_usage({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}}).cached_tokens == 10


def test_costs_as_strings_and_nonsense():
    assert parse_cost("0.0012") == 0.0012 and parse_cost(3) == 3.0
    for value in (True, None, "nan", float("inf"), -1, {"usd": 1}):
        assert parse_cost(value) is None


# ---------------------------------------------------------------------------- credit limits


def test_in_flight_weight_and_budget_bodies():
    assert credit_limit(402, in_flight_body()).kind is LimitKind.IN_FLIGHT
    assert credit_limit(402, weight_body()).kind is LimitKind.WEIGHT
    budget = credit_limit(403, budget_403_body("2026-12-05T00:00:00Z"))
    assert budget.kind is LimitKind.BUDGET and budget.resets_at == "2026-12-05T00:00:00Z"
    assert "2026-12-05T00:00:00Z" in budget.advice()
    assert "max_tokens 64" in credit_limit(402, weight_body()).advice(64)


def test_the_code_string_is_found_in_the_message_too():
    body = {"error": {"code": 402, "message": "Refused: in_flight_budget_exhausted; retry later"}}
    assert credit_limit(402, body).kind is LimitKind.IN_FLIGHT


def test_other_402_and_403_are_not_credit_limits():
    assert credit_limit(402, {"error": {"code": 402, "message": "Insufficient credits"}}) is None
    assert credit_limit(403, {"error": {"code": 403, "message": "Key is disabled"}}) is None
    assert credit_limit(429, in_flight_body()) is None
    assert credit_limit(402, "not json") is None


# ---------------------------------------------------------------------------- caching rules and prefixes


@pytest.mark.parametrize(
    ("model", "provider", "tokens", "cached"),
    [
        ("openai/gpt-4o-mini", "openrouter", 1300, 1280),
        ("gpt-4o-mini", "openai", 1000, 0),
        ("anthropic/claude-sonnet-4.5", "openrouter", 5000, 0),
        ("deepseek/deepseek-chat", "openrouter", 130, 128),
        ("mistralai/ministral-8b", "openrouter", 517, 517),
        ("anything", "local", 5000, 0),
    ],
)
def test_cache_rules(model, provider, tokens, cached):
    assert cache_rule(model, provider).cacheable(tokens) == cached


def test_shared_prefix_in_exact_tokens_matches_the_server_cache():
    """The dry run's prefix count equals what a server caching exact Tekken tokens finds."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from tests.fakes.server import get_tekken

    system = "You are a careful analyst. " * 40
    users = [f"Label this: item {i} is {'good' if i % 2 else 'bad'}" for i in range(20)]
    prefixes = SharedPrefixes()
    prefixes.add([system] * len(users), users)
    counter = counter_for("mistralai/ministral-8b")
    estimate = prefixes.estimate(counter, CacheRule("all", 1, 1))

    cache = PrefixCache()
    cached = 0
    for user in users:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        request = ChatCompletionRequest.from_openai(messages)
        tokens = get_tekken().encode_chat_completion(request).tokens
        cached += cache.cached(tokens)
        cache.finished(tokens)
    assert estimate.groups == 1
    assert estimate.cached_tokens <= cached <= estimate.cached_tokens * 1.02


def test_shared_tokens_of_two_texts_equal_comparing_their_whole_encodings():
    """Only the stretch where two prompts part is encoded; the count is that of whole encodings."""
    from tests.unit.test_tokens import random_text

    rng = random.Random(11)
    for _ in range(3000):
        start = random_text(rng, 10)
        a, b = start + random_text(rng, 6), start + random_text(rng, 6)
        if rng.random() < 0.1:
            b = a
        elif rng.random() < 0.1:
            b = a[: rng.randint(0, len(a))]
        want = caching._shared_count(encode_text(a), encode_text(b))
        assert caching._shared_tokens(a, b) == want, (a, b)


def common_start(texts):
    """The characters all texts start with, one character at a time."""
    n = 0
    while all(len(t) > n for t in texts) and len({t[n] for t in texts}) == 1:
        n += 1
    return texts[0][:n]


def test_batches_past_the_compared_rows_keep_each_groups_common_start(monkeypatch):
    """Past MAX_COMPARED rows a one-system batch is added at once: same common start and row count as row by row."""
    from tests.unit.test_tokens import random_text

    monkeypatch.setattr(caching, "MAX_COMPARED", 7)
    rng = random.Random(3)
    systems = ["sys A", "sys B", None]
    starts = {system: random_text(rng, 6) for system in systems}
    prefixes, users_of = SharedPrefixes(), {system: [] for system in systems}
    for _ in range(60):
        system = rng.choice(systems)
        start = starts[system]
        # Some users part early from the others, wherever they sort among them.
        users = [
            (start[: rng.randint(0, len(start))] if rng.random() < 0.15 else start) + random_text(rng, 4)
            for _ in range(rng.randint(1, 9))
        ]
        mixed = rng.random() < 0.3  # some batches hold two systems: the row-by-row path
        batch_systems = [system] * len(users) if not mixed else [system, *[systems[0]] * (len(users) - 1)]
        prefixes.add(batch_systems, users)
        for s, u in zip(batch_systems, users, strict=True):
            users_of[s].append(u)
    for system, users in users_of.items():
        group = prefixes._groups[system]
        assert group.rows == len(users)
        assert group.common == common_start(users)

    # A user parting early from the others sorts last in one batch, first in the next.
    monkeypatch.setattr(caching, "MAX_COMPARED", 0)
    prefixes = SharedPrefixes()
    prefixes.add(["s"], ["abc-1"])
    prefixes.add(["s", "s"], ["abc-2", "abd"])
    assert prefixes._groups["s"].common == "ab"
    prefixes.add(["s", "s"], ["a-", "ab"])
    assert (prefixes._groups["s"].common, prefixes._groups["s"].rows) == ("a", 5)


def test_common_prefix():
    rng = random.Random(23)
    for _ in range(3000):
        start = "".join(rng.choice("ab é🙂") for _ in range(rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 100, 300])))
        a = start + "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        b = start + "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        assert caching._common_prefix(a, b) == common_start([a, b]), (a, b)


def test_closest_earlier_row_is_the_one_sorted_insertion_finds():
    """All rows' closest earlier rows at once equal inserting them one by one into a sorted list."""
    import bisect

    def one_by_one(arrivals):
        seen, pairs = [arrivals[0]], []
        for user in arrivals[1:]:
            at = bisect.bisect_left(seen, user)
            best, best_length = "", -1
            for neighbour in seen[max(0, at - 1) : at + 1]:
                length = len(caching._common_prefix(neighbour, user))
                if length > best_length:
                    best, best_length = neighbour, length
            seen.insert(at, user)
            pairs.append((user, best))
        return sorted(pairs)

    rng = random.Random(17)
    words = ["a", "ab", "abc", "b", "ba", " ", "é", "🙂", "z", ""]
    for _ in range(300):
        arrivals = ["".join(rng.choice(words) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 40))]
        assert sorted(caching._closest_earlier(arrivals)) == one_by_one(arrivals), arrivals


def test_rows_without_a_shared_start_share_nothing():
    prefixes = SharedPrefixes()
    prefixes.add([None, None], ["alpha one", "beta two"])
    assert prefixes.estimate(counter_for("x"), CacheRule("all", 1, 1)).cached_tokens == 0


def test_fake_cache_needs_a_finished_request_and_keeps_steps():
    cache = PrefixCache(min_tokens=4, step=2)
    tokens = word_tokens([{"role": "system", "content": "a b c d e"}, {"role": "user", "content": "x"}])
    assert cache.cached(tokens) == 0
    cache.finished(tokens)
    other = word_tokens([{"role": "system", "content": "a b c d e"}, {"role": "user", "content": "y"}])
    assert cache.cached(other) == 10  # <system> <s> a b c d e </s> <user> <s>: 10 shared, a multiple of 2


# ---------------------------------------------------------------------------- warm-up and the in-flight window


def test_one_request_warms_a_prefix_before_the_others_go():
    async def scenario() -> list[str]:
        warmer = PrefixWarmer()
        events: list[str] = []
        key = prefix_key(b"system user 1")

        async def request(name: str, delay: float) -> None:
            async with warmer.turn(key):
                events.append(f"{name} sent")
                await asyncio.sleep(delay)
                events.append(f"{name} done")

        await asyncio.gather(request("first", 0.05), request("second", 0), request("third", 0))
        return events

    events = asyncio.run(scenario())
    assert events[:2] == ["first sent", "first done"]


def test_different_prefixes_do_not_wait_for_each_other():
    assert prefix_key(b"s" + b"a" * 2000 + b"x") == prefix_key(b"s" + b"a" * 2000 + b"y")
    assert prefix_key(b"sa") != prefix_key(b"ta")

    async def scenario() -> list[str]:
        warmer = PrefixWarmer()
        events: list[str] = []

        async def request(name: str) -> None:
            async with warmer.turn(prefix_key(name.encode())):
                events.append(f"{name} sent")
                await asyncio.sleep(0.01)

        await asyncio.gather(request("a"), request("b"))
        return events

    assert asyncio.run(scenario()) == ["a sent", "b sent"]


def test_warm_prefixes_are_bounded_and_the_newest_kept():
    """Rows whose starts all differ add a key each: the memory stays bounded, a shared start re-warms."""

    async def scenario() -> PrefixWarmer:
        warmer = PrefixWarmer()
        for i in range(MAX_WARM + 1):
            key = prefix_key(str(i).encode())
            assert await warmer.enter(key)
            warmer.leave(key)
        return warmer

    warmer = asyncio.run(scenario())
    assert len(warmer._warm) == MAX_WARM // 2 + 1
    assert warmer.is_warm(prefix_key(str(MAX_WARM).encode()))  # the newest stay warm
    assert not warmer.is_warm(prefix_key(b"0"))  # the oldest go: one lone request warms it again


def test_in_flight_window_halves_once_per_episode_and_grows_back():
    async def scenario() -> InFlightWindow:
        window = InFlightWindow(32)
        for _ in range(16):
            await window.gate.acquire()
        epoch = window.epoch
        window.refused(epoch)
        assert window.gate.limit == 8
        window.refused(epoch)  # sent before the cut: no second cut
        assert window.gate.limit == 8
        for _ in range(1000):
            window.answered()
        return window

    window = asyncio.run(scenario())
    assert window.gate.limit == 32 and window.refusals == 2


# ---------------------------------------------------------------------------- the journal keeps the counts


def test_journals_of_schema_4_gain_cache_and_attempt_columns(tmp_path):
    import contextlib
    import sqlite3

    from pipeline.store.journal import Journal, JournalRow, RowStatus
    from pipeline.store.migrations import SCHEMA_VERSION

    path = tmp_path / "j.sqlite"
    Journal(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for column in ("cached_tokens", "cache_write_tokens", "attempt_costs"):
            conn.execute(f"ALTER TABLE results DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    journal = Journal(path)
    try:
        assert journal.get_meta("schema_version") == str(SCHEMA_VERSION) == "5"
        row = JournalRow("k", "h", RowStatus.OK, cached_tokens=1024, cache_write_tokens=0, attempt_costs="[0.1]")
        journal.write_now([row])
        assert journal.results(["k"])["k"].cached_tokens == 1024
    finally:
        journal.close()
