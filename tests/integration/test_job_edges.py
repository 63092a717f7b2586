"""Job-file edges (BOM, empty paths, strict numbers, header names) and ``pipeline prices``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli.app import main
from pipeline.config.job import load_job
from pipeline.errors import JobError
from tests.conftest import reviews, write_job, write_parquet
from tests.fakes.server import FakeServer


def job_text(**sections: str) -> str:
    base = {
        "input": 'path = "data/in.parquet"',
        "prompt": 'user = "{text}"',
        "output": 'path = "data/out/job.parquet"',
    }
    base.update(sections)
    return "\n".join(f"[{name}]\n{body}\n" for name, body in base.items())


def test_job_file_with_byte_order_mark_loads(workdir: Path) -> None:
    (workdir / "jobs" / "bom.toml").write_bytes(b"\xef\xbb\xbf" + job_text().encode())
    assert load_job("bom").input.path == Path("data/in.parquet")


@pytest.mark.parametrize(
    ("sections", "key", "message"),
    [
        ({"input": 'path = ""'}, "[input] path", "must not be empty"),
        ({"input": 'path = "  "'}, "[input] path", "must not be empty"),
        ({"output": 'path = ""'}, "[output] path", "must not be empty"),
        ({"output": 'path = "o.parquet"\njournal = ""'}, "[output] journal", "must not be empty"),
        ({"prompt": 'user = "{text}"\njson_schema_file = ""'}, "[prompt] json_schema_file", "must not be empty"),
        ({"limits": "concurrency = true"}, "[limits] concurrency", "whole number"),
        ({"limits": "concurrency = 2.5"}, "[limits] concurrency", "whole number"),
        ({"limits": "concurrency = 8.0"}, "[limits] concurrency", "whole number"),
        ({"limits": 'concurrency = "8"'}, "[limits] concurrency", "whole number"),
        ({"limits": "max_attempts = false"}, "[limits] max_attempts", "whole number"),
        ({"limits": "timeout_s = true"}, "[limits] timeout_s", "must be a number"),
        ({"limits": "budget_usd = true"}, "[limits] budget_usd", "must be a number"),
        ({"model": "max_tokens = true"}, "[model] max_tokens", "whole number"),
        ({"model": "temperature = true"}, "[model] temperature", "must be a number"),
        ({"prompt": 'user = "{text}"\nretry_invalid = true'}, "[prompt] retry_invalid", "whole number"),
        ({"input": 'path = "x.csv"\nbatch_size = 1.5'}, "[input] batch_size", "whole number"),
        ({"input": 'path = "x.csv"\ndtypes = { zip = "text" }'}, "[input] dtypes.zip", "string"),
        ({"model": 'headers = { "Authorization " = "Bearer x" }'}, "[model] headers", "api_key_env"),
        ({"model": 'headers = { " AUTHORIZATION" = "Bearer x" }'}, "[model] headers", "api_key_env"),
        ({"model": 'headers = { "X Title" = "x" }'}, "[model] headers", "not a valid HTTP header name"),
        ({"model": 'headers = { "X-Title" = "a\\nb" }'}, "[model] headers", "line break"),
    ],
)
def test_job_error_names_the_key(workdir: Path, sections: dict[str, str], key: str, message: str) -> None:
    (workdir / "jobs" / "bad.toml").write_text(job_text(**sections), encoding="utf-8")
    with pytest.raises(JobError) as caught:
        load_job("bad")
    text = str(caught.value)
    assert f"{key}: " in text and message in text, text
    assert "Bearer x" not in text


def test_whole_numbers_still_accepted(workdir: Path) -> None:
    """Strictness refuses true and 2.5, not ordinary values: an integer for a float key is fine."""
    text = job_text(limits="concurrency = 8\ntimeout_s = 60\nbudget_usd = 5", model="temperature = 0")
    (workdir / "jobs" / "ok.toml").write_text(text, encoding="utf-8")
    job = load_job("ok")
    assert job.limits.concurrency == 8 and job.limits.timeout_s == 60.0 and job.limits.budget_usd == 5.0


def test_prices_lists_known_models(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "input", "output", "cached", "context", "source"]
    line = next(line for line in out if line.startswith("mistralai/ministral-8b "))
    assert line.split()[1:5] == ["0.1", "0.1", "?", "131,072"] and "genai-prices" in line
    claude = next(line for line in out if line.startswith("anthropic/claude-sonnet-4.5 "))
    assert claude.split()[1:4] == ["3", "15", "0.3"]


def test_prices_lists_cached_models_too(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = workdir / "cache" / "prices.json"
    cache.parent.mkdir()
    models = {"test/cached-model": {"input_per_million": 1.5, "output_per_million": 3.0, "context_length": 8192}}
    payload = {"source": "http://x", "refreshed_at": "2026-11-26T00:00:00+00:00", "models": models}
    cache.write_text(json.dumps(payload))
    assert main(["prices"]) == 0
    out = capsys.readouterr().out
    cached = next(line for line in out.splitlines() if line.startswith("test/cached-model"))
    assert cached.split()[1:5] == ["1.5", "3", "?", "8,192"] and "price cache" in cached
    assert "mistralai/ministral-8b" in out  # built-in models stay listed


def test_prices_unknown_model_is_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "nobody/no-such-model"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'nobody/no-such-model'" in lines[0]


def test_bom_job_runs(server: FakeServer, workdir: Path) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(2))
    job = write_job(workdir, server.base_url)
    job.write_bytes(b"\xef\xbb\xbf" + job.read_bytes())
    assert main(["run", "job", "--quiet"]) == 0
    assert server.stats()["requests"] == 2


def test_an_unknown_provider_is_exit_2_naming_the_known_ones(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.base_url is not None
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, model={"provider": "bedrock"})
    assert main(["run", "job", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown provider 'bedrock'" in err and "openrouter, mistral, openai, local" in err
    assert server.stats()["requests"] == 0
