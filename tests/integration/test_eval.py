"""``pipeline eval`` and ``pipeline report`` against the loopback server.

The server answers labels deterministically: in ``label_mode = "text"`` it
picks the label the row's text names, so each test writes the answers it
wants into the data and the gold column agrees with them on a known share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.app import main
from tests.conftest import write_job, write_parquet
from tests.fakes.server import FakeServer, expected_label

LABELS = ["positive", "negative", "neutral"]
P, N, U = LABELS
LABELS_TOML = 'labels = ["positive", "negative", "neutral"]'


def label_rows(n: int, agree: int) -> dict[str, list[Any]]:
    """Row i names label i % 3 (the server's answer); gold agrees on the first ``agree`` rows
    and is the next label in the list on the others."""
    texts = [f"item {i}: this one is {LABELS[i % 3]}" for i in range(n)]
    gold = [LABELS[i % 3] if i < agree else LABELS[(i + 1) % 3] for i in range(n)]
    return {"id": list(range(n)), "text": texts, "gold": gold}


@pytest.mark.parametrize(
    ("message", "mode", "expected"),
    [
        ("this one is negative", "text", N),
        ("NEUTRAL, though positive later", "text", U),  # the first label named wins, any case
        ("positively negative", "text", N),  # whole words only: "positively" is not "positive"
    ],
)
def test_fakeserver_text_label_mode(message: str, mode: str, expected: str) -> None:
    assert expected_label(message, LABELS, mode) == expected


def test_fakeserver_text_mode_falls_back_to_the_hash() -> None:
    assert expected_label("names no label", LABELS, "text") == expected_label("names no label", LABELS)


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["eval", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def label_server() -> Any:
    srv = FakeServer(label_mode="text")
    with srv.running():
        yield srv


def label_job(workdir: Path, server: FakeServer, **kw: Any) -> Path:
    return write_job(workdir, server.base_url, user="Classify: {text}", prompt_extra=LABELS_TOML, **kw)


def test_accuracy_exactly_seventy_percent(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(300, agree=210))
    label_job(workdir, label_server)
    code, r = eval_json(capsys, "job", "--gold", "gold")
    assert code == 0
    assert r["rows"] == 300
    assert r["accuracy"] == 0.7
    # Rows 210..299 disagree, 30 of each: answer positive/gold negative, negative/neutral, neutral/positive.
    assert r["confusion"] == {
        P: {P: 70, N: 0, U: 30},
        N: {P: 30, N: 70, U: 0},
        U: {P: 0, N: 30, U: 70},
    }
    for label in LABELS:
        assert r["per_label"][label] == pytest.approx({"precision": 0.7, "recall": 0.7, "f1": 0.7, "support": 100})
    assert list(r["per_label"]) == LABELS  # the job's order, not sorted
    assert r["rows_with_error"] == 0
    assert label_server.stats()["requests"] == 300
    # The schema sent keeps the labels in the job's order (the confusion matrix and tables follow it).
    sent = label_server.stats()["bodies"][0]["body"]["response_format"]["json_schema"]["schema"]
    assert sent["properties"]["label"]["enum"] == LABELS
    # Cost: what the server billed for these rows, and the job's 300 rows at that rate.
    assert r["cost_usd"] == pytest.approx(label_server.stats()["cost"])
    assert r["cost_usd_full_run_expected"] == pytest.approx(r["cost_usd"])
    chart, report = Path(r["chart"]), Path(r["report"])
    assert chart.read_bytes().startswith(b"\x89PNG")
    page = report.read_text()
    assert "0.700" in page and "data:image/png;base64," in page

    label_server.reset()
    assert main(["run", "job", "--quiet"]) == 0
    assert label_server.stats()["requests"] == 0  # the evaluation's answers are the run's


def test_sample_then_run_pays_only_the_rest(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(300, agree=300))
    label_job(workdir, label_server)
    code, r = eval_json(capsys, "job", "--gold", "gold", "--sample", "40", "--seed", "3")
    assert (code, r["rows"], r["accuracy"]) == (0, 40, 1.0)
    assert label_server.stats()["requests"] == 40
    # 300 rows at the observed cost per row.
    assert r["cost_usd_full_run_expected"] == pytest.approx(r["cost_usd"] / 40 * 300)
    label_server.reset()
    code, again = eval_json(capsys, "job", "--gold", "gold", "--sample", "40", "--seed", "3")
    assert label_server.stats()["requests"] == 0 and again["cost_usd_paid_now"] == 0
    assert again["cost_usd"] == r["cost_usd"]
    assert main(["run", "job", "--quiet"]) == 0
    assert label_server.stats()["requests"] == 260


def test_errors_and_invalid_replies_count_as_wrong(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(30, agree=30))
    label_job(workdir, label_server, limits={"max_attempts": 1})
    label_server.config.script = {"item 4:": ["wrong_label"], "item 7:": ["400"], "item 9:": ["invalid_json"]}
    code, r = eval_json(capsys, "job", "--gold", "gold")
    assert code == 0
    assert (r["rows"], r["correct"], r["rows_with_error"]) == (30, 27, 3)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["errors_by_status"] == {"invalid": 2, "failed": 1}
    # item 4 and item 7 name "negative" (4 % 3 == 1), item 9 "positive".
    assert r["confusion"][N]["(error)"] == 2 and r["confusion"][P]["(error)"] == 1
    assert r["per_label"][N]["recall"] == pytest.approx(8 / 10)
    assert {m["key"] for m in r["mistakes"]} == {"4", "7", "9"}
    assert "rows had no usable answer" in Path(r["report"]).read_text()


VARIANTS = """
[[variants]]
name = "8b"
model = { name = "mistralai/ministral-8b" }

[[variants]]
name = "3b"
model = { name = "mistralai/ministral-3b" }
"""


def test_variants_same_rows_cost_ratio_and_rerun_free(workdir: Path, capsys: Any) -> None:
    # No usage.cost in replies: each model's cost comes from pipeline/prices.json (0.10 vs 0.04 per million).
    server = FakeServer(label_mode="text", include_cost=False)
    with server.running():
        write_parquet(workdir / "data/in.parquet", label_rows(400, agree=300))
        path = label_job(workdir, server)
        path.write_text(path.read_text() + VARIANTS)
        code, r = eval_json(capsys, "job", "--gold", "gold", "--sample", "100", "--seed", "7")
        assert code == 0
        bodies = server.stats()["bodies"]
        asked: dict[str, set[str]] = {}
        for b in bodies:
            asked.setdefault(b["body"]["model"], set()).add(b["body"]["messages"][-1]["content"])
        assert len(bodies) == 200
        assert set(asked) == {"mistralai/ministral-8b", "mistralai/ministral-3b"}
        assert asked["mistralai/ministral-8b"] == asked["mistralai/ministral-3b"]  # the same rows
        assert len(asked["mistralai/ministral-8b"]) == 100
        by_name = {v["name"]: v for v in r["variants"]}
        assert list(by_name) == ["8b", "3b"]
        assert by_name["8b"]["cost_usd"] / by_name["3b"]["cost_usd"] == pytest.approx(0.10 / 0.04)
        assert by_name["8b"]["cost_per_1k_rows"] == pytest.approx(by_name["8b"]["cost_usd"] * 10)
        assert by_name["8b"]["accuracy"] == by_name["3b"]["accuracy"] == r["accuracy"]
        # Equally accurate: the cheaper one is recommended and alone on the frontier.
        assert r["recommended"] == "3b"
        assert (by_name["3b"]["frontier"], by_name["8b"]["frontier"]) == (True, False)
        assert Path(r["variants_chart"]).read_bytes().startswith(b"\x89PNG")
        journals = {Path(v["journal"]).name for v in r["variants"]}
        assert journals == {"job.parquet.journal.variant-8b.sqlite", "job.parquet.journal.variant-3b.sqlite"}

        server.reset()
        code, again = eval_json(capsys, "job", "--gold", "gold", "--sample", "100", "--seed", "7")
        assert code == 0 and server.stats()["requests"] == 0
        assert [v["cost_usd"] for v in again["variants"]] == [v["cost_usd"] for v in r["variants"]]
        # pipeline run ignores variants: the base job has its own, empty journal.
        assert main(["run", "job", "--quiet"]) == 0
        assert server.stats()["requests"] == 400


def test_report_has_charts(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(60, agree=50))
    label_job(workdir, label_server)
    label_server.config.script = {"item 4:": ["400"]}
    assert main(["run", "job", "--quiet", "--retry-failed"]) in (0, 1)
    capsys.readouterr()
    assert main(["report", "job", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    page = Path(r["report"]).read_text()
    assert r["charts"] >= 3 and page.count("data:image/png;base64,") == r["charts"]
    assert r["rows"] == 60 and r["rows_by_status"] == {"ok": 59, "failed": 1}
    assert r["labels"] == {P: 20, N: 19, U: 20, "(no answer)": 1}
    assert r["errors"] == {"HTTP 400": 1}


TWO_PROPERTIES = 'json_schema = { type = "object", properties = { a = { type = "string" }, b = { type = "number" } } }'


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("labels", ["--gold", "nope"], "--gold 'nope': no such column"),
        ("text", ["--gold", "gold"], "give the job [prompt] labels or a JSON schema"),
        ("schema", ["--gold", "gold"], "name the one to compare with --field"),
        ("schema", ["--gold", "gold", "--field", "colour"], "--field 'colour' is not a property"),
        ("empty_gold", ["--gold", "gold"], "every cell of the column is empty"),
    ],
)
def test_user_mistakes_exit_2_and_send_nothing(
    workdir: Path, label_server: FakeServer, capsys: Any, setup: str, args: list[str], message: str
) -> None:
    rows = label_rows(10, agree=10)
    if setup == "empty_gold":
        rows["gold"] = [None] * 10
    write_parquet(workdir / "data/in.parquet", rows)
    extra = {
        "labels": LABELS_TOML,
        "empty_gold": LABELS_TOML,
        "text": "",
        "schema": TWO_PROPERTIES,
    }[setup]
    write_job(workdir, label_server.base_url, user="Classify: {text}", prompt_extra=extra)
    capsys.readouterr()
    assert main(["eval", "job", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert label_server.stats()["requests"] == 0


def test_schema_field(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    rows = label_rows(30, agree=21)
    write_parquet(workdir / "data/in.parquet", rows)
    schema = (
        'json_schema = { type = "object", properties = { sentiment = { type = "string", '
        'enum = ["positive", "negative", "neutral"] }, score = { type = "integer" } } }'
    )
    write_job(workdir, label_server.base_url, user="Classify: {text}", prompt_extra=schema)
    code, r = eval_json(capsys, "job", "--gold", "gold", "--field", "sentiment")
    assert (code, r["field"], r["accuracy"]) == (0, "sentiment", 0.7)
    assert list(r["per_label"]) == LABELS


def test_python_api_dataframe_then_run_pays_nothing(workdir: Path, label_server: FakeServer) -> None:
    import pandas as pd

    import pipeline

    df = pd.DataFrame(label_rows(30, agree=24))
    job = {
        "name": "api_eval",
        "prompt": {"user": "Classify: {text}", "labels": LABELS},
        "model": {"base_url": label_server.base_url, "max_tokens": 20},
        "limits": {"requests_per_minute": 0},
    }
    ev = pipeline.evaluate(df, job, gold="gold", progress=False)
    assert isinstance(ev, pipeline.Evaluation)
    assert (ev.rows, ev.accuracy) == (30, 0.8)
    assert ev.per_label[P].support == 10 and ev.confusion[U][N] == 2  # rows 25 and 28
    assert ev.chart.exists() and ev.report.exists()
    assert label_server.stats()["requests"] == 30
    label_server.reset()
    result = pipeline.run(df, job, progress=False)
    assert result.ok and label_server.stats()["requests"] == 0
    assert result.table.column("label").to_pylist() == [LABELS[i % 3] for i in range(30)]


async def test_python_api_inside_a_running_loop(workdir: Path, label_server: FakeServer) -> None:
    import pipeline

    write_parquet(workdir / "data/in.parquet", label_rows(12, agree=6))
    label_job(workdir, label_server)
    ev = pipeline.evaluate(job="jobs/job.toml", gold="gold", progress=False)  # a notebook cell: a helper thread
    assert ev.accuracy == 0.5
    again = await pipeline.aevaluate(job="jobs/job.toml", gold="gold", progress=False)
    assert again.accuracy == 0.5 and again.results[0].cost_usd_paid_now == 0


def test_variant_prompt_override_without_id_column(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    # Without an id column a row's journal key is its prompt: each variant's own keys must be used.
    write_parquet(workdir / "data/in.parquet", label_rows(30, agree=27))
    path = label_job(workdir, label_server, id_column=None)
    path.write_text(
        path.read_text()
        + '\n[[variants]]\nname = "plain"\n\n[[variants]]\nname = "careful"\n'
        + 'prompt = { user = "Classify carefully: {text}" }\n'
    )
    code, r = eval_json(capsys, "job", "--gold", "gold", "--min-accuracy", "0.5")
    assert code == 0
    assert [(v["name"], v["accuracy"], v["rows_with_error"]) for v in r["variants"]] == [
        ("plain", 0.9, 0),
        ("careful", 0.9, 0),
    ]
    assert label_server.stats()["requests"] == 60


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ('[[variants]]\nname = "a"\nmodel = { nam = "x" }\n', "[[variants]] a: [model] nam: unknown key"),
        ('[[variants]]\nname = "a"\n\n[[variants]]\nname = "a"\n', "[[variants]] name 'a' appears twice"),
        ('[[variants]]\nname = "a"\ninput = { path = "other.csv" }\n', "[variants] 0.input: unknown key"),
        ('[[variants]]\nname = "a b"\n', "[variants] 0.name: String should match pattern"),
    ],
)
def test_bad_variants_are_job_errors(
    workdir: Path, label_server: FakeServer, capsys: Any, variants: str, message: str
) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(5, agree=5))
    path = label_job(workdir, label_server)
    path.write_text(path.read_text() + "\n" + variants)
    for command in (["eval", "job", "--gold", "gold"], ["run", "job"]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert label_server.stats()["requests"] == 0


def test_report_without_journal_is_a_user_error(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(5, agree=5))
    label_job(workdir, label_server)
    assert main(["report", "job"]) == 2
    assert "no journal at data/out/job.parquet.journal.sqlite" in capsys.readouterr().err


def test_budget_stop_exits_3_and_a_rerun_finishes(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(50, agree=50))
    # Each request's worst case is about (12 prompt + 20 max_tokens) x $0.10/M: room for a few rows only.
    label_job(workdir, label_server, limits={"budget_usd": 0.00002, "concurrency": 1}, model={"max_tokens": 20})
    code, r = eval_json(capsys, "job", "--gold", "gold")
    assert code == 3 and "budget" in r["stop_reason"]
    sent = label_server.stats()["requests"]
    assert 0 < sent < 50
    assert r["rows_with_error"] == 50 - sent and r["errors_by_status"] == {"not_run": 50 - sent}
    # The full run is extrapolated from the rows answered, not diluted by the rows never sent.
    assert r["cost_usd_full_run_expected"] == pytest.approx(r["cost_usd"] / sent * 50)
    path = workdir / "jobs/job.toml"
    path.write_text(path.read_text().replace("budget_usd = 2e-05", "budget_usd = 1.0"))
    code, r = eval_json(capsys, "job", "--gold", "gold")
    assert (code, r["accuracy"], r["requests"]) == (0, 1.0, 50 - sent)


def test_changed_prompt_needs_fresh(workdir: Path, label_server: FakeServer, capsys: Any) -> None:
    write_parquet(workdir / "data/in.parquet", label_rows(9, agree=9))
    path = label_job(workdir, label_server)
    assert eval_json(capsys, "job", "--gold", "gold")[1]["accuracy"] == 1.0
    path.write_text(path.read_text().replace("Classify: {text}", "Label: {text}"))
    capsys.readouterr()
    assert main(["eval", "job", "--gold", "gold"]) == 2
    assert "--fresh" in capsys.readouterr().err
    code, r = eval_json(capsys, "job", "--gold", "gold", "--fresh")
    assert (code, r["requests"], r["accuracy"]) == (0, 9, 1.0)
