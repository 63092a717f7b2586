"""Tests for the fake chat-completions server (tests/fakes/server.py).

They talk to the real server over loopback with aiohttp, the way the pipeline does.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.server import (
    LLAMACPP_SCHEMA_ERROR,
    FakeServer,
    count_duplicates,
    expected_json,
    expected_label,
    expected_reply,
    max_per_window,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "mistralai/ministral-8b"
LABELS = ["positive", "negative", "neutral"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": LABELS},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "detail": {"type": "object", "properties": {"note": {"type": "string"}}},
        "kind": {"$ref": "#/$defs/Kind"},
    },
    "required": ["label", "score", "count", "flag", "tags", "detail", "kind"],
    "additionalProperties": False,
    "$defs": {"Kind": {"type": "string", "enum": ["a", "b"]}},
}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A fresh server running in its background thread."""
    srv = FakeServer()
    with srv.running():
        yield srv


def chat_body(u: str, max_tokens: int = 64, **extra: Any) -> dict[str, Any]:
    """A minimal chat-completions request whose last user message is ``u``."""
    messages = [{"role": "system", "content": "Classify."}, {"role": "user", "content": u}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra}


async def post(
    server: FakeServer, body: dict[str, Any], wait_s: float = 5.0, **kwargs: Any
) -> tuple[int, dict[str, Any], Any]:
    """POST a chat completion; return (status, headers, parsed JSON body)."""
    client_timeout = aiohttp.ClientTimeout(total=wait_s)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(f"{server.base_url}/chat/completions", json=body, **kwargs) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI/OpenRouter structured-output response_format."""
    return {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": schema}}


# ---------------------------------------------------------------------------- success path


async def test_success_shape_and_accounting(server: FakeServer) -> None:
    headers = {"Authorization": "Bearer sk-test", "HTTP-Referer": "https://example.org"}
    status, _, data = await post(server, chat_body("hello there world"), headers=headers)
    assert status == 200
    assert data["id"].startswith("gen-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == MODEL
    assert data["provider"] == "FakeProvider"
    choice = data["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": expected_reply("hello there world"),
    }
    assert choice["finish_reason"] == choice["native_finish_reason"] == "stop"
    usage = data["usage"]
    # words tokenizer: (1 + 3) + (3 + 3) prompt tokens; the reply has 6 words.
    assert usage["prompt_tokens"] == 10
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == 16
    assert usage["cost"] == pytest.approx(16 * 0.1e-6)

    stats = server.stats()
    assert stats["requests"] == 1 and stats["ok"] == 1
    assert stats["status_counts"] == {200: 1}
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (10, 6)
    assert stats["cost"] == pytest.approx(usage["cost"])
    assert len(stats["arrivals"]) == 1
    record = stats["bodies"][0]
    assert record["body"]["max_tokens"] == 64
    assert record["headers"]["http-referer"] == "https://example.org"
    assert record["headers"]["Authorization"] == "Bearer sk-test"


async def test_replies_are_per_row_and_duplicates_counted(server: FakeServer) -> None:
    rows = [f"row {i}" for i in range(20)]
    results = await asyncio.gather(*(post(server, chat_body(u)) for u in rows))
    contents = [data["choices"][0]["message"]["content"] for _, _, data in results]
    assert contents == [expected_reply(u) for u in rows]
    assert server.duplicates() == 0
    await post(server, chat_body("row 3"))
    assert server.duplicates() == 1
    assert count_duplicates(server.stats()["by_content"]) == 1


async def test_no_cost_no_provider_and_truncation(server: FakeServer) -> None:
    server.config.include_cost = False
    server.config.provider_name = None
    status, _, data = await post(server, chat_body("x", max_tokens=2))
    assert status == 200
    assert "provider" not in data and "cost" not in data["usage"]
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == " ".join(expected_reply("x").split()[:2])
    assert data["usage"]["completion_tokens"] == 2
    # The server still knows what the request cost.
    assert server.stats()["cost"] == pytest.approx((4 + 4 + 2) * 0.1e-6)


async def test_max_in_flight_with_latency(server: FakeServer) -> None:
    server.config.latency_s = 0.2
    start = time.monotonic()
    await asyncio.gather(*(post(server, chat_body(f"c{i}")) for i in range(5)))
    assert time.monotonic() - start < 1.0  # served concurrently
    assert server.stats()["max_in_flight"] == 5


async def test_running_inside_async_test_and_client_gives_up() -> None:
    # The server's own loop runs in its thread, so entering it here cannot deadlock ours.
    with FakeServer(latency_s=1.0).running() as srv:
        with pytest.raises(asyncio.TimeoutError):
            await post(srv, chat_body("late"), wait_s=0.2)
        await asyncio.sleep(0.1)
        stats = srv.stats()
    # A client that times out is neither answered nor billed.
    assert stats["cancelled"] == 1 and stats["ok"] == 0 and stats["status_counts"] == {}


def test_usable_from_sync_code(server: FakeServer) -> None:
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as resp:
        data = json.load(resp)
    assert [m["id"] for m in data["data"]] == ["mistralai/ministral-8b", "test/other-model"]
    assert data["data"][0]["pricing"]["prompt"] == "0.0000001"


# ------------------------------------------------------------------------- failure modes


async def test_rate_limit_429(server: FakeServer) -> None:
    server.config.rps = 3
    results = await asyncio.gather(*(post(server, chat_body(f"r{i}")) for i in range(6)))
    statuses = [status for status, _, _ in results]
    # A full bucket admits a one-second burst of 3; the rest arrive within milliseconds
    # (allow one refilled token on a slow machine).
    assert statuses.count(200) in (3, 4) and statuses.count(429) == 6 - statuses.count(200)
    _, headers, data = next(r for r in results if r[0] == 429)
    assert headers["Retry-After"] == "1"
    assert data == {"error": {"code": 429, "message": "Rate limit exceeded"}}
    stats = server.stats()
    assert stats["rate_limited"] == statuses.count(429)
    assert stats["status_counts"] == {200: statuses.count(200), 429: statuses.count(429)}
    assert max_per_window(stats["arrivals"], 1.0) == 6


async def test_script_sequence(server: FakeServer) -> None:
    server.config.script = {"row-7": ["500", "error200", "finish_error", "402", "403:Flagged"]}
    seen = [await post(server, chat_body("please row-7 now")) for _ in range(6)]
    assert [s for s, _, _ in seen] == [500, 200, 200, 402, 403, 200]
    assert seen[0][2] == {"error": {"code": 500, "message": "Internal server error"}}
    assert seen[1][2] == {"error": {"code": 502, "message": "Provider returned error"}}
    assert seen[2][2]["choices"][0]["finish_reason"] == "error"
    assert seen[2][2]["choices"][0]["message"]["content"] == ""
    assert seen[3][2]["error"]["message"] == "Insufficient credits"
    assert seen[4][2]["error"] == {"code": 403, "message": "Flagged"}
    assert seen[5][2]["choices"][0]["message"]["content"] == expected_reply("please row-7 now")
    # Only the last answer was a billed completion; other rows are unaffected.
    stats = server.stats()
    assert stats["ok"] == 1 and stats["status_counts"] == {500: 1, 200: 3, 402: 1, 403: 1}
    assert (await post(server, chat_body("row-8")))[0] == 200


async def test_retry_after_date(server: FakeServer) -> None:
    server.config.script = {"d": ["retry_after_date"]}
    status, headers, _ = await post(server, chat_body("d"))
    assert status == 429
    when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert 0 < when - time.time() <= 2.0


async def test_drop_disconnects(server: FakeServer) -> None:
    server.config.script = {"boom": ["drop"]}
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(server, chat_body("boom"))
    assert server.stats()["dropped"] == 1
    assert (await post(server, chat_body("boom")))[0] == 200  # the script is exhausted


async def test_hang_times_out(server: FakeServer) -> None:
    server.config.script = {"slow": ["hang"]}
    with pytest.raises(asyncio.TimeoutError):
        await post(server, chat_body("slow"), wait_s=0.3)
    stats = server.stats()
    assert stats["hung"] == 1 and stats["status_counts"] == {}
    await asyncio.sleep(0.1)  # the server notices the disconnect and frees the handler
    assert server.stats()["in_flight"] == 0


async def test_fail_rate_is_seeded(server: FakeServer) -> None:
    server.config.fail_rate = 0.5
    server.config.fail_kind = "503"
    first = [(await post(server, chat_body(f"f{i}")))[0] for i in range(20)]
    server.reset()
    second = [(await post(server, chat_body(f"f{i}")))[0] for i in range(20)]
    assert first == second and set(first) == {200, 503}


# ---------------------------------------------------------------------- structured output


async def test_structured_output_conforms(server: FakeServer) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for u in ("great product", "awful", "meh"):
        status, _, data = await post(server, chat_body(u, response_format=schema_format(SCHEMA)))
        assert status == 200
        reply = json.loads(data["choices"][0]["message"]["content"])
        jsonschema.validate(reply, SCHEMA)
        assert reply == expected_json(u, SCHEMA)
        assert reply["label"] == expected_label(u, LABELS)
    # llama.cpp form of the same request.
    llama_format = {"type": "json_object", "schema": SCHEMA}
    status, _, data = await post(server, chat_body("meh", response_format=llama_format))
    assert json.loads(data["choices"][0]["message"]["content"]) == expected_json("meh", SCHEMA)
    assert server.stats()["response_formats"] == {"json_schema": 3, "json_object": 1}


async def test_structured_output_rejections(server: FakeServer) -> None:
    bad = schema_format({"type": "string"})
    status, _, data = await post(server, chat_body("x", response_format=bad))
    assert status == 400 and "error" in data

    server.config.llamacpp_mode = True
    status, _, data = await post(server, chat_body("x", response_format=schema_format(SCHEMA)))
    assert status == 500
    assert data["error"]["message"] == LLAMACPP_SCHEMA_ERROR

    server.config.script = {"x": ["invalid_json", "wrong_label", "empty"]}
    llama_format = {"type": "json_object", "schema": SCHEMA}
    contents = [
        (await post(server, chat_body("x", response_format=llama_format)))[2]["choices"][0]["message"]["content"]
        for _ in range(3)
    ]
    assert contents == ["this is not json", '{"label": "not-a-label"}', ""]


# ------------------------------------------------------------------ helpers, HTTP control


def test_max_per_window() -> None:
    assert max_per_window([], 1.0) == 0
    assert max_per_window([0.0, 1.0, 2.0], 1.0) == 1  # half-open windows
    assert max_per_window([0.0, 0.5, 0.99, 1.0, 1.2, 3.0], 1.0) == 4
    assert max_per_window([2.0, 0.1, 0.2, 1.05], 1.0) == 3  # unsorted input


async def test_control_stats_reset_over_http(server: FakeServer) -> None:
    root = server.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{root}/control", json={"provider_name": "Other"}) as resp:
            assert resp.status == 200
        async with session.post(f"{root}/control", json={"nope": 1}) as resp:
            assert resp.status == 400
        assert (await post(server, chat_body("a")))[2]["provider"] == "Other"
        async with session.get(f"{root}/stats") as resp:
            stats = await resp.json()
        assert stats["ok"] == 1 and "bodies" not in stats and "arrivals" not in stats
        async with session.get(f"{root}/stats?full=1") as resp:
            full = await resp.json()
        assert full["bodies"][0]["body"]["messages"][-1]["content"] == "a"
        async with session.post(f"{root}/reset") as resp:
            assert resp.status == 200
    assert server.stats()["requests"] == 0


async def test_tekken_counts(server: FakeServer) -> None:
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from tests.fakes.server import get_tekken

    server.config.tokenizer = "tekken"
    body = chat_body("Bonjour, comment ça va ?", max_tokens=3)
    status, _, data = await post(server, body, wait_s=30)
    assert status == 200
    tok = get_tekken()
    request = ChatCompletionRequest.from_openai(body["messages"])
    assert data["usage"]["prompt_tokens"] == len(tok.encode_chat_completion(request).tokens)
    assert data["usage"]["completion_tokens"] == 3
    assert data["choices"][0]["finish_reason"] == "length"


def test_cli_ready_and_serves() -> None:
    command = [sys.executable, "-m", "tests.fakes.server", "--port", "0", "--no-cost"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1")
        url = line.split()[1]
        request = urllib.request.Request(
            f"{url}/chat/completions",
            data=json.dumps(chat_body("cli")).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            data = json.load(resp)
        assert data["choices"][0]["message"]["content"] == expected_reply("cli")
        assert "cost" not in data["usage"]
        proc.terminate()
        assert proc.wait(timeout=10) == 0
