"""Cost truth against a server that bills as providers do in 2026: prompt caching and in-flight budgets.

The fake server bills a prefix shared with an earlier FINISHED request at
0.1x the input price and reports it as ``usage.prompt_tokens_details.cached_tokens``;
with an in-flight budget it answers 402 ``in_flight_budget_exhausted``
(``Retry-After: 1``) once the worst cases in flight pass it.
"""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from pipeline.engine.caching import cache_rule
from tests.conftest import write_job, write_parquet
from tests.fakes.server import FakeServer

ROWS = 300
MODEL = "mistralai/ministral-8b"
PRICE = 0.1  # USD per million tokens, the fake server's default price
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "reviews", "of", "cafés"]


def long_system_prompt(words: int = 320, seed: int = 7) -> str:
    rng = random.Random(seed)
    return "You are a careful analyst. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def review_texts(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for i in range(n)]


@pytest.fixture
def caching_server():
    """The fake server billing cached prefixes at 0.1x, by the caching rule the pipeline expects for the model."""
    rule = cache_rule(MODEL, "openrouter")
    srv = FakeServer(
        tokenizer="tekken",
        prompt_caching=True,
        cache_read_factor=0.1,
        cache_min_tokens=rule.min_tokens,
        cache_step=rule.step,
        latency_s=0.3,
    )
    with srv.running():
        yield srv


def _job(workdir, server: FakeServer, provider: str, **model):
    write_parquet(workdir / "data/in.parquet", {"id": list(range(ROWS)), "text": review_texts(ROWS)})
    return write_job(
        workdir,
        server.base_url,
        system=long_system_prompt(),
        user="Label this review: {text}",
        limits={"concurrency": 32, "requests_per_minute": 600000, "max_attempts": 6},
        model={
            "provider": provider,
            "input_price_per_million": PRICE,
            "output_price_per_million": PRICE,
            "cached_input_price_per_million": PRICE / 10,
            **model,
        },
    )


def _json_out(capsys, *args: str, code: int = 0) -> dict:
    assert main(["run", *args, "--json", "--quiet"]) == code
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", ["openrouter", "openai"])
def test_cost_and_cached_tokens_match_the_bill(workdir, caching_server, capsys, provider):
    """300 rows, a long shared system prompt, concurrency 32: the output is the server's bill to 1e-9."""
    caching_server.config.include_cost = provider == "openrouter"  # the OpenAI dialect reports no cost
    _job(workdir, caching_server, provider)
    estimate = _json_out(capsys, "job", "--dry-run")
    assert caching_server.stats()["requests"] == 0

    summary = _json_out(capsys, "job")
    stats = caching_server.stats()
    table = pq.read_table(workdir / "data/out/job.parquet").to_pydict()

    assert stats["ok"] == ROWS and caching_server.duplicates() == 0
    assert sum(table["cost_usd"]) == pytest.approx(stats["cost"], abs=1e-9)
    assert sum(table["cached_tokens"]) == stats["cached_tokens"] > 0
    # One request warms the prefix: at most 2 pay it in full.
    assert sum(1 for cached in stats["cached_per_completion"] if cached == 0) <= 2
    # The dry run knew the prompts would mostly be read from the cache.
    assert estimate["cost_usd_min"] == pytest.approx(stats["prompt_cost"], rel=0.03)
    assert estimate["cached_tokens_expected"] == pytest.approx(stats["cached_tokens"], rel=0.03)
    assert summary["cached_tokens"] == stats["cached_tokens"]
    assert summary["cost_usd"] == pytest.approx(stats["cost"], abs=1e-9)
    assert summary["cache_saved_usd"] == pytest.approx(stats["cached_tokens"] * PRICE * 0.9 / 1e6, rel=1e-6)


def test_requests_carry_one_prompt_cache_key_per_job(workdir, caching_server, capsys):
    """OpenAI and Mistral route by prompt_cache_key: one per job, in every request, nothing else varies the prefix."""
    _job(workdir, caching_server, "openai")
    _json_out(capsys, "job")
    bodies = [b["body"] for b in caching_server.stats()["bodies"]]
    keys = {b.get("prompt_cache_key") for b in bodies}
    assert len(keys) == 1 and None not in keys
    systems = {b["messages"][0]["content"] for b in bodies}
    assert systems == {long_system_prompt()}


def _in_flight_server(budget_usd: float) -> FakeServer:
    return FakeServer(tokenizer="tekken", latency_s=0.05, in_flight_budget_usd=budget_usd, in_flight_retry_after="1")


def test_in_flight_budget_is_back_pressure(workdir, capsys):
    """402 in_flight_budget_exhausted at concurrency 32: exit 0, every row once, at most 20% refused."""
    # Room for about 8 requests' worst cases (prompt of ~500 tokens + max_tokens 64) at once.
    srv = _in_flight_server(budget_usd=8 * (560 + 64) * PRICE / 1e6)
    with srv.running():
        _job(workdir, srv, "openrouter")
        summary = _json_out(capsys, "job")
        stats = srv.stats()
    assert summary["exit_code"] == 0 and summary["rows_ok"] == ROWS
    assert stats["ok"] == ROWS and srv.duplicates() == 0
    assert stats["in_flight_refused"] > 0, "the budget never bit: the test proves nothing"
    assert stats["in_flight_refused"] <= 0.2 * stats["requests"]


def test_weight_exceeds_budget_stops_in_the_first_wave_naming_max_tokens(workdir, capsys):
    """One request's worst case alone passes the budget: exit 3 in the first wave, a line naming max_tokens."""
    srv = _in_flight_server(budget_usd=100 * PRICE / 1e6)
    with srv.running():
        _job(workdir, srv, "openrouter")
        summary = _json_out(capsys, "job", code=3)
        stats = srv.stats()
    assert stats["weight_refused"] >= 1 and stats["requests"] <= 32
    assert "max_tokens" in summary["stop_reason"]
    assert "refused the key" not in summary["stop_reason"]


# ---------------------------------------------------------------------------- prices offline, lanes, budgets


@pytest.mark.parametrize(
    ("model", "input_price", "output_price", "cached_price"),
    [("openai/gpt-4o-mini", 0.15, 0.6, 0.075), ("anthropic/claude-sonnet-4.5", 3.0, 15.0, 0.3)],
)
def test_dry_run_prices_catalog_models_offline(
    workdir, capsys, monkeypatch, model, input_price, output_price, cached_price
):
    """No network, no key: real prices from the genai-prices snapshot, none missing, lanes named."""
    monkeypatch.delenv("OPENROUTER_API_KEY")
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2, 3], "text": ["a", "b", "c"]})
    write_job(workdir, "http://127.0.0.1:9/v1", model={"name": model, "provider": "openrouter"})
    report = _json_out(capsys, "job", "--dry-run")
    assert (report["input_price_per_million"], report["output_price_per_million"]) == (input_price, output_price)
    assert report["cached_input_price_per_million"] == cached_price
    assert report["price_source"].startswith("genai-prices") and report["missing_prices"] == []
    assert report["cost_usd_min"] > 0 and report["cheapest_lane"] in {lane["lane"] for lane in report["lanes"]}


def test_dry_run_names_the_missing_price_and_its_key(workdir, capsys, monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY")
    write_parquet(workdir / "data/in.parquet", {"id": [1], "text": ["a"]})
    write_job(workdir, "http://127.0.0.1:9/v1", model={"name": "nobody/unknown-model"})
    assert main(["run", "job", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out
    assert "set [model] input_price_per_million" in out and "set [model] output_price_per_million" in out


def test_flex_is_sent_and_priced_at_flex(workdir, caching_server, capsys):
    """service_tier = "flex": in every request, and the dry run prices it (and the lanes) at flex."""
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2], "text": ["a", "b"]})
    write_job(
        workdir, caching_server.base_url, model={"name": "gpt-5-mini", "provider": "openai", "service_tier": "flex"}
    )
    report = _json_out(capsys, "job", "--dry-run")
    assert "flex" in report["price_source"]
    assert report["input_price_per_million"] == pytest.approx(0.125)
    assert "flex" in {lane["lane"] for lane in report["lanes"]}
    _json_out(capsys, "job")
    assert {b["body"]["service_tier"] for b in caching_server.stats()["bodies"]} == {"flex"}


def test_a_spent_budget_says_when_it_resets(workdir, server, capsys):
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2], "text": ["a", "b"]})
    write_job(workdir, server.base_url, limits={"concurrency": 1})
    server.config.script = {"a": ["budget_403"]}
    summary = _json_out(capsys, "job", code=3)
    assert "resets at" in summary["stop_reason"] and "refused the key" not in summary["stop_reason"]


def test_every_attempt_is_costed_per_row(workdir, caching_server, capsys):
    """A row retried after a 502 keeps both attempts' costs; they sum to its cost_usd."""
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2], "text": ["first", "second"]})
    write_job(workdir, caching_server.base_url, limits={"concurrency": 1}, model={"provider": "openrouter"})
    caching_server.config.script = {"second": ["502"]}
    _json_out(capsys, "job")
    table = pq.read_table(workdir / "data/out/job.parquet").to_pydict()
    costs = [json.loads(text) for text in table["attempt_costs"]]
    assert [len(c) for c in costs] == [1, 2] and table["attempts"] == [1, 2]
    for row_costs, cost in zip(costs, table["cost_usd"], strict=True):
        assert sum(row_costs) == pytest.approx(cost, abs=1e-12)
    assert table["provider"] == ["FakeProvider", "FakeProvider"] and all(table["model"])
