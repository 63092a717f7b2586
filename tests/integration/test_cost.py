"""Dry runs, samples, the context window and the budget: know the bill, never exceed it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.conftest import read_output, run_cli, write_job, write_parquet
from tests.fakes.server import get_tekken

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "reviews",
    "of",
    "café",
    "crème",
    "😀",
    "arrive",
    "daily",
]


def random_texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def reference_tokens(system: str, users: list[str]) -> int:
    """Ministral's own count of each whole chat request, one request at a time."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    tok = get_tekken()
    total = 0
    for user in users:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        total += len(tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens)
    return total


def dry_run_json(capsys: pytest.CaptureFixture[str], job: str = "job") -> dict:
    assert main(["run", job, "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_counts_exact_tokens_offline_without_a_key(workdir, server, capsys, monkeypatch):
    """5,000 rows, no key: nothing sent, tokens match Ministral's tokenizer, cost follows $0.10/M."""
    monkeypatch.delenv("OPENROUTER_API_KEY")
    texts = random_texts(5000)
    write_parquet(workdir / "data/in.parquet", {"id": list(range(5000)), "text": texts})
    write_job(workdir, server.base_url, model={"max_tokens": 100})
    report = dry_run_json(capsys)
    assert server.stats()["requests"] == 0
    expected = reference_tokens("You are a concise analyst.", [f"Summarise in one sentence:\n\n{t}" for t in texts])
    assert abs(report["input_tokens"] - expected) <= 0.005 * expected
    assert report["rows"] == 5000 and report["skipped"]["total"] == 0
    assert report["output_tokens_max"] == 5000 * 100
    assert report["cost_usd_min"] == pytest.approx(report["input_tokens"] * 0.1e-6, rel=1e-6)
    assert report["cost_usd_max"] == pytest.approx((report["input_tokens"] + 500_000) * 0.1e-6, rel=1e-6)
    assert report["cost_usd_min"] <= report["cost_usd_expected"] <= report["cost_usd_max"]
    assert report["tokens_exact"] is True
    assert report["duration_s_min"] == pytest.approx(5000 / 60000 * 60, abs=0.2)
    for key in ("output_tokens_expected", "cost_usd_expected", "duration_s_min"):
        assert key in report


def test_dry_run_reports_skipped_rows(workdir, server, capsys):
    """Empty prompts and prompts over the context window are counted as skipped, with no cost."""
    texts = ["short text", "", "   ", "word " * 400, "another short one"]
    write_parquet(workdir / "data/in.parquet", {"id": list(range(5)), "text": texts})
    write_job(workdir, server.base_url, model={"max_tokens": 50, "context_length": 200})
    report = dry_run_json(capsys)
    assert report["skipped"] == {"empty_prompt": 2, "over_context": 1, "total": 3}
    assert report["rows_to_send"] == 2
    assert report["output_tokens_max"] == 2 * 50


def test_over_context_rows_are_never_sent(workdir, server):
    """A prompt + max_tokens over the context window ends with an error giving both numbers."""
    texts = ["short text", "word " * 400]
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2], "text": texts})
    write_job(workdir, server.base_url, model={"max_tokens": 50, "context_length": 200})
    assert run_cli("job") == 1
    rows = read_output(workdir / "data/out/job.parquet").to_pylist()
    assert rows[0]["error"] is None
    assert "context window of 200 tokens" in rows[1]["error"] and "max_tokens 50" in rows[1]["error"]
    assert rows[1]["completion"] is None
    assert server.stats()["requests"] == 1


def test_budget_stops_before_overspending_and_resumes(workdir, server, capsys):
    """A job costing ~5x its budget stops (exit 3) billed at most the budget; raising it finishes."""
    server.config.tokenizer = "tekken"
    texts = random_texts(300, seed=7)
    write_parquet(workdir / "data/in.parquet", {"id": list(range(300)), "text": texts})
    write_job(workdir, server.base_url, model={"max_tokens": 32}, limits={"concurrency": 8})
    full = reference_tokens("You are a concise analyst.", [f"Summarise in one sentence:\n\n{t}" for t in texts])
    full_cost = (full + 300 * 10) * 0.1e-6  # replies are ~10 tokens
    budget = full_cost / 5
    write_job(workdir, server.base_url, model={"max_tokens": 32}, limits={"concurrency": 8, "budget_usd": budget})
    assert run_cli("job") == 3
    assert "budget" in capsys.readouterr().err
    billed = server.stats()["cost"]
    assert 0 < billed <= budget
    write_job(
        workdir, server.base_url, model={"max_tokens": 32}, limits={"concurrency": 8, "budget_usd": full_cost * 3}
    )
    assert run_cli("job") == 0
    assert server.duplicates() == 0
    assert read_output(workdir / "data/out/job.parquet").column("error").null_count == 300


def test_sample_is_paid_once_and_extrapolated(workdir, server, capsys):
    """--sample N sends N rows for real; the full run does not pay for them again."""
    write_parquet(workdir / "data/in.parquet", {"id": list(range(200)), "text": random_texts(200)})
    write_job(workdir, server.base_url)
    assert main(["run", "job", "--sample", "20", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 1  # --json prints one object: the summary with the estimate inside
    estimate = lines[0]["estimate"]
    assert server.stats()["ok"] == 20
    assert "20 answered rows" in estimate["output_tokens_basis"]
    low, high = estimate["cost_usd_interval"]
    assert estimate["cost_usd_min"] <= low <= estimate["cost_usd_expected"] <= high <= estimate["cost_usd_max"]
    assert not (workdir / "data/out/job.parquet").exists()
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 200
    assert server.duplicates() == 0


def test_price_refresh_feeds_later_dry_runs(workdir, server, capsys):
    """`pipeline prices --refresh` caches the models list; job overrides still win."""
    base = server.base_url
    assert main(["prices", "--refresh", "--base-url", base]) == 0
    write_parquet(workdir / "data/in.parquet", {"id": [1], "text": ["hello there"]})
    write_job(workdir, base, model={"name": "test/other-model"})
    capsys.readouterr()
    report = dry_run_json(capsys)
    assert report["input_price_per_million"] == pytest.approx(1.0)
    assert report["output_price_per_million"] == pytest.approx(2.0)
    assert report["context_length"] == 8192
    assert "cache" in report["price_source"]
    write_job(workdir, base, model={"name": "test/other-model", "input_price_per_million": 5.0})
    report = dry_run_json(capsys)
    assert report["input_price_per_million"] == 5.0
    assert report["output_price_per_million"] == pytest.approx(2.0)


def test_summary_puts_estimate_beside_actual_cost(workdir, server, capsys):
    write_parquet(workdir / "data/in.parquet", {"id": [1, 2], "text": ["a b c", "d e f"]})
    write_job(workdir, server.base_url)
    assert main(["run", "job", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cost_usd"] == pytest.approx(server.stats()["cost"])
    assert summary["cost_usd_estimated"] == pytest.approx(server.stats()["cost"])
    assert "genai-prices" in summary["price_source"]
    table = pq.read_table(Path("data/out/job.parquet"))
    assert table.num_rows == 2
