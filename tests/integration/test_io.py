"""Inputs and outputs: what is read reaches the server unchanged; what is written is typed and complete.

Every test runs the real pipeline against the loopback fake server and checks the
request bodies the server recorded, its statistics, and the Parquet file written.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.cli.app import main
from pipeline.config.job import ModelSpec, load_job
from pipeline.engine.plan import prepare
from pipeline.providers import request_fields
from pipeline.providers.dialect import Dialect
from tests.conftest import read_output, reviews, run_cli, spawn, write_job, write_parquet
from tests.fakes.server import (
    LLAMACPP_SCHEMA_ERROR,
    FakeServer,
    expected_json,
    expected_label,
    expected_reply,
    last_user_content,
)

LABELS = ["positive", "negative", "neutral"]
LABELS_EXTRA = 'labels = ["positive", "negative", "neutral"]'
USER_PREFIX = "Summarise in one sentence:\n\n"  # write_job's default user template, rendered

RESULT_SCHEMA = pa.schema(
    [
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cache_write_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("model", pa.string()),
        ("provider", pa.string()),
        ("generation_id", pa.string()),
        ("attempts", pa.int64()),
        ("attempt_costs", pa.string()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
    ]
)

# A schema with one property of every supported JSON type, as the job file writes it.
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number"},
        "recommended": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {
            "type": "object",
            "properties": {"lang": {"type": "string"}, "words": {"type": "integer"}},
        },
    },
}
REVIEW_SCHEMA_TOML = """
[prompt.json_schema]
type = "object"
[prompt.json_schema.properties.title]
type = "string"
[prompt.json_schema.properties.stars]
type = "integer"
minimum = 1
maximum = 5
[prompt.json_schema.properties.score]
type = "number"
[prompt.json_schema.properties.recommended]
type = "boolean"
[prompt.json_schema.properties.tags]
type = "array"
items = { type = "string" }
[prompt.json_schema.properties.meta]
type = "object"
properties = { lang = { type = "string" }, words = { type = "integer" } }
"""
REVIEW_COLUMNS = pa.schema(
    [
        ("title", pa.string()),
        ("stars", pa.int64()),
        ("score", pa.float64()),
        ("recommended", pa.bool_()),
        ("tags", pa.list_(pa.string())),
        ("meta", pa.struct([("lang", pa.string()), ("words", pa.int64())])),
    ]
)


# --------------------------------------------------------------------------- helpers


def out_path(workdir: Path, name: str = "job") -> Path:
    return workdir / "data" / "out" / f"{name}.parquet"


def user_contents(server: FakeServer) -> list[str]:
    """The last user message of every chat request the server received."""
    return [last_user_content(b["body"]["messages"]) for b in server.stats()["bodies"]]


def result_part(table: pa.Table, n_input: int) -> pa.Schema:
    """The schema of the result columns (after the input columns, before structured ones)."""
    return pa.schema(list(table.schema)[n_input : n_input + len(RESULT_SCHEMA)])


def set_batch_size(job_path: Path, size: int) -> None:
    """Add ``batch_size`` to the job's [input] table (write_job has no parameter for it)."""
    text = job_path.read_text(encoding="utf-8")
    job_path.write_text(text.replace("[input]\n", f"[input]\nbatch_size = {size}\n", 1), encoding="utf-8")


def journal_keys(workdir: Path, name: str = "job") -> list[str]:
    path = workdir / "data" / "out" / f"{name}.parquet.journal.sqlite"
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM results")]


def completions_match(table: pa.Table, users: list[str]) -> None:
    """Row i of the output carries the reply to prompt i, and no error."""
    assert table.column("completion").to_pylist() == [expected_reply(u) for u in users]
    assert table.column("error").to_pylist() == [None] * len(users)


# ----------------------------------------------------------------------------- CSV

TRICKY_ROWS: list[dict[str, str]] = [
    {"id": "007", "code": "007", "price": "1.50", "text": 'She said "hello, world" and left'},
    {"id": "7", "code": "0042", "price": "10.00", "text": "line one\nline two\n\nline four"},
    {"id": "a,b", "code": "", "price": "N/A", "text": "Crème brûlée — naïve façade; 日本語のレビュー; Ελληνικά"},
    {"id": "x-4", "code": "00", "price": "1e5", "text": "emoji 🎉👍🏽 and a family 👨\u200d👩\u200d👧 in one review"},
    {"id": "x-5", "code": "NULL", "price": "-0.0", "text": '  padded with spaces, a tab\tand a quote " inside  '},
    {"id": "x-6", "code": "TRUE", "price": "NA", "text": "windows\r\nline break and a backslash \\ at the end\\"},
    {"id": "x-7", "code": "null", "price": "0x1F", "text": '""quoted"" start, comma, end,'},
    {"id": "x-8", "code": "1,000", "price": "1.50", "text": "null"},
]
CSV_TEMPLATE = "[{code}] [{price}] {text}"


def write_tricky_csv(path: Path, lineterminator: str) -> list[dict[str, str]]:
    """Write TRICKY_ROWS with Python's csv module; return the rows as Python reads them back."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(TRICKY_ROWS[0]), lineterminator=lineterminator)
        writer.writeheader()
        writer.writerows(TRICKY_ROWS)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == TRICKY_ROWS  # the file really holds these values
    return rows


@pytest.mark.parametrize("lineterminator", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_csv_values_reach_prompt_and_output_unchanged(server: FakeServer, workdir: Path, lineterminator: str) -> None:
    """Quotes, commas, newlines, non-ASCII, emoji, "007", "1.50", "NULL" reach the server and output as written."""
    rows = write_tricky_csv(workdir / "data" / "in.csv", lineterminator)
    write_job(workdir, server.base_url, input_path="data/in.csv", user=CSV_TEMPLATE)
    assert run_cli("job") == 0
    expected_users = [f"[{r['code']}] [{r['price']}] {r['text']}" for r in rows]
    assert sorted(user_contents(server)) == sorted(expected_users)
    assert server.stats()["requests"] == len(rows)

    table = read_output(out_path(workdir))
    for column in ("id", "code", "price", "text"):
        assert table.schema.field(column).type == pa.string(), column
        assert table.column(column).to_pylist() == [r[column] for r in rows], column
    assert table.column_names[:4] == ["id", "code", "price", "text"]
    completions_match(table, expected_users)


def test_csv_ids_are_text(server: FakeServer, workdir: Path) -> None:
    """CSV ids "007" and "7" are distinct keys, and a rerun finds both in the journal."""
    write_tricky_csv(workdir / "data" / "in.csv", "\n")
    write_job(workdir, server.base_url, input_path="data/in.csv", user=CSV_TEMPLATE)
    assert run_cli("job") == 0
    assert sorted(journal_keys(workdir)) == sorted(r["id"] for r in TRICKY_ROWS)
    assert run_cli("job") == 0
    assert server.stats()["requests"] == len(TRICKY_ROWS)


# --------------------------------------------------------------- Parquet, JSONL, folder


def write_input(workdir: Path, fmt: str, data: dict[str, list[Any]]) -> str:
    """Write ``data`` as ``fmt``; return the job's input path."""
    n = len(data["id"])
    if fmt == "parquet":
        write_parquet(workdir / "data" / "in.parquet", data)
        return "data/in.parquet"
    if fmt == "csv":
        with (workdir / "data" / "in.csv").open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(data))
            writer.writerows(zip(*data.values(), strict=True))
        return "data/in.csv"
    if fmt == "jsonl":
        lines = [json.dumps({k: v[i] for k, v in data.items()}, ensure_ascii=False) for i in range(n)]
        (workdir / "data" / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return "data/in.jsonl"
    assert fmt == "folder"
    # Three files of different sizes, created out of name order: the name decides the order.
    cuts = {"part-a.parquet": (0, n // 2), "part-b.parquet": (n // 2, n // 2 + 3), "part-c.parquet": (n // 2 + 3, n)}
    for name in ("part-c.parquet", "part-a.parquet", "part-b.parquet"):
        lo, hi = cuts[name]
        write_parquet(workdir / "data" / "parts" / name, {k: v[lo:hi] for k, v in data.items()})
        time.sleep(0.01)  # distinct modification times, in non-name order
    return "data/parts"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "folder"])
def test_formats_keep_rows_in_input_order(server: FakeServer, workdir: Path, fmt: str) -> None:
    """Parquet, JSONL and a folder of Parquet files: one output row per input row, in order, each its own reply."""
    data = reviews(23)
    server.config.latency_jitter_s = 0.01  # replies arrive out of order
    write_job(workdir, server.base_url, input_path=write_input(workdir, fmt, data))
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    assert table.num_rows == 23
    assert table.column("id").to_pylist() == data["id"]
    assert table.column("text").to_pylist() == data["text"]
    completions_match(table, [USER_PREFIX + t for t in data["text"]])
    assert server.stats()["requests"] == 23
    assert server.duplicates() == 0


def test_folder_files_with_reordered_columns(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Part files with the same columns in a different order: either matched by name, or refused before sending."""
    write_parquet(workdir / "data" / "parts" / "a.parquet", {"id": [0, 1], "text": ["first", "second"]})
    write_parquet(workdir / "data" / "parts" / "b.parquet", {"text": ["third", "fourth"], "id": [2, 3]})
    write_job(workdir, server.base_url, input_path="data/parts")
    code = main(["run", "job", "--quiet"])
    _, err = capsys.readouterr()
    if code == 2:  # refused: then nothing may have been sent
        assert err.startswith("pipeline: error:") and "Traceback" not in err
        assert server.stats()["requests"] == 0
        return
    assert code == 0, err
    table = read_output(out_path(workdir))
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    assert table.column("text").to_pylist() == ["first", "second", "third", "fourth"]
    completions_match(table, [USER_PREFIX + t for t in ["first", "second", "third", "fourth"]])


def test_jsonl_field_null_in_first_block_then_set(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sparse JSONL field (null for the first ~4 MB, a number later) is valid input and reaches the output."""
    n = 240
    lines = [
        json.dumps({"id": i, "text": f"note {i}", "blob": "x" * 20_000, "score": 1.5 if i >= 230 else None})
        for i in range(n)
    ]
    (workdir / "data" / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert (workdir / "data" / "in.jsonl").stat().st_size > 4 << 20
    write_job(workdir, server.base_url, input_path="data/in.jsonl", limits={"concurrency": 32})
    code = main(["run", "job", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    table = read_output(out_path(workdir))
    assert table.column("score").to_pylist() == [1.5 if i >= 230 else None for i in range(n)]
    assert server.stats()["requests"] == n


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_input_larger_than_one_batch(server: FakeServer, workdir: Path, fmt: str) -> None:
    """50 rows read 7 at a time: every row sent once, output complete and in input order."""
    data = reviews(50)
    server.config.latency_jitter_s = 0.005
    path = write_job(workdir, server.base_url, input_path=write_input(workdir, fmt, data))
    set_batch_size(path, 7)
    assert load_job("job").input.batch_size == 7
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    ids = table.column("id").to_pylist()
    assert [int(i) for i in ids] == data["id"]  # CSV ids are text
    completions_match(table, [USER_PREFIX + t for t in data["text"]])
    assert server.stats()["requests"] == 50
    assert server.duplicates() == 0
    assert len(journal_keys(workdir)) == 50


def test_without_id_column_keys_are_prompt_contents(server: FakeServer, workdir: Path) -> None:
    """No id_column: rows are keyed by prompt (numbered among equal prompts), so edits re-pay nothing else."""
    n = 20
    data = {"id": list(range(n))[::-1], "text": [f"note {i} on shipment {(i * 5) % 7}" for i in range(n)]}
    data["text"][4] = data["text"][9]  # duplicate texts are fine without ids: each is its own row
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(workdir, server.base_url, id_column=None)
    assert run_cli("job") == 0
    keys = journal_keys(workdir)
    assert len(keys) == n and sum(k.endswith("#2") for k in keys) == 1
    table = read_output(out_path(workdir))
    assert table.column("id").to_pylist() == data["id"]
    completions_match(table, [USER_PREFIX + t for t in data["text"]])
    requests = server.stats()["requests"]
    assert run_cli("job") == 0
    assert server.stats()["requests"] == requests

    # Delete the first row and insert a new one in the middle: only the new row is sent.
    edited = {name: values[1:] for name, values in data.items()}
    edited["id"].insert(5, 100)
    edited["text"].insert(5, "a brand new note")
    write_parquet(workdir / "data" / "in.parquet", edited)
    assert run_cli("job") == 0
    assert server.stats()["requests"] == requests + 1
    table = read_output(out_path(workdir))
    assert table.column("id").to_pylist() == edited["id"]
    completions_match(table, [USER_PREFIX + t for t in edited["text"]])


# ------------------------------------------------------------------- output schema


def test_output_schema_when_every_row_succeeds(server: FakeServer, workdir: Path) -> None:
    """Input columns first, then the documented result columns with their exact types; error all null."""
    data = reviews(6)
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(workdir, server.base_url)
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    assert table.column_names == ["id", "text", *RESULT_SCHEMA.names]
    assert table.schema.field("id").type == pa.int64()
    assert result_part(table, 2) == RESULT_SCHEMA
    assert table.column("error").null_count == 6
    rows = table.to_pylist()
    assert all(r["finish_reason"] == "stop" and r["model"] == "mistralai/ministral-8b" for r in rows)
    assert all(r["provider"] == "FakeProvider" and r["generation_id"].startswith("gen-") for r in rows)
    assert all(r["attempts"] == 1 and r["latency_s"] >= 0 and r["cost_usd"] > 0 for r in rows)


def test_output_schema_when_every_row_fails(server: FakeServer, workdir: Path) -> None:
    """All rows refused with 400: result columns keep their types although almost all are null."""
    data = reviews(6)
    write_parquet(workdir / "data" / "in.parquet", data)
    server.config.script = {"review": ["400"] * 20}
    write_job(workdir, server.base_url)
    assert run_cli("job") == 1
    assert server.stats()["requests"] == 6  # a 400 is not retried
    table = read_output(out_path(workdir))
    assert result_part(table, 2) == RESULT_SCHEMA
    for column in ("completion", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "generation_id"):
        assert table.column(column).null_count == 6, column
    errors = table.column("error").to_pylist()
    assert all(e is not None and e.startswith("HTTP 400") for e in errors), errors
    assert table.column("attempts").to_pylist() == [1] * 6


def test_provider_null_when_server_omits_it(server: FakeServer, workdir: Path) -> None:
    """A response without ``provider`` gives a null provider, not a made-up value."""
    server.config.provider_name = None
    write_parquet(workdir / "data" / "in.parquet", reviews(5))
    write_job(workdir, server.base_url)
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    assert table.column("provider").to_pylist() == [None] * 5
    assert table.schema.field("provider").type == pa.string()
    assert table.column("model").null_count == 0
    assert table.column("generation_id").null_count == 0


def test_token_and_cost_columns_sum_to_server_totals(server: FakeServer, workdir: Path) -> None:
    """Token columns add up to what the server counted and cost_usd to what it billed (retries included)."""
    server.config.retry_after = "0"
    server.config.script = {
        "number 3 about": ["500", "502"],
        "number 11 about": ["429"],
        "number 17 about": ["error200"],
    }
    write_parquet(workdir / "data" / "in.parquet", reviews(30))
    write_job(workdir, server.base_url)
    assert run_cli("job") == 0
    stats = server.stats()
    assert stats["requests"] == 34
    table = read_output(out_path(workdir))
    assert sum(table.column("prompt_tokens").to_pylist()) == stats["prompt_tokens"]
    assert sum(table.column("completion_tokens").to_pylist()) == stats["completion_tokens"]
    assert sum(table.column("cost_usd").to_pylist()) == pytest.approx(stats["cost"], abs=1e-9)
    attempts = dict(zip(table.column("id").to_pylist(), table.column("attempts").to_pylist(), strict=True))
    assert (attempts[3], attempts[11], attempts[17], attempts[0]) == (3, 2, 2, 1)


# ------------------------------------------------------------------ atomic output


def test_output_replaced_only_at_the_end(server: FakeServer, workdir: Path) -> None:
    """An existing output stays intact while a run is sending, is replaced at the end; no temp files remain."""
    write_parquet(workdir / "data" / "in.parquet", reviews(24))
    out = out_path(workdir)
    write_parquet(out, {"sentinel": ["previous run"]})
    old_bytes = out.read_bytes()
    server.config.latency_s = 0.05
    write_job(workdir, server.base_url, limits={"concurrency": 2})
    proc = spawn(workdir, "run", "job", "--quiet")
    try:
        deadline = time.monotonic() + 30
        while server.stats()["requests"] < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be observed mid-way"
        assert 6 <= server.stats()["requests"] < 24
        assert out.read_bytes() == old_bytes  # mid-run: the old output, untouched
        assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    table = read_output(out)
    assert table.num_rows == 24 and "sentinel" not in table.column_names
    names = {p.name for p in out.parent.iterdir()}
    allowed = {
        "job.parquet",
        "job.parquet.journal.sqlite",
        "job.parquet.journal.sqlite-wal",
        "job.parquet.journal.sqlite-shm",
        "job.parquet.journal.sqlite.lock",
    }
    assert names <= allowed, f"unexpected files beside the output: {sorted(names - allowed)}"


def test_failed_validation_leaves_existing_output_alone(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job that fails its checks (exit 2) neither touches the old output nor leaves files beside it."""
    out = out_path(workdir)
    write_parquet(out, {"sentinel": ["previous run"]})
    old_bytes = out.read_bytes()
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, user="{missing_column}")
    assert main(["run", "job", "--quiet"]) == 2
    capsys.readouterr()
    assert out.read_bytes() == old_bytes
    assert [p.name for p in out.parent.iterdir()] == ["job.parquet"]


# ------------------------------------------------------------- structured outputs


def test_labels_end_to_end(server: FakeServer, workdir: Path) -> None:
    """Labels over 100 rows: each row gets the server's label; json_schema with enum and require_parameters sent."""
    data = reviews(100)
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(
        workdir,
        server.base_url,
        prompt_extra=LABELS_EXTRA,
        model={"provider": "openrouter", "max_tokens": 32},
        limits={"concurrency": 16},
    )
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    assert table.schema.field("label").type == pa.string()
    assert table.column_names[-1] == "label"
    users = [USER_PREFIX + t for t in data["text"]]
    assert table.column("label").to_pylist() == [expected_label(u, LABELS) for u in users]
    assert len(set(table.column("label").to_pylist())) == 3
    bodies = [b["body"] for b in server.stats()["bodies"]]
    assert len(bodies) == 100
    for body in bodies:
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
        assert body["provider"]["require_parameters"] is True
        assert body["max_tokens"] == 32


def test_json_schema_end_to_end(server: FakeServer, workdir: Path) -> None:
    """An inline JSON schema gives one typed column per property with the server's values."""
    data = reviews(12)
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(
        workdir,
        server.base_url,
        prompt_extra=REVIEW_SCHEMA_TOML,
        model={"provider": "openrouter", "max_tokens": 256},
    )
    assert load_job("job").prompt.json_schema == REVIEW_SCHEMA
    assert run_cli("job") == 0
    table = read_output(out_path(workdir))
    assert pa.schema(list(table.schema)[-len(REVIEW_COLUMNS) :]) == REVIEW_COLUMNS
    assert result_part(table, 2) == RESULT_SCHEMA
    got = table.select(REVIEW_COLUMNS.names).to_pylist()
    assert got == [expected_json(USER_PREFIX + t, REVIEW_SCHEMA) for t in data["text"]]
    assert all(b["body"]["response_format"]["type"] == "json_schema" for b in server.stats()["bodies"])


def invalid_reply_job(server: FakeServer, workdir: Path, extra: str = "") -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(10))
    write_job(
        workdir,
        server.base_url,
        prompt_extra=LABELS_EXTRA + extra,
        model={"provider": "openrouter", "max_tokens": 32},
    )


def test_invalid_replies_are_kept_and_not_rerequested(server: FakeServer, workdir: Path) -> None:
    """Invalid replies keep the raw completion, a null label and an "invalid reply" error.

    A rerun does not ask again; ``--retry-failed`` does.
    """
    server.config.script = {"number 3 about": ["invalid_json"], "number 5 about": ["wrong_label"]}
    invalid_reply_job(server, workdir)
    assert run_cli("job") == 1
    assert server.stats()["requests"] == 10
    rows = {r["id"]: r for r in read_output(out_path(workdir)).to_pylist()}
    assert rows[3]["completion"] == "this is not json"
    assert rows[5]["completion"] == '{"label": "not-a-label"}'
    for i in (3, 5):
        assert rows[i]["label"] is None
        assert rows[i]["error"].startswith("invalid reply"), rows[i]["error"]
        assert rows[i]["prompt_tokens"] > 0  # it was billed: the usage is kept
    assert all(rows[i]["error"] is None and rows[i]["label"] in LABELS for i in rows if i not in (3, 5))

    assert run_cli("job") == 1  # the output still has two bad rows
    assert server.stats()["requests"] == 10
    rows_again = {r["id"]: r for r in read_output(out_path(workdir)).to_pylist()}
    assert rows_again[3]["completion"] == "this is not json"

    assert run_cli("job", "--retry-failed") == 0
    assert server.stats()["requests"] == 12
    table = read_output(out_path(workdir))
    users = [USER_PREFIX + t for t in reviews(10)["text"]]
    assert table.column("label").to_pylist() == [expected_label(u, LABELS) for u in users]
    assert table.column("error").null_count == 10


def test_retry_invalid_rerequests_once(server: FakeServer, workdir: Path) -> None:
    """``retry_invalid = 1``: an invalid reply is asked again once in the same run."""
    server.config.script = {"number 3 about": ["invalid_json"], "number 5 about": ["invalid_json", "wrong_label"]}
    invalid_reply_job(server, workdir, "\nretry_invalid = 1")
    assert run_cli("job") == 1
    assert server.stats()["requests"] == 12  # rows 3 and 5 asked twice, no more
    rows = {r["id"]: r for r in read_output(out_path(workdir)).to_pylist()}
    assert rows[3]["label"] == expected_label(USER_PREFIX + reviews(10)["text"][3], LABELS)
    assert rows[3]["error"] is None
    assert rows[5]["label"] is None
    assert rows[5]["completion"] == '{"label": "not-a-label"}'  # the latest reply is kept
    assert rows[5]["error"].startswith("invalid reply")


def test_retry_invalid_cost_is_in_cost_column(server: FakeServer, workdir: Path) -> None:
    """Every billed reply, including the invalid one asked again, is in the cost_usd column."""
    server.config.script = {"number 3 about": ["invalid_json"]}
    invalid_reply_job(server, workdir, "\nretry_invalid = 1")
    assert run_cli("job") == 0
    stats = server.stats()
    assert stats["requests"] == 11
    table = read_output(out_path(workdir))
    assert sum(table.column("cost_usd").to_pylist()) == pytest.approx(stats["cost"], abs=1e-12)


# ------------------------------------------------------- llama.cpp dialect (local)


def schema_job_plan(server: FakeServer, workdir: Path, provider: str) -> Any:
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(
        workdir,
        server.base_url,
        prompt_extra=REVIEW_SCHEMA_TOML,
        model={"provider": provider, "max_tokens": 256},
    )
    return prepare(load_job("job"))


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_local_profile_sends_json_object_with_schema(server: FakeServer, workdir: Path) -> None:
    """The local profile sends ``{"type": "json_object", "schema": ...}``, which llama-cpp-python accepts."""
    server.config.llamacpp_mode = True
    plan = schema_job_plan(server, workdir, "local")  # prepare() starts no server
    dialect = plan.dialect(server.base_url)
    assert dialect.url == f"{server.base_url}/chat/completions"
    messages = [{"role": "user", "content": "Rate this kettle"}]
    body = dialect.body(messages)
    sent = json.loads(body)
    assert sent["response_format"] == {"type": "json_object", "schema": plan.structured.schema}
    assert "provider" not in sent and "json_schema" not in sent["response_format"]
    status, reply = post(dialect.url, body)
    assert status == 200, reply
    assert json.loads(reply["choices"][0]["message"]["content"]) == expected_json("Rate this kettle", REVIEW_SCHEMA)

    # The OpenAI form of the same request is what llama-cpp-python refuses.
    openai = Dialect(
        ModelSpec(provider="openai", base_url=server.base_url),
        plan.model_name,
        request_fields(plan.structured, "openai"),
    )
    status, reply = post(openai.url, openai.body(messages))
    assert status == 500 and reply["error"]["message"] == LLAMACPP_SCHEMA_ERROR


def test_openai_profile_against_llamacpp_server_fails_rows_visibly(server: FakeServer, workdir: Path) -> None:
    """Pointing the openai dialect at a llama-cpp-python server fails every row with the server's message."""
    server.config.llamacpp_mode = True
    schema_job_plan(server, workdir, "openai")
    path = workdir / "jobs" / "job.toml"
    path.write_text(path.read_text(encoding="utf-8").replace("max_attempts = 4", "max_attempts = 1"), encoding="utf-8")
    assert run_cli("job") == 1
    assert server.stats()["requests"] == 3
    errors = read_output(out_path(workdir)).column("error").to_pylist()
    assert all(e is not None and "json_object" in e for e in errors), errors
