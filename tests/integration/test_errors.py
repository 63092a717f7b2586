"""Provider error classes end to end: job file -> CLI run -> fake server -> output Parquet.

Every test drives the real CLI against the loopback fake server and checks what
the server saw (requests, arrival times, bodies, billing) against what the
pipeline wrote (output rows, exit code, stderr).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY, read_output, reviews, run_cli, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_reply, last_user_content

PREFIX = "Summarise in one sentence:\n\n"
PRICE_PER_TOKEN = 0.10 / 1_000_000  # mistralai/ministral-8b, input and output


# ------------------------------------------------------------------ helpers


def user_message(i: int) -> str:
    """The user message the default job sends for row ``i`` of ``reviews(n)``."""
    return PREFIX + f"review number {i} about item {i * 7 % 13}"


def row_key(i: int) -> str:
    """A script key matching row ``i`` only (``number 1 about`` does not match row 11)."""
    return f"number {i} about"


def make_job(
    workdir: Path,
    server: FakeServer,
    n: int,
    *,
    name: str = "job",
    limits: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> Path:
    """``n`` review rows in data/in.parquet and a job pointing at ``server``."""
    write_parquet(workdir / "data" / "in.parquet", reviews(n))
    assert server.base_url is not None
    return write_job(workdir, server.base_url, name=name, limits=limits, model=model)


def output_rows(workdir: Path, name: str = "job") -> dict[int, dict[str, Any]]:
    """Output rows by id."""
    table = read_output(workdir / "data" / "out" / f"{name}.parquet")
    return {row["id"]: row for row in table.to_pylist()}


def bodies_for(server: FakeServer, u: str) -> list[dict[str, Any]]:
    """Recorded requests (``t``, ``body``, ``headers``) whose last user message is ``u``."""
    return [b for b in server.stats()["bodies"] if last_user_content(b["body"]["messages"]) == u]


def assert_ok(row: dict[str, Any], i: int, attempts: int = 1) -> None:
    """Row ``i`` holds its own completion after ``attempts`` tries."""
    assert row["error"] is None, row["error"]
    assert row["completion"] == expected_reply(user_message(i))
    assert row["attempts"] == attempts
    assert row["finish_reason"] == "stop"


# ------------------------------------------------------------------ retried, then ok

RETRIED = [
    # (behaviour, failures before success, server Retry-After, least gap between tries)
    ("408", 2, "0", 0.0),
    ("409", 2, "0", 0.0),
    ("429", 1, "1", 0.95),
    ("retry_after_date", 1, "0", 0.9),
    ("500", 2, "0", 0.0),
    ("502", 2, "0", 0.0),
    ("503", 2, "0", 0.0),
    ("drop", 2, "0", 0.0),
    ("hang", 1, "0", 0.45),
    ("error200", 2, "0", 0.0),
    ("finish_error", 2, "0", 0.0),
]


@pytest.mark.parametrize(("behaviour", "failures", "retry_after", "min_gap"), RETRIED, ids=[r[0] for r in RETRIED])
def test_transient_error_is_retried_until_ok(
    workdir: Path, server: FakeServer, behaviour: str, failures: int, retry_after: str, min_gap: float
) -> None:
    """A transient failure is retried; the row ends ok with its own completion and the try count.

    For 429 (Retry-After seconds or HTTP date) the retry waits at least that long;
    a hung request is cut off by the job's ``timeout_s``.
    """
    server.config.retry_after = retry_after
    server.config.script = {row_key(2): [behaviour] * failures}
    job = make_job(workdir, server, 6, limits={"max_attempts": failures + 2, "timeout_s": 0.5})

    assert run_cli(str(job)) == 0

    rows = output_rows(workdir)
    assert_ok(rows[2], 2, attempts=failures + 1)
    for i in (0, 1, 3, 4, 5):
        assert_ok(rows[i], i)
    tries = bodies_for(server, user_message(2))
    assert len(tries) == failures + 1
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(tries)]
    assert min(gaps) >= min_gap, gaps
    assert server.stats()["ok"] == 6
    assert server.duplicates() == 0


# ------------------------------------------------------------------ never retried

PERMANENT = [("400", "400"), ("404", "404"), ("422", "422"), ("403:Flagged by moderation", "403")]


@pytest.mark.parametrize(
    ("behaviour", "status"), PERMANENT, ids=[p[1] if p[0] == p[1] else "403-moderation" for p in PERMANENT]
)
def test_permanent_error_is_not_retried(
    workdir: Path, server: FakeServer, behaviour: str, status: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """400/404/422 and a moderation 403 end the row after one request; other rows are unaffected."""
    server.config.script = {row_key(3): [behaviour] * 5}
    job = make_job(workdir, server, 8, limits={"max_attempts": 5})

    assert run_cli(str(job)) == 1

    rows = output_rows(workdir)
    assert status in rows[3]["error"]
    assert rows[3]["attempts"] == 1
    assert rows[3]["completion"] is None
    assert len(bodies_for(server, user_message(3))) == 1
    for i in (0, 1, 2, 4, 5, 6, 7):
        assert_ok(rows[i], i)
    stats = server.stats()
    assert stats["requests"] == 8
    assert stats["status_counts"][int(status)] == 1
    assert "1 row" in capsys.readouterr().err  # the --quiet problem line counts the failed row


def test_permanent_failure_is_not_resent_on_rerun(workdir: Path, server: FakeServer) -> None:
    """A row that failed permanently is done: a plain rerun sends nothing, --retry-failed resends it."""
    server.config.script = {row_key(1): ["400"]}
    job = make_job(workdir, server, 4)
    assert run_cli(str(job)) == 1
    assert run_cli(str(job)) == 1
    assert server.stats()["requests"] == 4
    assert run_cli(str(job), "--retry-failed") == 0
    assert server.stats()["requests"] == 5
    assert_ok(output_rows(workdir)[1], 1)


# ------------------------------------------------------------------ key rejected: stop

AUTH = [("401", "401"), ("402", "402"), ("403", "403")]


@pytest.mark.parametrize(("behaviour", "status"), AUTH, ids=["401", "402", "403-key-disabled"])
def test_rejected_key_stops_sending_and_resumes(
    workdir: Path, server: FakeServer, behaviour: str, status: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """401, 402 and 403 "Key is disabled" stop the run at once (exit 3); a rerun finishes without double billing."""
    n, bad, concurrency = 60, 5, 4
    server.config.latency_s = 0.02
    server.config.script = {row_key(bad): [behaviour]}
    job = make_job(workdir, server, n, limits={"concurrency": concurrency, "max_attempts": 3})

    assert run_cli(str(job)) == 3

    err = capsys.readouterr().err
    assert "stopped" in err and status in err
    stats = server.stats()
    # Rows before the bad one, the bad one, and what was already in flight: far fewer than n.
    assert stats["requests"] <= bad + 1 + 2 * concurrency, stats["requests"]
    assert stats["status_counts"][int(status)] == 1
    rows = output_rows(workdir)
    assert len(rows) == n
    ok = [i for i, r in rows.items() if r["error"] is None]
    assert len(ok) == stats["ok"]
    for i in ok:
        assert_ok(rows[i], i)
    assert status in rows[bad]["error"]
    assert len(bodies_for(server, user_message(bad))) == 1  # the key error is not retried
    not_run = [i for i, r in rows.items() if r["error"] is not None and r["error"].startswith("not_run")]
    assert len(ok) + len(not_run) == n - 1
    assert all(rows[i]["completion"] is None and rows[i]["attempts"] is None for i in not_run)

    server.config.script = {}
    assert run_cli(str(job)) == 0
    rows = output_rows(workdir)
    for i in range(n):
        assert_ok(rows[i], i)
    assert server.duplicates() == 0
    assert server.stats()["ok"] == n


# ------------------------------------------------------------------ attempts run out


@pytest.mark.parametrize(
    ("script", "last_error"),
    [
        (["500", "502", "503"], "HTTP 503"),
        (["500", "500", "hang"], "timeout after 0.5 s"),
        (["503", "503", "drop"], "connection error"),
        (["429", "429", "error200"], "provider error (HTTP 200)"),
    ],
    ids=["503", "timeout", "drop", "error200"],
)
def test_attempts_run_out_with_last_error(
    workdir: Path, server: FakeServer, script: list[str], last_error: str
) -> None:
    """After max_attempts a transient error ends the row with its last error (exit 1); the rest are ok."""
    server.config.retry_after = "0"
    server.config.script = {row_key(4): script + ["500"] * 5}
    job = make_job(workdir, server, 8, limits={"max_attempts": 3, "timeout_s": 0.5})

    assert run_cli(str(job)) == 1

    rows = output_rows(workdir)
    assert rows[4]["error"].startswith(last_error), rows[4]["error"]
    assert rows[4]["attempts"] == 3
    assert rows[4]["completion"] is None
    assert len(bodies_for(server, user_message(4))) == 3
    for i in (0, 1, 2, 3, 5, 6, 7):
        assert_ok(rows[i], i)


def test_transient_failure_is_retried_by_the_next_run(workdir: Path, server: FakeServer) -> None:
    """A row whose attempts ran out is not done: a plain rerun sends it again and nothing else."""
    server.config.retry_after = "0"
    server.config.script = {row_key(1): ["502", "502"]}
    job = make_job(workdir, server, 5, limits={"max_attempts": 2})
    assert run_cli(str(job)) == 1
    assert run_cli(str(job)) == 0
    assert len(bodies_for(server, user_message(1))) == 3
    assert server.stats()["requests"] == 7
    assert_ok(output_rows(workdir)[1], 1)
    assert server.duplicates() == 0


def test_bad_rows_never_stop_the_job(workdir: Path, server: FakeServer) -> None:
    """Several rows failing in different ways still let every other row finish ok."""
    server.config.retry_after = "0"
    bad = {3: ["400"], 7: ["422"], 11: ["500"] * 9, 15: ["404"], 19: ["403:Flagged by moderation"]}
    server.config.script = {row_key(i): steps for i, steps in bad.items()}
    job = make_job(workdir, server, 24, limits={"max_attempts": 2, "concurrency": 4})

    assert run_cli(str(job)) == 1

    rows = output_rows(workdir)
    for i in range(24):
        if i in bad:
            assert rows[i]["error"] is not None and rows[i]["completion"] is None
        else:
            assert_ok(rows[i], i)
    assert server.stats()["ok"] == 24 - len(bad)


# ------------------------------------------------------------------ a 429 slows the whole job


def test_429_pauses_every_worker(workdir: Path, server: FakeServer) -> None:
    """After one row's 429 with Retry-After 1, no other request reaches the server for about a second."""
    n, bad, latency = 40, 6, 0.02
    server.config.latency_s = latency
    server.config.retry_after = "1"
    server.config.script = {row_key(bad): ["429"]}
    job = make_job(workdir, server, n, limits={"concurrency": 4})

    assert run_cli(str(job)) == 0

    tries = bodies_for(server, user_message(bad))
    assert len(tries) == 2
    t429 = tries[0]["t"]
    # The 429 reaches the client after the server's latency; allow requests already
    # past the limiter at that moment a little slack.
    heard = t429 + latency + 0.2
    others = sorted(
        b["t"] for b in server.stats()["bodies"] if last_user_content(b["body"]["messages"]) != user_message(bad)
    )
    paused = [t for t in others if heard < t < t429 + 0.9]
    assert paused == [], [round(t - t429, 3) for t in paused]
    after = [t for t in others if t >= t429 + 0.9]
    assert len(after) >= n // 2  # traffic was steady: most rows were still to send
    gaps = [b - a for a, b in itertools.pairwise(sorted([*others, t429]))]
    assert max(gaps) >= 0.8
    rows = output_rows(workdir)
    assert rows[bad]["attempts"] == 2
    assert all(rows[i]["error"] is None for i in range(n))


# ------------------------------------------------------------------ cost


def test_cost_matches_server_bill(workdir: Path, server: FakeServer) -> None:
    """cost_usd sums to what the server billed, unbilled failed attempts included as zero."""
    server.config.retry_after = "0"
    server.config.script = {row_key(2): ["500", "error200"], row_key(5): ["finish_error"], row_key(7): ["400"]}
    job = make_job(workdir, server, 12)

    assert run_cli(str(job)) == 1

    rows = output_rows(workdir)
    stats = server.stats()
    assert stats["cost"] > 0
    total = sum(r["cost_usd"] or 0.0 for r in rows.values())
    assert math.isclose(total, stats["cost"], rel_tol=1e-9)
    assert sum(r["prompt_tokens"] or 0 for r in rows.values()) == stats["prompt_tokens"]
    assert sum(r["completion_tokens"] or 0 for r in rows.values()) == stats["completion_tokens"]
    assert rows[7]["cost_usd"] in (None, 0.0)


def test_cost_from_prices_when_server_reports_none(workdir: Path, server: FakeServer) -> None:
    """Without usage.cost, cost_usd is tokens x $0.10 per million and matches the server's tally."""
    server.config.include_cost = False
    job = make_job(workdir, server, 10)

    assert run_cli(str(job)) == 0

    rows = output_rows(workdir)
    for r in rows.values():
        expected = (r["prompt_tokens"] + r["completion_tokens"]) * PRICE_PER_TOKEN
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert math.isclose(r["cost_usd"], expected, rel_tol=1e-9)
    stats = server.stats()
    assert math.isclose(sum(r["cost_usd"] for r in rows.values()), stats["cost"], rel_tol=1e-9)


# ------------------------------------------------------------------ the key never leaks


def _files_with_key(workdir: Path) -> list[str]:
    secret = TEST_KEY.encode()
    return [str(p) for p in (workdir / "data").rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_api_key_never_written_or_printed(workdir: Path, server: FakeServer) -> None:
    """The key is in neither output, journal, lock file nor a subprocess's stdout/stderr, even on a 401."""
    server.config.api_key = "sk-some-other-key"  # every request is answered 401
    job = make_job(workdir, server, 10, limits={"concurrency": 2})

    first = spawn(workdir, "run", str(job))
    out, err = first.communicate(timeout=60)
    assert first.returncode == 3, err
    assert "401" in err + out
    assert TEST_KEY not in out and TEST_KEY not in err
    assert server.stats()["status_counts"].get(401, 0) >= 1
    assert (workdir / "data" / "out" / "job.parquet").exists()
    assert _files_with_key(workdir) == []

    server.config.api_key = TEST_KEY
    second = spawn(workdir, "run", str(job), "--json")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert TEST_KEY not in out and TEST_KEY not in err
    status = spawn(workdir, "status", str(job))
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    assert TEST_KEY not in out and TEST_KEY not in err
    assert _files_with_key(workdir) == []
    assert all(r["error"] is None for r in output_rows(workdir).values())


# ------------------------------------------------------------------ request shape


def test_request_shape_params_and_headers(workdir: Path, server: FakeServer) -> None:
    """Every body has max_tokens; inline [model] params and headers reach the server; the key is a Bearer token."""
    server.config.retry_after = "0"
    server.config.script = {row_key(1): ["500"]}  # a retried request carries the same shape
    routing = {"order": ["FakeProvider", "Other"], "allow_fallbacks": False}
    job = make_job(
        workdir,
        server,
        4,
        model={
            "max_tokens": 48,
            "params": {"seed": 7, "top_p": 0.9, "provider": routing},
            "headers": {"HTTP-Referer": "https://example.org/app", "X-Title": "pipeline tests"},
        },
    )

    assert run_cli(str(job)) == 0

    bodies = server.stats()["bodies"]
    assert len(bodies) == 5
    for rec in bodies:
        body, headers = rec["body"], rec["headers"]
        assert body["max_tokens"] == 48
        assert body["model"] == "mistralai/ministral-8b"
        assert body["temperature"] == 0.0
        assert body["seed"] == 7 and body["top_p"] == 0.9
        assert body["provider"] == routing
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert headers["Authorization"] == f"Bearer {TEST_KEY}"
        assert headers["HTTP-Referer"] == "https://example.org/app"
        assert headers["X-Title"] == "pipeline tests"


def test_params_table_and_default_max_tokens(workdir: Path, server: FakeServer) -> None:
    """A [model.params] table passes through, and max_tokens is sent even when the job leaves it unset."""
    job = make_job(workdir, server, 3)
    text = job.read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("max_tokens"))
    text += '\n[model.params]\nseed = 11\nprovider = { sort = "price", data_collection = "deny" }\n'
    job.write_text(text, encoding="utf-8")

    assert run_cli(str(job)) == 0

    bodies = server.stats()["bodies"]
    assert len(bodies) == 3
    for rec in bodies:
        assert rec["body"]["max_tokens"] == 256  # the job file's default
        assert rec["body"]["seed"] == 11
        assert rec["body"]["provider"] == {"sort": "price", "data_collection": "deny"}


# ------------------------------------------------------------------ blank prompts


def test_blank_prompts_are_not_sent(workdir: Path, server: FakeServer) -> None:
    """Rows whose text is "", "   " or null are never sent and end with an error saying the prompt is empty."""
    texts = ["first real review", "", "   ", None, "second real review", "\n\t"]
    write_parquet(workdir / "data" / "in.parquet", {"id": list(range(len(texts))), "text": texts})
    assert server.base_url is not None
    job = write_job(workdir, server.base_url)

    assert run_cli(str(job)) == 1  # the skipped rows carry an error

    stats = server.stats()
    assert stats["requests"] == 2
    sent = {last_user_content(b["body"]["messages"]) for b in stats["bodies"]}
    assert sent == {PREFIX + "first real review", PREFIX + "second real review"}
    rows = output_rows(workdir)
    for i in (1, 2, 3, 5):
        assert rows[i]["completion"] is None
        assert "empty" in rows[i]["error"], rows[i]["error"]
        assert not rows[i]["attempts"]
    assert rows[0]["completion"] == expected_reply(PREFIX + "first real review")
    assert rows[4]["completion"] == expected_reply(PREFIX + "second real review")
    # A rerun sends nothing more.
    assert run_cli(str(job)) == 1
    assert server.stats()["requests"] == 2


def test_request_body_is_the_dialects_json() -> None:
    """The pre-serialised body prefix yields exactly the JSON of the full request."""
    import json

    from pipeline.config.job import ModelSpec
    from pipeline.providers.dialect import Dialect

    spec = ModelSpec(params={"seed": 7, "provider": {"order": ["a"]}, "stop": ['"messages": null']})
    dialect = Dialect(spec, "m/x", {"provider": {"require_parameters": True}})
    messages = [{"role": "system", "content": "s é 😀"}, {"role": "user", "content": 'say "hi"\n'}]
    body = json.loads(dialect.body(messages))
    assert body == {
        "model": "m/x",
        "max_tokens": 256,
        "temperature": 0.0,
        "seed": 7,
        "stop": ['"messages": null'],
        "provider": {"order": ["a"], "require_parameters": True},
        "messages": messages,
    }
