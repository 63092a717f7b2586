"""The canary through the CLI, against the loopback servers (tests/fakeserver.py, tests/fakebatch.py).

A broken job must stop after its canary (exit 3, one line naming the problem),
having paid for at most the canary; a healthy job must send every row exactly
once (the canary's rows are part of the job); a rerun continues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.conftest import TEST_KEY, reviews, write_job, write_parquet
from tests.fakes.batch import FakeBatchServer
from tests.fakes.server import FakeServer

ROWS = 3000
LABELS = 'labels = ["positive", "negative", "neutral"]'
OUTPUT = Path("data/out/job.parquet")


def job(workdir: Path, server: FakeServer | FakeBatchServer, rows: int = ROWS, **kwargs: Any) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(rows))
    limits = {"concurrency": 32, "max_attempts": 2, **kwargs.pop("limits", {})}
    write_job(workdir, server.base_url, limits=limits, **kwargs)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """``pipeline run job --json``: the exit code, the summary, and what went to stderr."""
    code = main(["run", "job", "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_plain_text_answers_to_a_labels_job_stop_after_the_canary(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.config.fail_rate, server.config.fail_kind = 1.0, "invalid_json"  # a model that ignores the schema
    job(workdir, server, prompt_extra=LABELS)
    code, summary, _ = run(capsys)
    requests = server.stats()["requests"]
    assert code == 3
    assert requests <= 64 and requests == summary["requests"] == 20
    reason = summary["stop_reason"]
    assert reason.startswith("canary failed: 20 of 20 canary rows (100%) are invalid structured replies")
    assert "this is not json" in reason and "\n" not in reason
    assert summary["canary"]["status"] == "failed" and summary["canary"]["failure"] == "invalid"
    # The canary's rows are journaled: the output holds them, the other rows wait.
    rows = pq.read_table(OUTPUT).to_pylist()
    assert sum((r["error"] or "").startswith("invalid reply") for r in rows) == 20
    assert sum(r["completion"] is None for r in rows) == ROWS - 20

    # The model fixed (here: the server), a rerun continues: nothing is paid twice.
    server.config.fail_rate = 0.0
    code, summary, _ = run(capsys)
    assert summary["canary"]["status"] == "passed"
    assert code == 1  # the first canary's 20 invalid rows stay (--retry-failed sends them again)
    assert server.stats()["requests"] == ROWS
    assert server.duplicates() == 0


def test_max_tokens_that_cuts_every_reply_stops_after_the_canary(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    job(workdir, server, model={"max_tokens": 3})  # a typo for 300
    code, summary, _ = run(capsys)
    assert code == 3
    assert server.stats()["requests"] <= 64
    reason = summary["stop_reason"]
    assert "cut off by max_tokens = 3" in reason and "raise [model] max_tokens" in reason
    assert summary["canary"]["completion_tokens_max"] == 3


def test_a_healthy_job_sends_every_row_once(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    job(workdir, server, prompt_extra=LABELS)
    code, summary, _ = run(capsys)
    assert code == 0
    assert server.stats()["requests"] == ROWS == summary["requests"] == summary["rows_ok"]
    assert server.duplicates() == 0
    canary = summary["canary"]
    assert canary["status"] == "passed" and canary["rows"] == 20
    # A label is a few tokens: max_tokens 64 is far above what replies use.
    assert canary["completion_tokens_max"] <= canary["max_tokens_suggested"] < 64


def test_the_summary_reports_the_canary(workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    job(workdir, server, rows=200, prompt_extra=LABELS)
    assert main(["run", "job"]) == 0
    out = capsys.readouterr().out
    assert "canary: passed on its first 20 rows; completion tokens p50" in out
    assert "[model] max_tokens = 32 would fit them" in out


@pytest.mark.parametrize(
    ("rows", "limits", "args", "first_wave"),
    [
        (99, {}, (), 99),  # fewer than 100 rows to send: no canary
        (300, {"canary_rows": 0}, (), 300),
        (300, {}, ("--no-canary",), 300),
        (300, {"canary_rows": 5}, (), 5),
    ],
)
def test_when_there_is_a_canary(
    workdir: Path,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    rows: int,
    limits: dict[str, Any],
    args: tuple[str, ...],
    first_wave: int,
) -> None:
    server.config.fail_rate, server.config.fail_kind = 1.0, "invalid_json"
    job(workdir, server, rows=rows, prompt_extra=LABELS, limits=limits)
    code, _, _ = run(capsys, *args)
    assert server.stats()["requests"] == first_wave
    assert code == (3 if first_wave < rows else 1)


def test_permanent_errors_stop_after_the_canary_and_the_key_never_shows(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 400 that echoes the request's Authorization header back.
    server.config.fail_rate, server.config.fail_kind = 1.0, "echo_auth:400"
    job(workdir, server)
    code, summary, err = run(capsys)
    assert code == 3 and server.stats()["requests"] <= 64
    assert "refused by the provider" in summary["stop_reason"]
    assert TEST_KEY not in json.dumps(summary) and TEST_KEY not in err


def test_the_python_api_runs_the_canary_and_can_skip_it(workdir: Path, server: FakeServer) -> None:
    import pipeline

    server.config.fail_rate, server.config.fail_kind = 1.0, "invalid_json"
    job(workdir, server, rows=300, prompt_extra=LABELS)
    result = pipeline.run(job="job", progress=False)
    assert result.exit_code == 3 and server.stats()["requests"] == 20
    assert result.summary.canary is not None and result.summary.canary.failure == "invalid"
    result = pipeline.run(job="job", progress=False, canary=False)
    assert result.exit_code == 1 and server.stats()["requests"] == 300


# ----------------------------------------------------------------------------- batch mode


def batch_job(workdir: Path, server: FakeBatchServer, rows: int = ROWS, **model: Any) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(rows))
    spec = {"mode": "batch", "provider": server.config.flavour, "batch_poll_s": 0.05, **model}
    write_job(workdir, server.base_url, model=spec)


def submitted(server: FakeBatchServer) -> list[int]:
    with server.lock:
        return [n for _, n in server.submissions]


def test_batch_mode_stops_a_broken_job_after_its_canary_batch(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeBatchServer(flavour="openrouter", complete_after_s=0.05)
    with server.running():
        batch_job(workdir, server, max_tokens=3)
        code, summary, _ = run(capsys)
        assert code == 3
        assert submitted(server) == [20]
        assert "cut off by max_tokens = 3" in summary["stop_reason"]
        assert server.chat_requests == 0


def test_batch_mode_sends_the_rest_after_a_healthy_canary(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = FakeBatchServer(flavour="openrouter", complete_after_s=0.05)
    with server.running():
        batch_job(workdir, server)
        code, summary, _ = run(capsys)
        assert code == 0
        assert submitted(server) == [20, ROWS - 20]
        assert server.duplicates() == 0
        assert summary["canary"]["status"] == "passed"


def test_no_wait_submits_the_canary_batch_and_the_next_run_judges_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeBatchServer(flavour="openrouter", complete_after_s=0.05)
    with server.running():
        batch_job(workdir, server, rows=500)
        code, summary, _ = run(capsys, "--no-wait")
        assert code == 3 and submitted(server) == [20]
        assert "canary batch" in summary["stop_reason"] and summary["canary"]["status"] == "pending"
        import time

        time.sleep(0.1)  # the fake completes the batch
        code, summary, _ = run(capsys, "--no-wait")
        assert summary["canary"]["status"] == "passed"
        assert submitted(server) == [20, 480]
        assert code == 3  # the rest is pending
        time.sleep(0.1)
        code, summary, _ = run(capsys)
        assert code == 0 and server.duplicates() == 0


def test_the_sample_estimate_reports_the_same_token_figures(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    job(workdir, server, rows=200, prompt_extra=LABELS)
    assert main(["run", "job", "--sample", "30"]) == 0
    out = capsys.readouterr().out
    assert "answered rows used p50 2, p95 2, longest 2 (max_tokens = 32 would fit them)" in out
    assert main(["run", "job", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["output_tokens_longest"], report["max_tokens_suggested"]) == (2, 32)


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_engine_stops_a_broken_job_after_its_canary(workdir: Path) -> None:
    pytest.importorskip("ray")
    from tests.conftest import spawn

    server = FakeServer(fail_rate=1.0, fail_kind="invalid_json", record_bodies=False)
    with server.running():
        job(workdir, server, rows=1000, prompt_extra=LABELS, limits={"requests_per_minute": 60000})
        proc = spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--json")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 3, err
        summary = json.loads(out)
        assert summary["engine"] == "ray" and summary["canary"]["failure"] == "invalid"
        assert server.stats()["requests"] == 20
        assert "canary failed: 20 of 20 canary rows" in summary["stop_reason"]
        # The same job, healthy: every row once, the canary's among them.
        server.config.fail_rate = 0.0
        proc = spawn(workdir, "run", "job", "--engine", "ray", "--workers", "2", "--json")
        out, err = proc.communicate(timeout=300)
        summary = json.loads(out)
        assert summary["canary"]["status"] == "passed", err
        assert server.stats()["requests"] == 1000 and server.duplicates() == 0
