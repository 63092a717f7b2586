"""More batch-mode edges, of the kinds issue 22 names, in shapes the first tests do not try.

The key echoed in other encodings and in other places (a poll's 4xx, an error
file line, a failed batch's ``errors``), results whose usage is partial rather
than absent, ``--fresh`` while another process owns the pending batch, and a
model losing its endpoints while a batch runs. Real CLI runs (in process, or as
subprocesses where another process is the point) against ``tests/fakes/batch.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import pipeline
from pipeline.cli.app import main
from tests.conftest import TEST_KEY, run_cli, spawn
from tests.fakes.batch import FakeBatchServer
from tests.fakes.server import error_body
from tests.integration.test_edges_batch import (
    _wait,
    assert_no_key_anywhere,
    batch_job,
    cli,
    fake,
    output_rows,
    submitted,
)

PROVIDERS = ["openrouter", "mistral", "openai"]

# ------------------------------------------------------------------ the key echoed


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize("behaviour", ["echo_auth", "echo_auth_error"])
@pytest.mark.parametrize("form", ["unicode", "lower_hex"])
def test_a_key_echoed_in_another_encoding_is_masked(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str, behaviour: str, form: str
) -> None:
    """The echo written with JSON \\u escapes (it parses back to the key) or percent-encoded in lower case."""
    with fake(flavour, script={"number 2 ": [behaviour] * 9}, echo_form=form) as server:
        batch_job(workdir, server, 5, limits={"max_attempts": 1})
        _code, summary, err = cli(capsys, "job")
        rows = output_rows()
        assert rows[2]["error"]
        assert_no_key_anywhere(json.dumps(summary), err, json.dumps(rows), json.dumps(rows, ensure_ascii=False))
        assert _unquoted_key() not in json.dumps(rows) + err


def _unquoted_key() -> str:
    return "".join(f"%{ord(c):02x}" for c in TEST_KEY)


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize("form", ["raw", "unicode"])
def test_a_failed_batch_quoting_the_key_in_another_encoding_is_masked(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str, form: str
) -> None:
    with fake(flavour, fail_echo={0: "line 1: bad"}, echo_form=form) as server:
        batch_job(workdir, server, 4, limits={"max_attempts": 1})
        _code, summary, err = cli(capsys, "job")
        assert server.submissions
        assert_no_key_anywhere(json.dumps(summary), err, json.dumps(output_rows()))
        capsys.readouterr()
        main(["status", "job"])
        assert TEST_KEY not in capsys.readouterr().out


class PollEcho(FakeBatchServer):
    """Polls answer a 4xx whose message quotes the request's Authorization header."""

    status = 403

    async def _echo(self, request: web.Request) -> web.Response:
        echoed = request.headers.get("Authorization", "")
        body = error_body(self.status, f"Forbidden for this batch. You sent Authorization: {echoed}")
        return web.json_response(body, status=self.status)

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._poll_echo, self._auth])
        base = super().make_app()
        for route in base.router.routes():
            app.router.add_route(route.method, route.resource.canonical, route.handler)  # type: ignore[union-attr]
        return app

    @web.middleware
    async def _poll_echo(self, request: web.Request, handler: Any) -> web.StreamResponse:
        parts = request.path.rstrip("/").split("/")
        if request.method == "GET" and len(parts) >= 2 and parts[-2] in ("batches", "jobs"):
            return await self._echo(request)
        response: web.StreamResponse = await handler(request)
        return response


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_a_poll_answering_a_4xx_that_quotes_the_key_is_masked(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str, status: int
) -> None:
    server = PollEcho(flavour=flavour)
    server.status = status
    with server.running():
        batch_job(workdir, server, 4)
        code, summary, err = cli(capsys, "job")
        assert code == 3, (summary, err)
        assert_no_key_anywhere(json.dumps(summary), err)
        capsys.readouterr()
        assert main(["run", "job"]) == 3
        captured = capsys.readouterr()
        assert TEST_KEY not in captured.out + captured.err
        assert len(server.submissions) == 1, "a poll error must not submit the batch again"


# ------------------------------------------------------------------ partial usage


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize(
    "behaviour", ["usage_nulls", "usage_total_only", "usage_empty", "usage_prompt_only", "usage_zeros"]
)
def test_results_with_partial_usage_are_charged_for_prompt_and_completion(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str, behaviour: str
) -> None:
    with fake(flavour, script={"review": [behaviour] * 100}) as server:
        batch_job(workdir, server, 8)
        code, summary, err = cli(capsys, "job")
        assert code == 0, err
        rows = output_rows()
        assert all(r["prompt_tokens"] and r["prompt_tokens"] > 5 for r in rows), [r["prompt_tokens"] for r in rows]
        assert all(r["completion_tokens"] for r in rows), [r["completion_tokens"] for r in rows]
        assert summary["cost_usd"] >= server.bill * 0.95, (summary["cost_usd"], server.bill)
        assert run_cli("job") == 0 and len(server.submissions) == 1


@pytest.mark.parametrize("flavour", ["openrouter", "openai"])
@pytest.mark.parametrize("behaviour", ["usage_nulls", "usage_total_only"])
def test_the_budget_holds_when_usage_is_partial(workdir: Path, flavour: str, behaviour: str) -> None:
    with fake(flavour, script={"review": [behaviour] * 100}, price_per_token=1e-5, discount=1.0) as server:
        prices = {"input_price_per_million": 10.0, "output_price_per_million": 10.0, "batch_discount": 1.0}
        batch_job(workdir, server, 60, limits={"budget_usd": 0.006}, batch_max_requests=10, **prices)
        assert run_cli("job") in (0, 3)
        assert server.bill <= 0.006 + 1e-12, f"${server.bill:.6f} billed against budget_usd $0.006"


# ------------------------------------------------------------------ --fresh with batches pending


@pytest.mark.parametrize("flavour", ["openrouter", "openai"])
def test_fresh_refuses_a_batch_another_process_left_pending(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, complete_after_s=3600) as server:
        batch_job(workdir, server, 6)
        proc = spawn(workdir, "run", "job", "--no-wait", "--quiet")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        capsys.readouterr()
        assert main(["status", "job"]) in (0, 1, 3)  # looking first changes nothing
        assert main(["run", "job", "--fresh", "--quiet"]) == 2
        assert "pending" in capsys.readouterr().err
        with pytest.raises(pipeline.UserError, match="pending"):
            pipeline.run(None, "job", fresh=True, progress=False)
        assert main(["run", "job", "--fresh", "--no-wait", "--quiet"]) == 2
        assert len(server.submissions) == 1


@pytest.mark.parametrize("flavour", ["openrouter", "mistral"])
def test_fresh_while_another_process_waits_on_its_batch_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, complete_after_s=3600) as server:
        batch_job(workdir, server, 6)
        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            _wait(lambda: len(server.submissions) == 1, "the batch reaches the provider", proc)
            capsys.readouterr()
            assert main(["run", "job", "--fresh", "--quiet"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert len(server.submissions) == 1
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        assert len(server.submissions) == 1


# ------------------------------------------------------------------ a 404 while a batch runs


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_no_endpoints_inside_batch_results_leaves_the_rows_to_a_rerun(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    """Some results of a batch come back 404 "No endpoints found": not billed, not answered.

    The rows must not stay failed for good (the model comes back): a plain rerun
    submits them again, and only them.
    """
    with fake(flavour, script={"number 3 ": ["no_endpoints"], "number 5 ": ["no_endpoints"]}) as server:
        batch_job(workdir, server, 8, limits={"max_attempts": 1})
        code, summary, err = cli(capsys, "job")
        assert code == 3, (summary, err)
        assert "No endpoints" in summary["stop_reason"] and "rerun" in summary["stop_reason"]
        assert run_cli("job") == 0
        rows = output_rows()
        assert rows[3]["completion"] and rows[5]["completion"], (rows[3], rows[5])
        assert submitted(server, 0) == 1 and submitted(server, 3) == 2
