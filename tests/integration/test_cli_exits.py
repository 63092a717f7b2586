"""Every exit of the command line, as cron sees it: real subprocesses, stdout and stderr read apart.

With ``--json`` stdout holds exactly one JSON object on every exit (the
summary, or ``{"error", "exit_code"}`` when there is none); the error is one
line on stderr as well, with ``--quiet`` too. Exit codes: 0 every row ok, 1
some rows carry an error, 2 the user's mistake (nothing sent), 3 stopped and
resumable (including a price refresh that cannot reach the server).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import reviews, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer

TIMEOUT_S = 120


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = spawn(workdir, *args)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_json_object(stdout: str) -> dict[str, Any]:
    """stdout is exactly one JSON object (one line), nothing before or after it."""
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one line of JSON on stdout, got {stdout!r}"
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pipeline: ")]


def test_job_file_typo_with_json_is_one_object_and_exit_2(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(3))
    write_job(workdir, server.base_url, model={"max_tokenz": 64})
    result = cli(workdir, "run", "job", "--json")
    assert result.returncode == 2
    body = one_json_object(result.stdout)
    assert body["exit_code"] == 2 and "max_tokenz" in body["error"]
    assert error_lines(result.stderr) == [f"pipeline: error: {body['error']}"]
    assert "Traceback" not in result.stderr
    assert server.stats()["requests"] == 0


def test_usage_error_with_json_is_one_object_and_exit_2(workdir: Path) -> None:
    result = cli(workdir, "run", "job", "--sample", "0", "--json")
    assert result.returncode == 2
    body = one_json_object(result.stdout)
    assert body["exit_code"] == 2 and "--sample" in body["error"]
    assert len(error_lines(result.stderr)) == 1

    missing = cli(workdir, "status", "no_such_job", "--json")
    assert missing.returncode == 2
    assert "no_such_job" in one_json_object(missing.stdout)["error"]


def test_usage_error_without_json_keeps_argparse_usage(workdir: Path) -> None:
    result = cli(workdir, "run", "job", "--sample", "0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: pipeline run")


def test_exit_0_prints_the_summary_and_nothing_on_stderr(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(4))
    write_job(workdir, server.base_url)
    result = cli(workdir, "run", "job", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    body = one_json_object(result.stdout)
    assert body["exit_code"] == 0 and body["rows_ok"] == 4 and "error" not in body
    assert error_lines(result.stderr) == []


def test_exit_1_prints_the_summary_and_one_line_on_stderr(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(4))
    server.config.script = {"review number 2 ": ["400:bad request"]}
    write_job(workdir, server.base_url)
    result = cli(workdir, "run", "job", "--json")
    assert result.returncode == 1, result.stderr
    body = one_json_object(result.stdout)
    assert body["exit_code"] == 1 and body["rows_ok"] == 3 and body["output_rows_with_error"] == 1
    assert error_lines(result.stderr) == [
        f"pipeline: job: 1 row has an error (see the error column of {body['output']})"
    ]


def test_exit_3_stop_prints_the_summary_with_its_error_on_both_streams(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(20))
    write_job(workdir, server.base_url, limits={"budget_usd": 0.00004, "concurrency": 1})
    for flags in (["--json"], ["--json", "--quiet"]):
        result = cli(workdir, "run", "job", *flags)
        assert result.returncode == 3, result.stderr
        body = one_json_object(result.stdout)
        assert body["exit_code"] == 3 and "budget" in body["stop_reason"]
        assert body["error"] == f"job stopped: {body['stop_reason']}; rerun to resume"
        assert error_lines(result.stderr) == [f"pipeline: {body['error']}"]


def test_exit_3_key_rejected_before_any_summary(workdir: Path, server: FakeServer) -> None:
    """The key refused on the first request: a stop, with its summary and the line on stderr."""
    write_parquet(workdir / "data/in.parquet", reviews(3))
    server.config.api_key = "sk-the-right-key-0123456789"
    write_job(workdir, server.base_url, limits={"concurrency": 1})
    result = cli(workdir, "run", "job", "--json")
    assert result.returncode == 3
    body = one_json_object(result.stdout)
    assert body["exit_code"] == 3 and body["error"]
    assert len(error_lines(result.stderr)) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_prices_refresh_offline_is_exit_3_with_one_line(workdir: Path) -> None:
    """Exit 1 means "rows failed": a price list that cannot be fetched is a stop to retry later."""
    url = f"http://127.0.0.1:{_closed_port()}/api/v1"
    result = cli(workdir, "prices", "--refresh", "--base-url", url)
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pipeline: error: could not refresh prices from {url}/models: ")


def test_eval_with_json_answers_in_json_on_a_mistake_and_on_a_stop(workdir: Path, server: FakeServer) -> None:
    rows = reviews(20)
    write_parquet(workdir / "data/in.parquet", {**rows, "gold": ["a", "b"] * 10})
    write_job(workdir, server.base_url, prompt_extra='labels = ["a", "b"]', limits={"budget_usd": 0.00004})
    mistake = cli(workdir, "eval", "job", "--gold", "no_such_column", "--json")
    assert mistake.returncode == 2
    assert "no_such_column" in one_json_object(mistake.stdout)["error"]
    assert len(error_lines(mistake.stderr)) == 1

    stopped = cli(workdir, "eval", "job", "--gold", "gold", "--json")
    assert stopped.returncode == 3, stopped.stderr
    body = one_json_object(stopped.stdout)
    assert "budget" in body["stop_reason"] and body["error"].startswith("job stopped: ")
    assert error_lines(stopped.stderr) == [f"pipeline: {body['error']}"]


def test_ray_address_where_no_cluster_answers_is_exit_2_at_once(workdir: Path, server: FakeServer) -> None:
    """Ray would retry such an address for minutes; the run says so in one line instead, having sent nothing."""
    pytest.importorskip("ray")
    write_parquet(workdir / "data/in.parquet", reviews(3))
    write_job(workdir, server.base_url, limits={"requests_per_minute": 600})
    address = f"127.0.0.1:{_closed_port()}"
    result = cli(workdir, "run", "job", "--engine", "ray", "--address", address, "--json")
    assert result.returncode == 2
    body = one_json_object(result.stdout)
    assert body["error"].startswith(f"--address {address}: no Ray cluster answers there")
    assert server.stats()["requests"] == 0
