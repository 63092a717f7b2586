"""Table-driven unit tests for the engine's seams: classification, backoff, keys, selection, recording, budget."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from pipeline.engine.budget import Budget
from pipeline.engine.client import backoff_delay
from pipeline.engine.plan import content_keys
from pipeline.engine.pricing import ModelInfo
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.recorder import Recorder
from pipeline.engine.selection import RowSelector
from pipeline.errors import JournalError
from pipeline.providers import get_provider, guess_provider
from pipeline.providers.base import ReplyKind, parse_response, parse_retry_after
from pipeline.store.journal import Journal, JournalRow, RowStatus, Seen
from pipeline.store.migrations import SCHEMA_VERSION

OK_BODY = {"id": "gen-1", "model": "m", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}


def body(**changes: Any) -> bytes:
    return json.dumps({**OK_BODY, **changes}).encode()


@pytest.mark.parametrize(
    ("status", "raw", "kind", "error_start"),
    [
        (200, body(), ReplyKind.OK, None),
        (200, body(error={"message": "upstream died"}), ReplyKind.RETRY, "provider error (HTTP 200)"),
        (200, body(choices=[{"message": {"content": "x"}, "finish_reason": "error"}]), ReplyKind.RETRY, "provider"),
        (200, body(choices=[{"message": {"content": None}, "finish_reason": "stop"}]), ReplyKind.RETRY, "HTTP 200"),
        (200, body(choices=[]), ReplyKind.RETRY, "HTTP 200 without choices"),
        (200, b"<html>", ReplyKind.RETRY, "HTTP 200 with an unreadable body"),
        (400, b'{"error": {"code": 400, "message": "bad"}}', ReplyKind.FATAL, "HTTP 400: bad"),
        (401, b'{"error": {"code": 401, "message": "no key"}}', ReplyKind.AUTH, "HTTP 401"),
        (402, b'{"error": {"code": 402, "message": "credits"}}', ReplyKind.AUTH, "HTTP 402"),
        (403, b'{"error": {"message": "key is disabled"}}', ReplyKind.AUTH, "HTTP 403"),
        (403, b'{"error": {"message": "not available in your region"}}', ReplyKind.FATAL, "HTTP 403"),
        (404, b'{"error": {"message": "No endpoints found"}}', ReplyKind.FATAL, "HTTP 404"),
        (408, b"", ReplyKind.RETRY, "HTTP 408: (empty body)"),
        (429, b"{}", ReplyKind.RETRY, "HTTP 429"),
        (502, b"bad gateway", ReplyKind.RETRY, "HTTP 502: bad gateway"),
    ],
)
def test_parse_response_classifies(status: int, raw: bytes, kind: ReplyKind, error_start: str | None) -> None:
    reply = parse_response(status, raw, CIMultiDict())
    assert reply.kind == kind
    if error_start is None:
        assert reply.error is None and reply.content == "hi"
    else:
        assert reply.error is not None and reply.error.startswith(error_start)


def test_tool_calls_without_content_are_a_reply() -> None:
    choice = {"message": {"content": None, "tool_calls": [{"id": "t"}]}, "finish_reason": "tool_calls"}
    assert parse_response(200, body(choices=[choice]), CIMultiDict()).kind == ReplyKind.OK


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("0.5", 0.5),
        ("-2", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [(1, None, 0, 0.5), (4, None, 0, 4), (2, 7.0, 7.0, 7.1), (1, 9999.0, 600, 601)],
)
def test_backoff_delay_bounds(attempt: int, retry_after: float | None, low: float, high: float) -> None:
    for _ in range(50):
        assert low <= backoff_delay(attempt, retry_after) <= high


@pytest.mark.parametrize(
    ("base_url", "name"),
    [
        ("https://openrouter.ai/api/v1", "openrouter"),
        ("https://api.mistral.ai/v1", "mistral"),
        ("https://api.openai.com/v1", "openai"),
        ("http://127.0.0.1:8000/v1", "openai"),
    ],
)
def test_provider_guessed_from_url(base_url: str, name: str) -> None:
    assert guess_provider(base_url).name == name


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [("mistral", {"seed": 7}, {"random_seed": 7}), ("openrouter", {"seed": 7}, {"seed": 7}), ("openai", {}, {})],
)
def test_provider_params(name: str, params: dict[str, Any], expected: dict[str, Any]) -> None:
    assert get_provider(name).adapt_params(dict(params)) == expected


def rendered(users: list[str], blank: list[bool] | None = None) -> RenderedBatch:
    return RenderedBatch(users, None, blank or [False] * len(users))


def test_content_keys_number_equal_prompts_across_batches() -> None:
    occurrences: dict[str, int] = {}
    first = content_keys(rendered(["a", "b", "a"]), occurrences)
    second = content_keys(rendered(["a", "c"]), occurrences)
    assert first[0] != first[1] and first[2] == first[0] + "#2"
    assert second[0] == first[0] + "#3" and "#" not in second[1]


@pytest.mark.parametrize(
    ("status", "retry_failed", "sent"),
    [
        (RowStatus.OK, False, False),
        (RowStatus.SKIPPED, False, False),
        (RowStatus.FAILED, False, False),
        (RowStatus.FAILED, True, True),
        (RowStatus.INVALID, True, True),
        (RowStatus.TRANSIENT, False, True),
    ],
)
def test_selector_resume_rules(status: RowStatus, retry_failed: bool, sent: bool) -> None:
    batch = rendered(["x"])
    seen = {"k": Seen(batch.prompt_hash(0), status, 0)}
    selection = RowSelector(lambda keys: seen, retry_failed=retry_failed).select(["k"], batch, 0)
    assert (selection.todo == [0]) is sent and selection.done == (0 if sent else 1)


def test_selector_changed_prompt_is_sent_and_blank_skipped() -> None:
    batch = rendered(["new", " "], [False, True])
    seen = {"a": Seen("old-hash", RowStatus.OK, 0)}
    selection = RowSelector(lambda keys: seen, sample={0, 1}).select(["a", "b"], batch, 0)
    assert selection.todo == [0] and selection.blank == [1]


PRICED = ModelInfo("m", 0.1, 0.1, 1000, "test")


@pytest.mark.parametrize(
    ("usage", "billed", "usd", "estimated"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 10, "cost": 0.5}, 0.5, 0.5, False),
        ({"prompt_tokens": 1_000_000, "completion_tokens": 0}, 0.0, 0.1, False),
        (None, 0.0, None, True),  # no usage: counted from the prompt (given) and the reply text
    ],
)
def test_recorder_charges(usage: dict[str, Any] | None, billed: float, usd: float | None, estimated: bool) -> None:
    raw = body(usage=usage) if usage is not None else body()
    reply = parse_response(200, raw, CIMultiDict())
    charge = Recorder(PRICED, None, lambda: None).charge(reply, billed, prompt_tokens=1_000_000)  # type: ignore[arg-type,return-value]
    assert charge.estimated is estimated
    if usd is not None:
        assert charge.usd == pytest.approx(usd)
    else:
        assert charge.usd == pytest.approx(0.1, rel=1e-3) and charge.prompt_tokens == 1_000_000


CHAT_TEXTS = [
    "plain",
    "",
    'quotes " and \\ backslashes',
    "new\nlines\tand\rreturns",
    "controls \x00 \x1f \x7f",
    "unicode é 日本 😀 \u2028 \u2029",
    'looks like json: {"role": "user"}',
]


@pytest.mark.parametrize("user", CHAT_TEXTS)
@pytest.mark.parametrize("system", [None, "You are terse.", 'sys "quoted" 😀\n'])
def test_chat_body_is_byte_for_byte_the_generic_body(system: str | None, user: str) -> None:
    from pipeline.config.job import ModelSpec
    from pipeline.providers.dialect import Dialect

    dialect = Dialect(ModelSpec(params={"seed": 7}), "m/x", {})
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    assert dialect.chat_body(system, user) == dialect.body(messages)
    assert json.loads(dialect.chat_body(system, user))["messages"] == messages


def test_budget_reserves_worst_case() -> None:
    budget = Budget(1.0, spent=0.4)
    assert budget.reserve(0.5)
    assert not budget.reserve(0.2)  # 0.4 + 0.5 + 0.2 > 1.0
    budget.settle(0.5, 0.1)
    assert budget.reserve(0.2) and budget.spent == pytest.approx(0.5)


def test_journal_round_trips_rows_and_carries_spend_through_fresh(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal.open(path, {"id": 1})
    row = JournalRow("k", "h", RowStatus.OK, completion="c", cost_usd=0.25, attempts=2, cost_estimated=True)
    journal.write_now([row], 0.25)
    assert journal.results(["k"])["k"] == row
    assert journal.get_meta("schema_version") == str(SCHEMA_VERSION)
    journal.close()
    fresh = Journal.open(path, {"id": 1}, fresh=True)
    assert fresh.results(["k"]) == {} and fresh.spent() == 0 and fresh.job_spent() == pytest.approx(0.25)
    fresh.close()
    assert len(list(tmp_path.glob("j.sqlite.*.old"))) == 1


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        (["b", "a"], [("b", "cb", 2), ("a", "ca", 1)]),
        (["a", "zz", "b"], [("a", "ca", 1), (None, None, None), ("b", "cb", 2)]),
        (["zz"], [(None, None, None)]),
        ([], []),
    ],
    ids=["batch order, not journal order", "a key never journaled gives nulls in place", "only unknown", "empty"],
)
def test_journal_columns_in_order(tmp_path: Path, asked: list[str], expected: list[tuple[object, ...]]) -> None:
    journal = Journal.open(tmp_path / "j.sqlite", {"id": 1})
    rows = [JournalRow(k, "h", RowStatus.OK, completion=f"c{k}", attempts=n) for n, k in ((1, "a"), (2, "b"))]
    journal.write_now(rows)
    assert journal.columns_in_order(asked, ("key", "completion", "attempts")) == expected
    with pytest.raises(ValueError, match="not journal columns"):
        journal.columns_in_order(asked, ("key; DROP TABLE results",))
    journal.close()


def test_damaged_journal_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match=str(path)):
        Journal.open(path, {})
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
        conn.execute("CREATE TABLE results (key TEXT)")
    with pytest.raises(JournalError, match="newer"):
        Journal.open(tmp_path / "other.sqlite", {})


async def test_waiters_do_not_burst_when_a_pause_ends() -> None:
    """Requests queued behind a 429 pause leave spaced by the cap, not all at the pause's end."""
    import asyncio

    from pipeline.engine.limits.limiter import RateLimiter

    limiter = RateLimiter(600)  # 10 a second, a bucket of two
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(loop.time())

    waiters = [asyncio.create_task(one()) for _ in range(12)]
    await asyncio.sleep(0.05)
    limiter.cool_down(0.6)
    await asyncio.gather(*waiters)
    after = sorted(t for t in times if t >= times[0] + 0.5)
    assert len(after) >= 8
    most = max(sum(1 for u in after if t <= u < t + 0.25) for t in after)
    assert most <= 4, f"{most} requests within 0.25 s after the pause (cap: 10 a second)"


def test_fresh_sets_a_damaged_journal_aside(tmp_path: Path) -> None:
    """The advice for a damaged journal ("rerun with --fresh") works."""
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"garbage" * 500)
    journal = Journal.open(path, {"id": 1}, fresh=True)
    assert journal.results(["k"]) == {} and journal.job_spent() == 0
    journal.close()
    assert [p.read_bytes()[:7] for p in tmp_path.glob("j.sqlite.*.old")] == [b"garbage"]
